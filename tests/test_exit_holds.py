"""On the real pool: a job that exits with a code no restart can fix is held, with a reason
that says what to do (crash loop 86, unusable software 87, refused credential 88)."""
from __future__ import annotations

import os
import pwd
import re

import pytest

from test_htcondor_workflow import condor_jobs, htcondor_pool, pool, workdir  # noqa: F401
from waiting import wait_until

from ckpt_tasks.htcondor.holds import EXIT_HOLD_REASONS, submit_commands
from ckpt_tasks.stop import EXIT_CREDENTIAL_REFUSED, EXIT_CRASH_LOOP, EXIT_SOFTWARE_UNUSABLE


def test_every_exit_hold_code_is_held_with_its_reason(htcondor_pool, workdir):
    assert set(EXIT_HOLD_REASONS) == {EXIT_CRASH_LOOP, EXIT_SOFTWARE_UNUSABLE, EXIT_CREDENTIAL_REFUSED}
    policy = "\n".join(f"{key} = {value}" for key, value in submit_commands(delay=1))
    user = pwd.getpwnam("ckptuser")
    clusters = {}
    for code in (*EXIT_HOLD_REASONS, 0):
        jobdir = workdir / f"exit-{code}"
        jobdir.mkdir()
        (jobdir / "job.sh").write_text(f"#!/bin/bash\nexit {code}\n")
        (jobdir / "job.sh").chmod(0o755)
        (jobdir / "job.sub").write_text(
            "executable = job.sh\nshould_transfer_files = YES\noutput = out.txt\nerror = err.txt\n"
            f"log = log.txt\nrequest_memory = 100MB\nrequest_disk = 100MB\n{policy}\nqueue\n")
        for path in (jobdir, *jobdir.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
        out = pool("exec", f"cd {jobdir} && condor_submit job.sub")
        clusters[code] = int(re.search(r"submitted to cluster (\d+)", out).group(1))

    wait_until(lambda: len(condor_jobs(workdir, "JobStatus == 5")) == len(EXIT_HOLD_REASONS), 180,
               "every job with a hold code to be held")
    for code, reason in EXIT_HOLD_REASONS.items():
        line = pool("exec", f"condor_q {clusters[code]}.0 -af HoldReasonCode HoldReasonSubCode HoldReason")
        held_code, subcode, text = line.strip().split(" ", 2)
        assert (held_code, subcode) == ("3", str(code)), line
        assert text == reason, line
    # exit 0 is not held: it leaves the queue
    wait_until(lambda: not pool("exec", f"condor_q {clusters[0]}.0 -af ClusterId").strip(), 120,
               "the job that exited 0 to finish")
    pool("exec", "condor_rm " + " ".join(str(c) for c in clusters.values()), check=False)
