"""The software routes of the HTCondor workflow (``--software shared|bundle|container``).

Without a pool: the code bundle (content-addressed, uncommitted and untracked files in,
ignored ones out), the dependency closure, the relocatable environment bundle run from
another directory with a clean environment, the rendered job script (no path of the
submit side in the bundle route) and its checks of a bundle before unpacking.

With the pool (tests/helpers/isolated_pool.py): a bundle-route branch whose job runs as
an account that cannot read the checkout or the venv's Python, finishes, and its model
comes back to the submit side by HTCondor's output transfer; a corrupt bundle holds its
job with the reason; the container route's submit file passes ``condor_submit -dry-run``.
"""
from __future__ import annotations

import base64
import logging
import os
import pwd
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from ckpt_tasks.htcondor import bundle, envbundle, software

ROOT = Path(__file__).resolve().parents[1]


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    """A small git checkout: committed, modified, untracked and ignored files."""
    path = tmp_path / "repo"
    (path / "pkg" / "__pycache__").mkdir(parents=True)
    (path / "pkg" / "mod.py").write_text("x = 1\n")
    (path / ".gitignore").write_text("data/\n*.log\n")
    git(path, "init", "-q")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "first")
    (path / "pkg" / "mod.py").write_text("x = 2\n")         # uncommitted change
    (path / "pkg" / "new.py").write_text("y = 1\n")         # untracked, not ignored
    (path / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (path / "run.log").write_text("ignored\n")
    (path / "data").mkdir()
    (path / "data" / "big.bin").write_bytes(b"\0" * 1000)
    return path


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_code_bundle_holds_the_working_tree_and_is_named_by_its_checksum(repo, tmp_path):
    built = bundle.build_code_bundle(repo, tmp_path / "cache")
    files = members(built.path)
    assert sorted(files) == [".gitignore", "pkg/mod.py", "pkg/new.py"]
    assert files["pkg/mod.py"] == b"x = 2\n"
    assert built.sha256 == bundle.sha256_of(built.path) and built.size == built.path.stat().st_size
    assert built.path.name == f"code-{built.sha256[:16]}.tar.gz"
    # the same tree, built again later (other mtimes), gives the very same file
    os.utime(repo / "pkg" / "mod.py", (1, 1))
    assert bundle.build_code_bundle(repo, tmp_path / "cache") == built
    (repo / "pkg" / "new.py").write_text("y = 2\n")
    changed = bundle.build_code_bundle(repo, tmp_path / "cache")
    assert changed.sha256 != built.sha256 and changed.path != built.path


def test_code_bundle_without_git_follows_the_gitignore(repo, tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "_git_files", lambda root: None)
    shutil.rmtree(repo / ".git")
    assert bundle.code_files(repo) == [".gitignore", "pkg/mod.py", "pkg/new.py"]


def test_code_bundle_leaves_out_files_that_look_like_credentials(repo):
    (repo / "x509up_u1000").write_text("-----BEGIN CERTIFICATE-----\n")
    (repo / "pkg" / "bt_u1000").write_text("eyJ...")
    (repo / ".env").write_text("TOKEN=secret\n")
    assert bundle.code_files(repo) == [".gitignore", "pkg/mod.py", "pkg/new.py"]


def test_the_project_code_bundle_leaves_out_venv_data_and_test_data():
    names = bundle.code_files(ROOT)
    assert "law.cfg" in names and "workflows/train.py" in names and "ckpt_tasks/htcondor/job.sh" in names
    assert not [n for n in names if n.startswith((".venv/", "data/", ".git/", "tests/fixtures/"))
                or "__pycache__" in n]


def test_dependency_closure_is_the_runtime_set():
    names = {d.metadata["Name"].lower().replace("_", "-") for d in envbundle.dependency_closure()}
    assert {"torch", "law", "luigi", "xrootd", "htcondor", "numpy", "scikit-learn", "six"} <= names
    # test-only extras and the project itself (it is the code bundle) stay out
    assert not names & {"pytest", "lightning", "keras", "mkdocs", "matplotlib", "ckpt-tasks"}


@pytest.fixture(scope="module")
def env_bundle():
    """The environment bundle, from the cache that later submissions reuse (built once)."""
    return envbundle.build_env_bundle(bundle.default_cache_dir())


def test_environment_bundle_runs_from_anywhere_with_a_clean_environment(env_bundle, tmp_path):
    assert envbundle.build_env_bundle(bundle.default_cache_dir()) == env_bundle  # cached: the same file
    code = bundle.build_code_bundle(ROOT, tmp_path / "cache")
    (tmp_path / "job" / "code").mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(env_bundle.path), "-C", str(tmp_path / "job")], check=True)
    subprocess.run(["tar", "-xzf", str(code.path), "-C", str(tmp_path / "job" / "code")], check=True)
    probe = ("import sys, torch, law, luigi, XRootD.client, sklearn, classad2, ckpt_tasks.tasks, workflows.train\n"
             "print('\\n'.join([sys.prefix, torch.__file__, law.__file__, ckpt_tasks.tasks.__file__, *sys.path]))")
    out = subprocess.run([str(tmp_path / "job" / "env" / "bin" / "python"), "-c", probe], check=True,
                         capture_output=True, text=True, cwd=tmp_path / "job",
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "job" / "code")}).stdout
    paths = [p for p in out.splitlines() if p]
    assert paths and all(p.startswith(str(tmp_path / "job")) for p in paths), paths


