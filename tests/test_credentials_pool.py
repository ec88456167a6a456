"""Credentials of HTCondor workflows on the real pool, against authenticating XRootD servers.

- before submitting, the workflow's preflight refuses an expired, too short or missing proxy
  with its reason, and nothing reaches the queue;
- the token route: the submit file asks HTCondor for the OAuth service's token, and the job
  script points ``BEARER_TOKEN_FILE`` at ``$_CONDOR_CREDS/<service>.use``;
- a proxy that expires in the middle of a training, handed to the job by HTCondor
  (``x509userproxy``, the default route): the next commit is refused, the job exits 88 and
  is held with the reason that says to renew and release; renewed and released, it starts
  with the renewed proxy, resumes from its last checkpoint and completes;
- a proxy renewed on the access point reaches a running job's copy;
- the shared route: the job reads the submitter's own proxy file.

The servers run on the host's loopback (the pool's chroot shares the network); what law and
the jobs in the pool must read (the CA directory, proxies, tokens) lies in the test's folder
under the checkout, which the pool bind-mounts, owned by the job user.
"""
from __future__ import annotations

import datetime as dt
import os
import pwd
import re
import shutil
import time
from pathlib import Path

import pytest

from test_htcondor_workflow import (JOB_USER, ROOT, condor_jobs, htcondor_pool, in_pool_env,  # noqa: F401
                                    mine, pool, start_in_pool, workdir)
from waiting import wait_until

from ckpt_tasks.stop import EXIT_CREDENTIAL_REFUSED

FULL = "storage.read:/alice storage.create:/alice storage.modify:/alice"
RESOURCES = ("--request-memory", "500MB", "--request-disk", "200MB")


def give_to_job_user(*paths: Path) -> None:
    user = pwd.getpwnam(JOB_USER)
    for path in paths:
        for item in (path, *(path.rglob("*") if path.is_dir() else ())):
            os.chown(item, user.pw_uid, user.pw_gid)


def client_files(workdir: Path, test_pki) -> Path:
    """The CA directory, copied where law and the jobs in the pool can read it."""
    certs = workdir / "certificates"
    shutil.copytree(test_pki.cert_dir, certs)
    give_to_job_user(certs)
    return certs


def proxy_for_pool(test_pki, identity, path: Path, lifetime: dt.timedelta) -> Path:
    """A proxy of ``identity`` at ``path``, the job user's, mode 0600 (as HTCondor wants it);
    written next to ``path`` and moved over it, as a renewal replaces the file."""
    fresh = test_pki.proxy(identity, path.with_name(path.name + ".new"), lifetime=lifetime)
    give_to_job_user(fresh)
    os.replace(fresh, path)
    return path


def law_cfg_with(workdir: Path, **submit: str) -> Path:
    """The project's law.cfg with submit commands added to [ckpt_tasks_htcondor]."""
    text = (ROOT / "law.cfg").read_text()
    lines = "".join(f"{key}: {value}\n" for key, value in submit.items())
    text = text.replace("[ckpt_tasks_htcondor]\n", "[ckpt_tasks_htcondor]\n" + lines, 1)
    path = workdir / "law.cfg"
    path.write_text(text)
    give_to_job_user(path)
    return path


def pool_env(workdir: Path, certs: Path, proxy: Path | None, law_cfg: Path | None = None) -> str:
    exports = f"export X509_CERT_DIR={certs}; unset X509_USER_PROXY; "
    if proxy is not None:
        exports += f"export X509_USER_PROXY={proxy}; "
    env = in_pool_env(workdir) + exports
    if law_cfg is not None:
        env = env.replace(f"LAW_CONFIG_FILE={ROOT}/law.cfg", f"LAW_CONFIG_FILE={law_cfg}")
    return env


@pytest.fixture(scope="module")
def alice(test_pki):
    return test_pki.user("alice")


@pytest.fixture(scope="module")
def gsi_server(make_auth_server, alice):
    return make_auth_server(protocol="gsi", authdb="u alice /alice a\n", gridmap={alice.subject: "alice"})