# -- rendered job files ---------------------------------------------------------------------------

def render(tmp_path, monkeypatch, *args: str) -> tuple[str, str, list[str]]:
    """The submit file, the job script and the job's law arguments for branch 0, as law makes
    them at submission (no pool needed)."""
    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("CKPT_TASKS_BUNDLE_CACHE", str(bundle.default_cache_dir()))
    if "--store" not in args:  # workers without a shared file system need a remote store
        args = ("--store", "root://127.0.0.1:1094//ckpt", *args)
    return render_job_files("store", *args)


def test_bundle_route_job_script_names_no_path_of_the_submit_side(tmp_path, monkeypatch, env_bundle):
    submit, script, _ = render(tmp_path, monkeypatch, "--software", "bundle")
    assert "{{" not in script
    assert str(ROOT) not in script and str(tmp_path) not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    inputs = re.search(r"^transfer_input_files = (.*)$", submit, re.M).group(1).split(",")
    assert str(env_bundle.path) in inputs
    code = next(Path(p) for p in inputs if Path(p).name.startswith("code-"))
    assert f'"{code.name}" "{code.stat().st_size}" "{bundle.sha256_of(code)}"' in script
    assert f'"{env_bundle.path.name}" "{env_bundle.size}" "{env_bundle.sha256}"' in script
    # the model comes back to its submit-side path
    remaps = re.search(r'^transfer_output_remaps = "(.*)"$', submit, re.M).group(1).split(" ; ")
    assert f"{software.JOB_DATA_DIR} = {tmp_path / 'data'}" in remaps, remaps
    assert re.search(rf"^transfer_output_files = {software.JOB_DATA_DIR}$", submit, re.M)
    # the job's logs keep law's per-job names
    assert re.search(r"^output = stdout_0To1\.txt$", submit, re.M), submit


def test_shared_route_is_the_default_and_runs_the_checkout(tmp_path, monkeypatch):
    submit, script, _ = render(tmp_path, monkeypatch)
    assert 'software="shared"' in script and f'project="{ROOT}"' in script
    assert "code-" not in submit and software.JOB_DATA_DIR not in submit


def test_container_route_needs_an_image(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="container-image"):
        render(tmp_path, monkeypatch, "--software", "container")


def run_job_script(script: str, sandbox: Path, path: str = "/usr/bin:/bin") -> subprocess.CompletedProcess:
    args = [base64.b64encode(a.encode()).decode() for a in ("", "0")]
    return subprocess.run(["bash", "-c", script, "job.sh", "workflows.train", "TrainTask", *args, "1", "no", ""],
                          cwd=sandbox, capture_output=True, text=True, timeout=120,
                          env={"PATH": path, "_CONDOR_SCRATCH_DIR": str(sandbox)})


def container_job(tmp_path, monkeypatch, python3: str) -> tuple[str, Path, str]:
    """The container route's job script, a sandbox holding its code bundle as transferred,
    and a PATH whose ``python3`` (the image's Python) is the shell script ``python3``."""
    _, script, _ = render(tmp_path, monkeypatch, "--software", "container", "--container-image",
                          "docker://example.org/ckpt_tasks:1")
    name = re.search(r'check_and_unpack "(code-[0-9a-f]+\.tar\.gz)"', script).group(1)
    sandbox, image_bin = tmp_path / "sandbox", tmp_path / "image-bin"
    sandbox.mkdir()
    image_bin.mkdir()
    shutil.copy(bundle.default_cache_dir() / name, sandbox / name)
    (image_bin / "python3").write_text("#!/bin/sh\n" + python3)
    (image_bin / "python3").chmod(0o755)
    return script, sandbox, f"{image_bin}:/usr/bin:/bin"


def test_job_names_an_environment_that_cannot_import_torch(tmp_path, monkeypatch):
    script, sandbox, path = container_job(
        tmp_path, monkeypatch, "echo \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1\n")
    result = run_job_script(script, sandbox, path)
    assert result.returncode == software.SOFTWARE_EXIT_CODE, result.stdout + result.stderr
    assert "cannot import torch, law and luigi" in result.stderr and "No module named 'torch'" in result.stderr


def test_job_restarted_in_its_sandbox_reuses_the_unpacked_code(tmp_path, monkeypatch):
    """An exit-85 restart runs job.sh again in the same sandbox, where the bundle is gone."""
    script, sandbox, path = container_job(tmp_path, monkeypatch, 'echo "python3 $*" >> "$PWD/calls.txt"\n')
    for run in (1, 2):
        result = run_job_script(script, sandbox, path)
        assert result.returncode == 0, f"run {run}:\n{result.stdout}{result.stderr}"
    assert not list(sandbox.glob("code-*.tar.gz"))
    assert (sandbox / "ckpt_software" / "code" / "law.cfg").is_file()
    runs = [line for line in (sandbox / "calls.txt").read_text().splitlines() if " -m law run " in line]
    assert len(runs) == 2 and all("--branch=0" in line for line in runs), runs


def test_container_requirements_pin_what_the_environment_bundle_ships():
    pins = [line for line in (ROOT / "containers" / "requirements.txt").read_text().splitlines()
            if line and not line.startswith(("#", "-"))]
    assert pins == envbundle.pinned_requirements()


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing from the sandbox"),
    ("truncated", "expected"),
    ("corrupt", "sha256"),
])
def test_job_refuses_a_bad_bundle_before_unpacking(tmp_path, monkeypatch, damage, message):
    _, script, _ = render(tmp_path, monkeypatch, "--software", "container", "--container-image",
                          "docker://example.org/ckpt_tasks:1")
    code = next(bundle.default_cache_dir().glob(re.search(r'check_and_unpack "(code-[0-9a-f]+\.tar\.gz)"',
                                                          script).group(1)))
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    if damage != "missing":
        data = bytearray(code.read_bytes())
        if damage == "truncated":
            data = data[:-10]
        else:
            data[len(data) // 2] ^= 0xFF
        (sandbox / code.name).write_bytes(bytes(data))
    result = run_job_script(script, sandbox)
    assert result.returncode == software.SOFTWARE_EXIT_CODE, result.stdout + result.stderr
    assert message in result.stderr and code.name in result.stderr
    assert not (sandbox / "ckpt_software" / "code" / "law.cfg").exists()  # nothing unpacked


# -- on the real pool ----------------------------------------------------------------------------

from test_htcondor_workflow import (assert_resumed_in_a_new_sandbox, condor_jobs,  # noqa: E402,F401
                                    htcondor_pool, in_pool_env, job_logs, local_reference, mine, pool,
                                    render_job_files, start_in_pool, workdir)
from test_train_task import weights_digest  # noqa: E402
from waiting import wait_until  # noqa: E402

from helpers import isolated_pool  # noqa: E402

POOL_DIR = Path(os.environ.get("CKPT_TASKS_POOL_DIR", "/var/cache/ckpt_tasks/htcondor-pool"))
POOL_SH = ROOT / "scripts" / "htcondor_pool.sh"
TRAIN = ("--epochs", "2")
EVICTED_TRAIN = ("--epochs", "4", "--checkpoint-every", "10", "--step-delay", "0.05")


@pytest.fixture(scope="module")
def isolated(htcondor_pool):
    """Isolated jobs in the pool, and the paths they must not see: the checkout (with its
    venv and the submit side's data) and the installation the venv's Python comes from."""
    isolated_pool.install(POOL_SH, POOL_DIR)
    base = Path(subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"],
                               capture_output=True, text=True, check=True).stdout.strip()).resolve()
    hidden = [ROOT, base.parents[1] if base.parent.name == "versions" else base]
    return hidden


def evict_after_a_checkpoint(server, workdir: Path, hard: bool = False) -> None:
    """Once branch 0 has committed a checkpoint past step 10, evict its job: SIGTERM, or with
    ``hard`` a SIGKILL of all its processes at once (``condor_vacate_job -fast``)."""
    def checkpoint_past_10():
        steps = [int(m.group(1)) for p in server.data_dir.glob("ckpt/TrainTask/*/branch-0/*.json")
                 if (m := re.match(r"step-(\d+)-", p.name))]
        return steps and max(steps) > 10

    wait_until(checkpoint_past_10, 300, "a checkpoint of branch 0 past step 10")
    (job,) = condor_jobs(workdir, "JobStatus == 2")
    pool("exec", f"condor_vacate_job {'-fast ' if hard else ''}{job['ClusterId']}.{job['ProcId']}")


def submit_probe(workdir: Path, script: str) -> str:
    """Run ``script`` as an isolated job submitted from ``workdir``; its stdout and stderr."""
    (workdir / "probe.sh").write_text("#!/bin/sh\n" + script)
    (workdir / "probe.sub").write_text(
        f"executable = probe.sh\n+{isolated_pool.ISOLATED_ATTRIBUTE} = true\noutput = probe.out\n"
        "error = probe.out\nlog = probe.log\nshould_transfer_files = YES\nrequest_memory = 50MB\n"
        "request_disk = 10MB\nqueue\n")
    os.chmod(workdir / "probe.sh", 0o755)
    user = pwd.getpwnam("ckptuser")
    for name in ("probe.sh", "probe.sub"):
        os.chown(workdir / name, user.pw_uid, user.pw_gid)
    pool("exec", f"cd {workdir} && condor_submit probe.sub && condor_wait -wait 120 probe.log", timeout=180)
    return (workdir / "probe.out").read_text()


def test_isolated_jobs_cannot_read_the_checkout_or_the_venvs_python(isolated, workdir):
    with isolated_pool.denied(isolated):
        out = submit_probe(workdir, "id -un; for p in \"$@\" " + " ".join(map(str, isolated)) +
                           "; do ls \"$p\" >/dev/null 2>&1 && echo \"sees $p\" || echo \"blind $p\"; done\n")
    assert out.splitlines()[0] == isolated_pool.ISOLATED_USER, out
    for path in isolated:
        assert f"blind {path}" in out, out