def job_output(workdir: Path) -> str:
    """stdout and stderr of the workflow's jobs (what HTCondor brought back last)."""
    return "".join(p.read_text(errors="replace") for p in sorted(workdir.glob("data/htcondor/TrainTask/*/std*")))


def nothing_ever_queued(workdir: Path) -> bool:
    queued = pool("exec", f"condor_q -allusers -constraint '{mine(workdir)}' -af ClusterId; "
                          f"condor_history -constraint '{mine(workdir)}' -af ClusterId")
    return not queued.strip()


@pytest.mark.parametrize("lifetime, reason", [
    (dt.timedelta(minutes=-5), "expired"),
    (dt.timedelta(minutes=10), "too short"),  # the default minimum of a proxy is one hour
    (None, "missing"),
])
def test_the_workflow_refuses_to_submit_with_a_bad_credential(htcondor_pool, workdir, test_pki, alice, gsi_server,
                                                               lifetime, reason):
    certs = client_files(workdir, test_pki)
    proxy = None if lifetime is None else proxy_for_pool(test_pki, alice, workdir / "x509up", lifetime)
    command = (pool_env(workdir, certs, proxy) + "law index --quiet && law run TrainTask --workflow htcondor "
               f"--branches 0 --epochs 1 --store {gsi_server.url}//alice/ckpt --storage-timeout 20 "
               f"--poll-interval 0.05 --retries 0 {' '.join(RESOURCES)} 2>&1; echo EXIT=$?")
    out = pool("exec", command, timeout=300)
    assert re.search(r"EXIT=[1-9]", out), out[-3000:]
    assert f"preflight refused ({reason})" in out and "not submitting any job" in out, out[-3000:]
    if proxy is not None:
        assert str(proxy) in out  # named by its file...
        assert proxy.read_text().split("PRIVATE KEY-----")[1][:40] not in out  # ...never by its content
    assert not list(workdir.glob("data/htcondor/TrainTask/*/htcondor_jobs_*.json"))
    assert nothing_ever_queued(workdir)


def render_in_pool(workdir: Path, law_env: str, *args: str) -> Path:
    """The submit file the workflow makes for branch 0 with ``args``, made inside the pool as
    law does at submission (its job files then lie where the pool sees them)."""
    script = (law_env + f"mkdir -p {workdir}/jobs && export LAW_JOB_FILE_DIR={workdir}/jobs && python - <<'EOF'\n"
              "from workflows.train import TrainTask\n"
              "from luigi.cmdline_parser import CmdlineParser\n"
              "from law.job.dashboard import NoJobDashboard\n"
              f"with CmdlineParser.global_instance(['TrainTask', '--workflow', 'htcondor', {', '.join(map(repr, args))}])"
              " as parser:\n"
              "    proxy = parser.get_task_obj().workflow_proxy\n"
              "    proxy.job_file_factory = proxy.create_job_file_factory()\n"
              "    proxy.dashboard = NoJobDashboard()\n"
              "    print('JOBFILE', proxy.create_job_file(0, [0])['job'])\n"
              "EOF\n")
    out = pool("exec", script)
    (job_file,) = re.findall(r"JOBFILE (\S+)", out)
    return Path(job_file)


def dry_run(submit: Path) -> tuple[str, dict]:
    out = pool("exec", f"cd {submit.parent} && condor_submit -dry-run - {submit} 2>&1; echo EXIT=$?")
    return out, dict(re.findall(r"^(\w+) ?= ?(.*)$", out, re.M))


def test_the_token_route_asks_htcondor_for_the_token_and_sends_no_proxy(htcondor_pool, workdir, test_pki, alice):
    certs = client_files(workdir, test_pki)
    proxy = proxy_for_pool(test_pki, alice, workdir / "x509up", dt.timedelta(hours=2))
    env = pool_env(workdir, certs, proxy)
    token_submit = render_in_pool(workdir, env, "--credentials", "token", "--oauth-service", "mytokens")
    text = token_submit.read_text()
    assert "use_oauth_services = mytokens" in text and "x509userproxy" not in text, text
    (script,) = token_submit.parent.glob("job_*.sh")
    assert 'token_service="mytokens"' in script.read_text()
    # HTCondor takes the request for the service's token to the credd, which needs a credmon:
    # this pool has none, so the dry run stops exactly there.
    out, _ = dry_run(token_submit)
    assert "Failed to process job credential requests" in out and "credd" in out and "EXIT=1" in out, out
    # Everything else of the file is a valid submission; the proxy route sends the proxy.
    without = token_submit.with_name("no-oauth.sub")
    without.write_text(re.sub(r"^use_oauth_services = .*\n", "", text, flags=re.M))
    give_to_job_user(without)
    out, ad = dry_run(without)
    assert "EXIT=0" in out and "x509userproxy" not in {key.lower() for key in ad}, out
    proxy_submit = render_in_pool(workdir, env)
    out, ad = dry_run(proxy_submit)
    assert "EXIT=0" in out and ad.get("x509userproxy") == f'"{proxy}"', out