@pytest.mark.xrootd
@pytest.mark.parametrize("source, eviction", [("transfer", "none"), ("transfer", "graceful"), ("store", "hard")])
def test_bundle_route_branch_finishes_where_the_job_sees_nothing_of_the_submit_side(
        isolated, workdir, tmp_path, make_xrootd_server, source, eviction):
    """The bundles come by HTCondor's transfer or from the bundle store; the environment is
    unpacked into a fresh worker cache by the first sandbox and used from there by the next
    (after an eviction)."""
    server = make_xrootd_server()
    user = pwd.getpwnam("ckptuser")
    cache = ROOT / ".pool-tmp" / "bundle-cache"
    cache.mkdir(parents=True, exist_ok=True)
    os.chown(cache, user.pw_uid, user.pw_gid)
    # The environment bundle built here is the one the pool's law would build (same venv):
    # put it in the pool's cache so that the test does not build it twice.
    env = envbundle.build_env_bundle(bundle.default_cache_dir())
    for built in (env.path, env.path.with_name(env.path.name + ".sha256")):
        if not (cache / built.name).exists():
            shutil.copy2(built, cache / built.name)
    # The route comes from law.cfg, as a site would set it.
    options = f"software: bundle\nbundle_cache: {cache}\nworker_cache: /tmp/ckpt_tasks-{workdir.name}\n"
    if source == "store":
        options += f"bundle_store: {server.url}//bundles\n"
    config = re.sub(r"^software: .*$", options + f"+{isolated_pool.ISOLATED_ATTRIBUTE}: true",
                    (ROOT / "law.cfg").read_text(), flags=re.M)
    assert "software: bundle" in config
    (workdir / "law.cfg").write_text(config)
    train = TRAIN if eviction == "none" else EVICTED_TRAIN
    command = (in_pool_env(workdir) + f"export LAW_CONFIG_FILE={workdir}/law.cfg; law index --quiet && "
               f"law run TrainTask --workflow htcondor --branches 0 {' '.join(train)} "
               f"--store {server.url}//ckpt --poll-interval 0.5 --retries 0 "
               f"--request-memory 2GB --request-disk 4GB")
    with isolated_pool.denied(isolated):
        runner = start_in_pool(command, workdir)
        try:
            if eviction != "none":
                evict_after_a_checkpoint(server, workdir, hard=eviction == "hard")
            runner.wait(timeout=540)
        finally:
            if runner.poll() is None:
                runner.kill()
    law_log = (workdir / "law.log").read_text()
    assert runner.returncode == 0, law_log[-5000:]
    log = job_logs(workdir)[0]
    unpacked = re.findall(r"software \(bundle\) checked and unpacked in ([\d.]+) s; environment: (.*)", log)
    assert unpacked, log[-3000:]
    logging.getLogger(__name__).info("bundle route (%s): software phase of each start: %s", source, unpacked)
    if eviction != "none":
        # the log is the last sandbox's: it took the environment from the worker cache that the
        # first sandbox filled, and resumed from the store
        assert unpacked[-1][1].endswith("(hit)"), unpacked
        assert_resumed_in_a_new_sandbox(log)
    else:
        assert unpacked[0][1].startswith("unpacked into the worker cache"), unpacked
    inputs = pool("exec", f"condor_history -constraint '{mine(workdir)}' -af TransferInput").strip()
    assert inputs, "no job of this workflow in condor_history"
    if source == "store":  # HTCondor transferred no bundle: the job fetched them from the store
        assert "env-" not in inputs and "code-" not in inputs, inputs
        assert list(server.data_dir.glob("bundles/env-*.tar.gz"))
    else:
        assert "env-" in inputs, inputs
    (model,) = workdir.glob("data/TrainTask/*/branch-0/model.pt")
    assert weights_digest(model) == local_reference(tmp_path, 0, *train[:2])
    # the checkpoints went to the store, not to the submit side
    assert list(server.data_dir.glob("ckpt/TrainTask/*/branch-0/*.json"))


def test_container_route_submit_file_passes_condor_submit_dry_run(htcondor_pool, workdir):
    """HTCondor parses the container route's submit file: container universe, the image, the
    code bundle as input; Apptainer and Docker are not installed here, so nothing runs."""
    image = "docker://registry.example.org/ckpt_tasks:1"
    script = (in_pool_env(workdir) + f"export CKPT_TASKS_BUNDLE_CACHE={workdir}/cache; python - <<'EOF'\n"
              "from workflows.train import TrainTask\n"
              "from luigi.cmdline_parser import CmdlineParser\n"
              "from law.job.dashboard import NoJobDashboard\n"
              "with CmdlineParser.global_instance(['TrainTask', '--workflow', 'htcondor']):\n"
              f"    task = TrainTask(workflow='htcondor', software='container', container_image='{image}',\n"
              "                     store='root://127.0.0.1:1094//ckpt')\n"
              "    proxy = task.workflow_proxy\n"
              "    proxy.job_file_factory = proxy.create_job_file_factory()\n"
              "    proxy.dashboard = NoJobDashboard()\n"
              "    print('JOBFILE', proxy.create_job_file(0, [0])['job'])\n"
              "EOF\n")
    (job_file,) = re.findall(r"JOBFILE (\S+)", pool("exec", script))
    ad = dict(re.findall(r"^(\w+) ?= ?(.*)$", pool("exec", f"cd {os.path.dirname(job_file)} && "
                                                           f"condor_submit -dry-run - {job_file}"), re.M))
    assert ad["ContainerImage"] == f'"{image}"' and ad["WantContainer"] == "true", ad
    assert re.search(r"code-[0-9a-f]{16}\.tar\.gz", ad["TransferInput"]) and "env-" not in ad["TransferInput"]
    assert ad["TransferOutput"] == '"ckpt_data"' and "ckpt_data = " in ad["TransferOutputRemaps"], ad


def test_a_corrupt_bundle_holds_the_job_with_the_reason(htcondor_pool, workdir):
    """A bundle whose bytes changed after submission: the job checks it, exits 87 and HTCondor
    holds it (code 3, subcode 87) with a reason, instead of running it again."""
    cache = workdir / "cache"
    cache.mkdir()
    env = envbundle.build_env_bundle(bundle.default_cache_dir())
    for source in (env.path, env.path.with_name(env.path.name + ".sha256")):
        os.link(source, cache / source.name)  # read-only use; no 300 MB copy
    user = pwd.getpwnam("ckptuser")
    os.chown(cache, user.pw_uid, user.pw_gid)
    script = (in_pool_env(workdir) + f"export CKPT_TASKS_BUNDLE_CACHE={cache}; python - <<'EOF'\n"
              "from workflows.train import TrainTask\n"
              "from luigi.cmdline_parser import CmdlineParser\n"
              "from law.job.dashboard import NoJobDashboard\n"
              "with CmdlineParser.global_instance(['TrainTask', '--workflow', 'htcondor']):\n"
              "    task = TrainTask(workflow='htcondor', software='bundle', request_disk='4GB',\n"
              "                     store='root://127.0.0.1:1094//ckpt')\n"
              "    proxy = task.workflow_proxy\n"
              "    proxy.job_file_factory = proxy.create_job_file_factory()\n"
              "    proxy.dashboard = NoJobDashboard()\n"
              "    print('JOBFILE', proxy.create_job_file(0, [0])['job'])\n"
              "EOF\n")
    (job_file,) = re.findall(r"JOBFILE (\S+)", pool("exec", script))
    (code,) = cache.glob("code-*.tar.gz")
    data = bytearray(code.read_bytes())
    data[len(data) // 2] ^= 0xFF
    code.write_bytes(bytes(data))
    out = pool("exec", f"cd {os.path.dirname(job_file)} && condor_submit {job_file}")
    cluster = re.search(r"submitted to cluster (\d+)", out).group(1)
    try:
        def held():
            ad = pool("exec", f"condor_q {cluster} -af JobStatus HoldReasonCode HoldReasonSubCode").split()
            return ad if ad and ad[0] == "5" else None

        ad = wait_until(held, 120, "the job to be held")
        reason = pool("exec", f"condor_q {cluster} -af HoldReason")
    finally:
        pool("exec", f"condor_rm {cluster}", check=False)
    assert ad[1:] == ["3", str(software.SOFTWARE_EXIT_CODE)], ad
    assert "software is unusable" in reason, reason
    (stderr,) = (workdir / "data" / "htcondor").glob("TrainTask/*/stderr_0To1.txt")
    assert f"software bundle {code.name}: sha256" in stderr.read_text()


# -- the worker's cache of unpacked environments, the bundle store, the retention ------------------

@pytest.fixture
def law_option():
    """Set options of law.cfg's [ckpt_tasks_htcondor] for one test (the workflow reads them at
    submission, in this process); removed again after."""
    import law

    cfg, added = law.config.Config.instance(), []

    def set_option(option: str, value: str) -> None:
        cfg.set("ckpt_tasks_htcondor", option, value)
        added.append(option)

    yield set_option
    for option in added:
        cfg.remove_option("ckpt_tasks_htcondor", option)


def bundle_job(tmp_path, monkeypatch, *args: str) -> tuple[str, dict]:
    """The bundle route's job script and its bundles by render key (name, size, sha256)."""
    _, script, _ = render(tmp_path, monkeypatch, "--software", "bundle", *args)
    found = re.findall(r'"(\S+\.tar\.gz)" "(\d+)" "([0-9a-f]{64})"', script)
    bundles = {("env" if name.startswith("env-") else "code"): (name, int(size), sha)
               for name, size, sha in found}
    assert set(bundles) == {"env", "code"}, found
    return script, bundles


def transferred(sandbox: Path, *names: str) -> Path:
    """A sandbox holding ``names`` from the bundle cache, as HTCondor's transfer leaves them."""
    sandbox.mkdir(parents=True)
    for name in names:
        os.link(bundle.default_cache_dir() / name, sandbox / name)
    return sandbox


def run_bundle_job(script: str, sandbox: Path, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """job.sh with no branch to run: the software phase and the import check only."""
    empty = base64.b64encode(b"").decode()
    return subprocess.run(["bash", "-c", script, "job.sh", "workflows.train", "TrainTask", empty, empty, "1",
                           "no", ""], cwd=sandbox, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "_CONDOR_SCRATCH_DIR": str(sandbox),
                               "CKPT_TASKS_WORKER_CACHE": str(cache), **env})


def software_line(result: subprocess.CompletedProcess) -> tuple[float, str]:
    """Seconds of the software phase and where the environment came from, from the job's log."""
    match = re.search(r"software \(bundle\) checked and unpacked in ([\d.]+) s; environment: (.*)", result.stdout)
    assert result.returncode == 0 and match, result.stdout + result.stderr
    return float(match.group(1)), match.group(2)


def test_the_environment_is_unpacked_once_per_worker_and_later_jobs_use_it(tmp_path, monkeypatch, env_bundle):
    script, bundles = bundle_job(tmp_path, monkeypatch)
    (env_name, _, env_sha), (code_name, _, _) = bundles["env"], bundles["code"]
    cache = tmp_path / "worker-cache"
    first = run_bundle_job(script, transferred(tmp_path / "job1", env_name, code_name), cache)
    _, source = software_line(first)
    entry = cache / f"env-{env_sha[:16]}"
    assert source.startswith("unpacked into the worker cache"), source
    assert (entry / ".ckpt_tasks-complete").read_text().strip() == env_sha
    assert not (tmp_path / "job1" / "ckpt_software" / "env").exists()  # not in the sandbox as well
    assert (cache.stat().st_mode & 0o777) == 0o700
    # a later job on this worker: the tree is used as it is, the transferred bundle not even read
    second = run_bundle_job(script, transferred(tmp_path / "job2", env_name, code_name), cache)
    seconds, source = software_line(second)
    assert source.endswith("(hit)") and seconds < 2.0, (seconds, source)
    assert not (tmp_path / "job2" / env_name).exists()


def test_a_half_unpacked_or_foreign_tree_in_the_worker_cache_is_never_used(tmp_path, monkeypatch, env_bundle):
    script, bundles = bundle_job(tmp_path, monkeypatch)
    (env_name, _, env_sha), (code_name, _, _) = bundles["env"], bundles["code"]
    cache = tmp_path / "worker-cache"
    entry = cache / f"env-{env_sha[:16]}"
    # a job killed while renaming (a tree, no marker) and one killed while unpacking
    (entry / "bin").mkdir(parents=True)
    (entry / "bin" / "python").write_text("#!/bin/sh\nexit 3\n")
    (cache / f".unpacking-{env_sha[:16]}-dead00").mkdir()
    cache.chmod(0o700)
    _, source = software_line(run_bundle_job(script, transferred(tmp_path / "job", env_name, code_name), cache))
    assert source.startswith("unpacked into the worker cache"), source
    assert (entry / ".ckpt_tasks-complete").read_text().strip() == env_sha
    assert not list(cache.glob(".unpacking-*"))
    # a marker of another bundle is no marker of this one
    (entry / ".ckpt_tasks-complete").write_text("0" * 64 + "\n")
    _, source = software_line(run_bundle_job(script, transferred(tmp_path / "job2", env_name, code_name), cache))
    assert source.startswith("unpacked into the worker cache"), source


def test_a_worker_cache_others_may_write_is_not_used(tmp_path, monkeypatch, env_bundle):
    script, bundles = bundle_job(tmp_path, monkeypatch)
    cache = tmp_path / "worker-cache"
    cache.mkdir()
    cache.chmod(0o777)  # anyone could put a tree of their own there
    result = run_bundle_job(script, transferred(tmp_path / "job", bundles["env"][0], bundles["code"][0]), cache)
    _, source = software_line(result)
    assert source.startswith("sandbox (worker cache") and "not usable" in source, source
    assert (tmp_path / "job" / "ckpt_software" / "env" / "bin" / "python").is_file()
    assert not list(cache.iterdir())


def test_two_jobs_starting_at_once_unpack_the_environment_once(tmp_path, monkeypatch, env_bundle):
    script, bundles = bundle_job(tmp_path, monkeypatch)
    cache = tmp_path / "worker-cache"
    empty = base64.b64encode(b"").decode()
    jobs = []
    for n in (1, 2):
        sandbox = transferred(tmp_path / f"job{n}", bundles["env"][0], bundles["code"][0])
        jobs.append(subprocess.Popen(
            ["bash", "-c", script, "job.sh", "workflows.train", "TrainTask", empty, empty, "1", "no", ""],
            cwd=sandbox, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PATH": "/usr/bin:/bin", "_CONDOR_SCRATCH_DIR": str(sandbox), "CKPT_TASKS_WORKER_CACHE": str(cache)}))
    results = [subprocess.CompletedProcess(job.args, job.wait(timeout=600), *job.communicate()) for job in jobs]
    sources = [software_line(result)[1] for result in results]
    assert sorted(s.endswith("(hit)") for s in sources) == [False, True], sources
    assert sum(s.startswith("unpacked into the worker cache") for s in sources) == 1, sources


def test_the_worker_cache_keeps_recent_and_locked_environments(tmp_path, monkeypatch, env_bundle, law_option):
    law_option("worker_cache_keep", "1")
    law_option("worker_cache_days", "14")
    script, bundles = bundle_job(tmp_path, monkeypatch)
    cache = tmp_path / "worker-cache"
    cache.mkdir(mode=0o700)
    old = 40 * 86400
    for name, age in (("env-0000000000000old", old), ("env-00000000000recent", 3600), ("env-000000000inuse", old)):
        (cache / name).mkdir()
        marker = cache / name / ".ckpt_tasks-complete"
        marker.write_text("x\n")
        os.utime(marker, (marker.stat().st_mtime - age,) * 2)
    # a job still running with an old environment holds its lock (shared)
    holder = subprocess.Popen(["flock", "-s", str(cache / "env-000000000inuse.lock"), "sleep", "300"])
    try:
        wait_until(lambda: (cache / "env-000000000inuse.lock").exists(), 10, "the lock holder")
        result = run_bundle_job(script, transferred(tmp_path / "job", bundles["env"][0], bundles["code"][0]), cache)
    finally:
        holder.kill()
        holder.wait()
    software_line(result)
    left = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert left == sorted(["env-000000000inuse", "env-00000000000recent", f"env-{bundles['env'][2][:16]}"]), left
    assert "removed" in result.stdout and "env-0000000000000old" in result.stdout


def test_a_job_using_an_entry_does_not_hold_up_the_next_job_that_unpacks_it(tmp_path, monkeypatch, env_bundle):
    """A live job keeps its shared "in use" lock on the entry for its whole life; another job
    that finds the entry incomplete unpacks under a lock of its own and does not wait for it."""
    script, bundles = bundle_job(tmp_path, monkeypatch)
    cache = tmp_path / "worker-cache"
    cache.mkdir(mode=0o700)
    in_use = cache / f"env-{bundles['env'][2][:16]}.lock"
    holder = subprocess.Popen(["flock", "-s", str(in_use), "sleep", "300"])  # job 1, still running
    try:
        wait_until(lambda: in_use.exists(), 10, "the lock holder")
        started = time.monotonic()
        result = subprocess.run(
            ["bash", "-c", script, "job.sh", "workflows.train", "TrainTask", "", "", "1", "no", ""],
            cwd=transferred(tmp_path / "job2", bundles["env"][0], bundles["code"][0]), capture_output=True,
            text=True, timeout=240, env={"PATH": "/usr/bin:/bin", "_CONDOR_SCRATCH_DIR": str(tmp_path / "job2"),
                                         "CKPT_TASKS_WORKER_CACHE": str(cache)})
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    _, source = software_line(result)
    assert source.startswith("unpacked into the worker cache"), source
    assert elapsed < 120, elapsed  # the unpacking itself, not a wait of up to 30 minutes


def fake_bin(tmp_path: Path, flock: str | None) -> str:
    """A PATH like /usr/bin but whose ``flock`` is the shell script ``flock`` (None: no flock)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name != "flock":
            (bin_dir / tool.name).symlink_to(tool)
    if flock is not None:
        (bin_dir / "flock").write_text("#!/bin/bash\n" + flock)
        (bin_dir / "flock").chmod(0o755)
    return str(bin_dir)


def test_a_lock_that_cannot_be_had_leaves_the_worker_cache_alone(tmp_path, monkeypatch, env_bundle):
    # Test double: a flock whose exclusive lock times out (the real one would wait 30 minutes).
    path = fake_bin(tmp_path, 'case "$1" in -x) exit 1 ;; *) exec /usr/bin/flock "$@" ;; esac\n')
    script, bundles = bundle_job(tmp_path, monkeypatch)
    cache = tmp_path / "worker-cache"
    other = cache / f".unpacking-{bundles['env'][2][:16]}-other1"  # another job, unpacking right now
    (other / "env").mkdir(parents=True)
    cache.chmod(0o700)
    result = run_bundle_job(script, transferred(tmp_path / "job", bundles["env"][0], bundles["code"][0]), cache,
                            PATH=path)
    _, source = software_line(result)
    assert source.startswith("sandbox (worker cache") and "not usable" in source, source
    assert (tmp_path / "job" / "ckpt_software" / "env" / "bin" / "python").is_file()
    assert (other / "env").is_dir()  # never removed unlocked
    assert not (cache / f"env-{bundles['env'][2][:16]}").exists()


def test_without_flock_the_worker_cache_is_neither_used_nor_pruned(tmp_path, monkeypatch, env_bundle, law_option):
    law_option("worker_cache_keep", "1")
    law_option("worker_cache_days", "1")
    script, bundles = bundle_job(tmp_path, monkeypatch)
    cache = tmp_path / "worker-cache"
    marker = cache / "env-0000000000000old" / ".ckpt_tasks-complete"
    marker.parent.mkdir(parents=True)
    marker.write_text("x\n")
    os.utime(marker, (marker.stat().st_mtime - 40 * 86400,) * 2)
    cache.chmod(0o700)
    result = run_bundle_job(script, transferred(tmp_path / "job", bundles["env"][0], bundles["code"][0]), cache,
                            PATH=fake_bin(tmp_path, None))
    _, source = software_line(result)
    assert source.startswith("sandbox (worker cache"), source
    assert sorted(p.name for p in cache.iterdir()) == ["env-0000000000000old"]
    assert marker.is_file()


def test_a_worker_cache_below_a_directory_others_may_write_is_not_used(tmp_path, monkeypatch, env_bundle):
    script, bundles = bundle_job(tmp_path, monkeypatch)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone could rename the cache away and put theirs there
    result = run_bundle_job(script, transferred(tmp_path / "job", bundles["env"][0], bundles["code"][0]),
                            shared / "cache")
    _, source = software_line(result)
    assert source.startswith("sandbox (worker cache") and "not usable" in source, source
    # new directories on the way to the cache are this account's alone, whatever the umask
    cache = tmp_path / "new" / "deep" / "cache"
    result = subprocess.run(["bash", "-c", "umask 022; exec \"$@\"", "sh", "bash", "-c", script, "job.sh",
                             "workflows.train", "TrainTask", "", "", "1", "no", ""],
                            cwd=transferred(tmp_path / "job2", bundles["env"][0], bundles["code"][0]),
                            capture_output=True, text=True, timeout=600,
                            env={"PATH": "/usr/bin:/bin", "_CONDOR_SCRATCH_DIR": str(tmp_path / "job2"),
                                 "CKPT_TASKS_WORKER_CACHE": str(cache)})
    _, source = software_line(result)
    assert source.startswith("unpacked into the worker cache"), source
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "new", tmp_path / "new" / "deep", cache)}
    assert modes == {"new": 0o700, "deep": 0o700, "cache": 0o700}, modes


def test_the_worker_cache_retention_counts_fractions_of_a_day(tmp_path, monkeypatch, env_bundle, law_option):
    law_option("worker_cache_keep", "1")
    law_option("worker_cache_days", "0.5")
    script, bundles = bundle_job(tmp_path, monkeypatch)
    cache = tmp_path / "worker-cache"
    cache.mkdir(mode=0o700)
    for name, hours in (("env-000000000013hours", 13), ("env-000000000011hours", 11)):
        marker = cache / name / ".ckpt_tasks-complete"
        marker.parent.mkdir()
        marker.write_text("x\n")
        os.utime(marker, (marker.stat().st_mtime - hours * 3600,) * 2)
    result = run_bundle_job(script, transferred(tmp_path / "job", bundles["env"][0], bundles["code"][0]), cache)
    software_line(result)
    left = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert left == sorted(["env-000000000011hours", f"env-{bundles['env'][2][:16]}"]), left
    assert "unused for 0.5 days" in result.stdout


def test_the_submit_side_cache_keeps_the_last_used_and_the_recent_bundles(tmp_path):
    from ckpt_tasks.htcondor.bundlecache import Retention, prune

    now = 1_000_000_000.0
    ages = {"code-a": 1, "code-b": 2, "code-c": 30, "code-d": 40, "env-x": 50, "env-y": 60}
    for name, days in ages.items():
        path = tmp_path / f"{name}.tar.gz"
        path.write_bytes(b"x")
        path.with_name(path.name + ".sha256").write_text("x\n")
        os.utime(path, (now - days * 86400,) * 2)
    (tmp_path / ".code-123.tar.gz").write_bytes(b"half")  # a build killed halfway
    os.utime(tmp_path / ".code-123.tar.gz", (now - 2 * 86400,) * 2)
    removed = prune(tmp_path, Retention(keep=1, days=14), now=now)
    # code: a is the last used, b is recent; c and d are neither. env: x is the last used.
    assert sorted(p.name for p in removed) == ["code-c.tar.gz", "code-d.tar.gz", "env-y.tar.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "code-a.tar.gz", "code-a.tar.gz.sha256", "code-b.tar.gz", "code-b.tar.gz.sha256",
        "env-x.tar.gz", "env-x.tar.gz.sha256"]
    with pytest.raises(ValueError):
        Retention(keep=0)


def test_bad_software_settings_are_refused_at_submission():
    with pytest.raises(ValueError, match="root://"):
        software.Settings(bundle_store="/local/bundles")
    with pytest.raises(ValueError, match="query"):
        software.Settings(bundle_store="root://host//bundles?authz=secret")
    with pytest.raises(ValueError, match="worker_cache"):
        software.Settings(worker_cache='/tmp/x"; rm -rf /')
    for never_expanded in ("~/envs", "scratch/envs", "./envs"):
        with pytest.raises(ValueError, match="not ~ nor a relative path"):
            software.Settings(worker_cache=never_expanded)
    assert software.Settings(worker_cache="${HOME}/envs").worker_cache == "${HOME}/envs"
    assert software.Settings(worker_cache="/scratch/$USER/envs").worker_cache == "/scratch/$USER/envs"
    assert software.Settings(bundle_store="root://host//b/").bundle_store == "root://host//b"


@pytest.mark.xrootd
def test_bundles_on_the_store_are_fetched_only_when_missing_and_checked(tmp_path, monkeypatch, env_bundle,
                                                                        law_option, make_xrootd_server):
    server = make_xrootd_server()
    law_option("bundle_store", f"{server.url}//bundles")
    submit, _, _ = render(tmp_path, monkeypatch, "--software", "bundle")
    script, bundles = bundle_job(tmp_path, monkeypatch)
    (env_name, env_size, env_sha), (code_name, _, _) = bundles["env"], bundles["code"]
    # HTCondor transfers no bundle; both are on the store, named by their content
    inputs = re.search(r"^transfer_input_files = (.*)$", submit, re.M)
    assert not inputs or ("env-" not in inputs.group(1) and "code-" not in inputs.group(1)), submit
    assert env_sha[:16] in env_name and (server.data_dir / "bundles" / env_name).stat().st_size == env_size
    cache = tmp_path / "worker-cache"
    (tmp_path / "job1").mkdir()
    _, source = software_line(run_bundle_job(script, tmp_path / "job1", cache))
    assert source.startswith("unpacked into the worker cache"), source
    # the worker has it now: the next job fetches only the code bundle
    (tmp_path / "job2").mkdir()
    _, source = software_line(run_bundle_job(script, tmp_path / "job2", cache))
    assert source.endswith("(hit)"), source
    # a code bundle that rotted on the store: named, refused before use
    stored_code = server.data_dir / "bundles" / code_name
    data = bytearray(stored_code.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored_code.write_bytes(bytes(data))
    (tmp_path / "job3").mkdir()
    result = run_bundle_job(script, tmp_path / "job3", cache)
    assert result.returncode == software.SOFTWARE_EXIT_CODE, result.stdout + result.stderr
    assert f"software bundle {code_name}: sha256" in result.stderr
    # an environment missing from the store, on a worker that does not have it
    (server.data_dir / "bundles" / env_name).unlink()
    (tmp_path / "job4").mkdir()
    result = run_bundle_job(script, tmp_path / "job4", tmp_path / "other-worker-cache")
    assert result.returncode == software.SOFTWARE_EXIT_CODE, result.stdout + result.stderr
    assert f"software bundle {env_name}: cannot be fetched from {server.url}//bundles" in result.stderr