def test_a_token_route_job_writes_with_the_token_htcondor_gives_it(htcondor_pool, workdir, test_pki, token_issuer,
                                                                   make_auth_server):
    """A real job of the token route on the pool. This pool has no credmon, so the test stands
    in for it: it places ``scitokens.use`` in a directory and names it ``_CONDOR_CREDS`` in
    the job's environment (what HTCondor does for a job with ``use_oauth_services``)."""
    server = make_auth_server(protocol="ztn", tls=True, issuer=token_issuer)
    certs = client_files(workdir, test_pki)
    creds = workdir / "creds"
    creds.mkdir(mode=0o700)
    token = token_issuer.token(FULL)
    (creds / "scitokens.use").write_text(token)
    (creds / "scitokens.use").chmod(0o600)
    give_to_job_user(creds)
    env = pool_env(workdir, certs, None)
    store = f"{server.url}//alice/ckpt"
    submit = render_in_pool(workdir, env, "--credentials", "token", "--store", store, "--epochs", "1",
                            "--checkpoint-every", "10", "--storage-timeout", "20", *RESOURCES)
    text = re.sub(r"^use_oauth_services = .*\n", "", submit.read_text(), flags=re.M)
    text = text.replace('environment = "', f'environment = "_CONDOR_CREDS={creds} X509_CERT_DIR={certs} ', 1)
    submit.write_text(text)
    out = pool("exec", f"cd {submit.parent} && condor_submit {submit}")
    cluster = re.search(r"submitted to cluster (\d+)", out).group(1)
    wait_until(lambda: not condor_jobs(workdir), 240, "the token-route job to finish")
    code = pool("exec", f"condor_history {cluster}.0 -af ExitCode").strip()
    logs = job_output(workdir)
    assert code == "0", logs[-4000:]
    assert f"bearer token from BEARER_TOKEN_FILE={creds}/scitokens.use" in logs, logs[-4000:]
    assert "training complete" in logs, logs[-4000:]
    assert list(server.data_dir.glob("alice/ckpt/TrainTask/*/branch-0/step-*.json"))
    assert token not in logs and token.split(".")[2] not in logs


def found_proxies(log: str) -> list[tuple[str, dt.timedelta]]:
    """The proxies the job's preflights found: their files and the lifetime they had left."""
    return [(path, dt.timedelta(hours=int(h), minutes=int(m), seconds=int(sec)))
            for path, h, m, sec in re.findall(r"preflight: found x509 proxy (\S+) \(X509_USER_PROXY\)"
                                              r"[^\n]*\(in (\d+):(\d\d):(\d\d)\)", log)]


@pytest.mark.timeout(900)  # 3 min to the expiry, the hold, the rest of the training after the release
def test_a_proxy_expiring_mid_training_holds_the_job_until_renewed_and_released(
        htcondor_pool, workdir, test_pki, alice, gsi_server):
    """The default route: HTCondor hands the submitter's proxy to the job (``x509userproxy``,
    copied into the sandbox: the pool sets ``DELEGATE_JOB_GSI_CREDENTIALS = False``), and
    after the renewal and ``condor_release`` the new start brings the renewed one."""
    certs = client_files(workdir, test_pki)
    # The proxy outlives the submission (condor_submit wants CRED_MIN_TIME_LEFT, 120 s, left)
    # and the job's start (its preflight asks 15 s), not the training (30 epochs of 45 steps
    # at 0.2 s). Idle connections close after 1 s: the first commit after the expiry opens a
    # new one, and is refused.
    proxy = proxy_for_pool(test_pki, alice, workdir / "x509up", dt.timedelta(seconds=180))
    law_cfg = law_cfg_with(workdir, environment=f'"X509_CERT_DIR={certs} XRD_DATASERVERTTL=1"')
    store = f"{gsi_server.url}//alice/ckpt"
    args = (f"--branches 0 --epochs 30 --checkpoint-every 10 --step-delay 0.2 --store {store} "
            f"--storage-timeout 20 --credential-min-lifetime 15 --expected-runtime 3600 "
            f"--poll-interval 0.05 --retries 0 {' '.join(RESOURCES)}")
    command = pool_env(workdir, certs, proxy, law_cfg) + f"law index --quiet && law run TrainTask --workflow htcondor {args}"
    runner = start_in_pool(command, workdir)
    try:
        def held():
            if runner.poll() is not None and not condor_jobs(workdir):
                pytest.fail("the workflow ended without a held job:\n" + (workdir / "law.log").read_text()[-3000:])
            return condor_jobs(workdir, "JobStatus == 5")

        (job,) = wait_until(held, 480, "the job held at the proxy's expiry", interval=1)
        runner.wait(timeout=120)  # the permanent hold fails the workflow (--retries 0); the job stays held
    finally:
        if runner.poll() is None:
            runner.kill()
    law_log = (workdir / "law.log").read_text()
    assert "ends before the training's expected end" in law_log, law_log[-3000:]
    job_id = f"{job['ClusterId']}.{job['ProcId']}"
    held = pool("exec", f"condor_q {job_id} -af HoldReasonCode HoldReasonSubCode HoldReason").strip()
    code, subcode, reason = held.split(" ", 2)
    assert (code, subcode) == ("3", str(EXIT_CREDENTIAL_REFUSED)), held
    assert "renew the proxy or token" in reason and "condor_release" in reason, held
    assert pool("exec", f"condor_q {job_id} -af x509userproxy").strip() == str(proxy)
    log = job_output(workdir)
    assert "the storage refused this job's credential" in log and "refused before training" not in log, log[-4000:]
    # The job read HTCondor's copy in its sandbox, not the submitter's file.
    ((sandbox_proxy, left),) = found_proxies(log)
    assert sandbox_proxy != str(proxy) and not sandbox_proxy.startswith(str(workdir)), sandbox_proxy
    assert left < dt.timedelta(minutes=3), left
    committed = [int(n) for n in re.findall(r"step-(\d+)-", " ".join(
        p.name for p in gsi_server.data_dir.glob("alice/ckpt/TrainTask/*/branch-0/step-*.json")))]
    assert committed and max(committed) > 0, "no checkpoint before the expiry"

    # Renew the proxy where it was submitted from, release: the new start brings the renewed
    # proxy, and the job resumes from its last checkpoint and completes.
    proxy_for_pool(test_pki, alice, proxy, dt.timedelta(hours=2))
    pool("exec", f"condor_release {job_id}")
    wait_until(lambda: not condor_jobs(workdir), 400, "the released job to complete")
    log = job_output(workdir)
    after = log[log.rindex("NumJobStarts = "):]
    # the job's logging goes to stderr, before "NumJobStarts" (stdout) in job_output: the last found
    _, left = found_proxies(log)[-1]
    assert left > dt.timedelta(hours=1), left  # the renewed proxy, not the expired one
    resumed = [int(n) for n in re.findall(r"resuming from step (\d+)", after)]
    assert resumed and resumed[0] == max(committed), (committed, after[-4000:])
    assert "training complete" in after, after[-4000:]
    assert list(workdir.glob("data/TrainTask/*/branch-0/model.pt"))
    # The workflow, run again, finds its branch complete.
    out = pool("exec", command + " 2>&1; echo EXIT=$?", timeout=300)
    assert "EXIT=0" in out, out[-3000:]
    text = (workdir / "law.log").read_text() + log + out
    assert proxy.read_text().split("PRIVATE KEY-----")[1][:40] not in text


def test_a_running_job_gets_the_proxy_renewed_on_the_access_point(htcondor_pool, workdir, test_pki, alice):
    """What the default route relies on for long trainings: a proxy renewed on the access
    point reaches the running job's copy (the shadow looks every SHADOW_CHECKPROXY_INTERVAL,
    5 s in the test pool, 600 s by default), with no hold and no restart."""
    proxy = proxy_for_pool(test_pki, alice, workdir / "x509up", dt.timedelta(hours=1))
    jobdir = workdir / "data" / "show-proxy"  # under workdir/: condor_jobs finds the job by its Iwd
    jobdir.mkdir()
    script = jobdir / "show-proxy.sh"
    # The job prints the end date of its proxy copy until it sees another one.
    script.write_text("#!/bin/sh\n"
                      'first=$(openssl x509 -in "$X509_USER_PROXY" -noout -enddate)\n'
                      'echo "proxy $X509_USER_PROXY $first"\n'
                      "for i in $(seq 1 120); do\n"
                      '  now=$(openssl x509 -in "$X509_USER_PROXY" -noout -enddate)\n'
                      '  if [ "$now" != "$first" ]; then echo "renewed $now"; exit 0; fi\n'
                      "  sleep 0.5\n"
                      "done\n"
                      "exit 1\n")
    script.chmod(0o755)
    submit = jobdir / "show-proxy.sub"
    submit.write_text(f"executable = {script}\nx509userproxy = {proxy}\ninitialdir = {jobdir}\n"
                      "output = show-proxy.out\nerror = show-proxy.err\nlog = show-proxy.log\n"
                      "request_memory = 50MB\nrequest_disk = 10MB\nshould_transfer_files = YES\nqueue\n")
    give_to_job_user(jobdir)
    out = pool("exec", f"condor_submit {submit}")
    cluster = re.search(r"submitted to cluster (\d+)", out).group(1)
    wait_until(lambda: condor_jobs(workdir, "JobStatus == 2"), 120, "the job to run")
    time.sleep(4)  # the job has read its first copy
    proxy_for_pool(test_pki, alice, proxy, dt.timedelta(hours=3))
    wait_until(lambda: not condor_jobs(workdir), 120, "the job to see the renewed proxy")
    assert pool("exec", f"condor_history {cluster}.0 -af ExitCode").strip() == "0", \
        (jobdir / "show-proxy.out").read_text()
    first, second = (jobdir / "show-proxy.out").read_text().splitlines()
    assert first.startswith("proxy ") and str(proxy) not in first, first  # a copy in the sandbox
    end = dt.datetime.strptime(second.split("notAfter=")[1].strip(), "%b %d %H:%M:%S %Y %Z")
    assert end.replace(tzinfo=dt.timezone.utc) > dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2), second


def test_a_shared_route_job_reads_the_submitter_s_proxy_file(htcondor_pool, workdir, test_pki, alice, gsi_server):
    """``--credentials shared``: no ``x509userproxy``; the job's X509_USER_PROXY names the
    submitter's own file (seen by the workers through a shared file system, here the
    bind-mounted checkout), and it trains and commits with it."""
    certs = client_files(workdir, test_pki)
    proxy = proxy_for_pool(test_pki, alice, workdir / "x509up", dt.timedelta(hours=2))
    law_cfg = law_cfg_with(workdir, environment=f'"X509_CERT_DIR={certs}"')
    args = (f"--branches 0 --epochs 1 --checkpoint-every 10 --store {gsi_server.url}//alice/shared "
            f"--storage-timeout 20 --credentials shared --poll-interval 0.05 --retries 0 {' '.join(RESOURCES)}")
    command = pool_env(workdir, certs, proxy, law_cfg) + f"law index --quiet && law run TrainTask --workflow htcondor {args}"
    out = pool("exec", command + " 2>&1; echo EXIT=$?", timeout=400)
    log = job_output(workdir)
    assert "EXIT=0" in out, out[-3000:] + log[-3000:]
    assert [path for path, _ in found_proxies(log)] == [str(proxy)], log[-4000:]
    assert "training complete" in log, log[-4000:]
    assert list(gsi_server.data_dir.glob("alice/shared/TrainTask/*/branch-0/step-*.json"))
