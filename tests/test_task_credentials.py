"""`law run TrainTask` against a gsi server: a credential refused before or during training
leaves with EXIT_CREDENTIAL_REFUSED and says what to renew; a good one trains."""
from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest

from ckpt_tasks.stop import EXIT_CREDENTIAL_REFUSED
from test_train_task import LawRun, law_index  # noqa: F401
from xrootd_auth import client_env

ARGS = ("--branch", "0", "--epochs", "1", "--checkpoint-every", "5", "--storage-timeout", "20")


@pytest.fixture(scope="module")
def people(test_pki, tmp_path_factory):
    directory = tmp_path_factory.mktemp("task-proxies")
    alice = test_pki.user("alice")
    return {"alice": alice, "directory": directory}


@pytest.fixture(scope="module")
def gsi_server(make_auth_server, people):
    return make_auth_server(protocol="gsi", authdb="u alice /alice a\n",
                            gridmap={people["alice"].subject: "alice"})


def law_run_with(monkeypatch, tmp_path, test_pki, proxy, store, *extra):
    for key, value in client_env(test_pki, proxy).items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    run = LawRun(tmp_path, *ARGS, "--store", store, *extra)
    code = run.finish()
    return code, run.output, time.monotonic() - started


def test_an_expired_proxy_is_refused_before_training(monkeypatch, tmp_path, test_pki, people, gsi_server):
    proxy = test_pki.proxy(people["alice"], people["directory"] / "expired", lifetime=dt.timedelta(minutes=-1))
    code, output, seconds = law_run_with(monkeypatch, tmp_path, test_pki, proxy, f"{gsi_server.url}//alice/ckpt")
    assert code == EXIT_CREDENTIAL_REFUSED, output[-3000:]
    assert "refused before training (expired)" in output and "Renew the proxy or token" in output
    assert "starting from scratch" not in output
    assert not list(tmp_path.glob("TrainTask/*/branch-0/model.pt"))


def test_a_store_the_identity_may_not_write_is_refused_before_training(monkeypatch, tmp_path, test_pki, people,
                                                                        gsi_server):
    proxy = test_pki.proxy(people["alice"], people["directory"] / "valid")
    code, output, seconds = law_run_with(monkeypatch, tmp_path, test_pki, proxy, f"{gsi_server.url}//bob/ckpt")
    assert code == EXIT_CREDENTIAL_REFUSED, output[-3000:]
    assert "refused before training (storage)" in output
    assert seconds < 60, "a permission denied must not be retried for the storage timeout"
    assert "starting from scratch" not in output


def test_a_good_proxy_trains_and_commits(monkeypatch, tmp_path, test_pki, people, gsi_server):
    proxy = test_pki.proxy(people["alice"], people["directory"] / "good")
    code, output, _ = law_run_with(monkeypatch, tmp_path, test_pki, proxy, f"{gsi_server.url}//alice/good")
    assert code == 0, output[-3000:]
    assert "preflight:" in output and "training complete" in output
    assert proxy.read_text().split("-----BEGIN RSA PRIVATE KEY-----")[1][:40] not in output


def test_a_refused_final_commit_exits_88_other_failures_1(tmp_path):
    # The commit on a stop is caught by the Checkpointer (its failure must not claim 85);
    # a refused credential there must still say "held: renew it".
    from ckpt_tasks.errors import StorageAuthenticationFailed, StorageUnavailable
    from ckpt_tasks.state import TrainingState
    from ckpt_tasks.stop import EXIT_CHECKPOINT_FAILED
    from ckpt_tasks.storage.store import CheckpointStore
    from ckpt_tasks.tasks import TaskCheckpointer
    from ckpt_tasks.transfer import StoreTransfer

    state = TrainingState()
    transfer = StoreTransfer(CheckpointStore(tmp_path / "store"), step_of=lambda: state.step, params={})
    ckpt = TaskCheckpointer(tmp_path, state, transfer, handle_signals=False)
    assert ckpt.exit_code_for(StorageAuthenticationFailed("token expired", "root://h//p")) == EXIT_CREDENTIAL_REFUSED
    assert ckpt.exit_code_for(StorageUnavailable("down", "root://h//p")) == EXIT_CHECKPOINT_FAILED


# -- the HTCondor workflow's credentials (rendered here; on the pool: test_credentials_pool.py) ----------

def test_the_token_route_asks_for_the_service_s_token_instead_of_the_proxy(tmp_path, monkeypatch, test_pki, people):
    from test_htcondor_workflow import render_job_files

    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path))
    monkeypatch.setenv("X509_USER_PROXY", str(test_pki.proxy(people["alice"], tmp_path / "x509up")))
    submit, script, arguments = render_job_files("store", "--credentials", "token", "--oauth-service", "wlcg",
                                                 "--credential-min-lifetime", "600")
    assert "use_oauth_services = wlcg" in submit and "x509userproxy" not in submit, submit
    assert 'token_service="wlcg"' in script and 'min_lifetime="600"' in script
    # the credential options are the workflow's own, not passed to the branches
    assert not [a for a in arguments if a.startswith(("--credentials", "--oauth-service", "--credential-min"))]
    proxy_submit, proxy_script, _ = render_job_files("store")
    assert "x509userproxy = " in proxy_submit and "use_oauth_services" not in proxy_submit
    assert 'token_service=""' in proxy_script and 'min_lifetime=""' in proxy_script


def job_script_credentials(script: str) -> str:
    """The credentials part of a rendered job.sh."""
    start = script.index("# Credentials (")
    end = script.index("\n", script.index('export CKPT_TASKS_CREDENTIAL_MIN_LIFETIME="${min_lifetime}"'))
    return script[start:end]


@pytest.mark.parametrize("given, expected", [
    ({"_CONDOR_CREDS": "{creds}"}, "{creds}/scitokens.use"),
    ({"_CONDOR_CREDS": "{creds}", "BEARER_TOKEN_FILE": "/elsewhere/bt"}, "/elsewhere/bt"),  # the job's own wins
    ({}, ""),  # no credmon: a warning, no variable
])
def test_the_job_script_points_bearer_token_file_at_htcondor_s_token(tmp_path, monkeypatch, given, expected):
    import subprocess

    from test_htcondor_workflow import render_job_files

    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path))
    _, script, _ = render_job_files("store", "--credentials", "token", "--credential-min-lifetime", "120")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "scitokens.use").write_text("not a real token")
    env = {"PATH": "/usr/bin:/bin", **{k: v.format(creds=creds) for k, v in given.items()}}
    probe = job_script_credentials(script) + '\necho "TOKEN=${BEARER_TOKEN_FILE:-}" "MIN=${CKPT_TASKS_CREDENTIAL_MIN_LIFETIME:-}"\n'
    done = subprocess.run(["bash", "-u", "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert f"TOKEN={expected.format(creds=creds)} MIN=120" in done.stdout, done
    if not given:
        assert "no scitokens.use in _CONDOR_CREDS" in done.stderr and "credmon" in done.stderr
    assert "not a real token" not in done.stdout + done.stderr


def test_site_run_time_limits_are_the_expected_end_and_credential_options_are_no_submit_commands(
        tmp_path, monkeypatch):
    import law

    from ckpt_tasks.htcondor.credentials import expected_runtime
    from ckpt_tasks.htcondor.workflow import CONFIG_SECTION
    from test_htcondor_workflow import render_job_files

    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path))
    cfg = law.config.Config.instance()
    added = {"+MaxRuntime": "7200", "+RequestWalltime": "3600", "oauth_service": "wlcg", "expected_runtime": "60"}
    for option, value in added.items():
        cfg.set(CONFIG_SECTION, option, value)
    try:
        assert expected_runtime(0, CONFIG_SECTION) == 3600  # the earliest limit
        assert expected_runtime(90, CONFIG_SECTION) == 90  # --expected-runtime wins
        submit, _, _ = render_job_files("store")
    finally:
        for option in added:
            cfg.remove_option(CONFIG_SECTION, option)
    assert "+maxruntime = 7200" in submit.lower() and "+requestwalltime = 3600" in submit.lower()
    assert "oauth_service" not in submit and "expected_runtime" not in submit


def test_the_shared_route_names_the_submitter_s_files_and_never_a_token_itself(tmp_path, monkeypatch, test_pki,
                                                                             people, token_issuer):
    from test_htcondor_workflow import render_job_files
    from xrootd_auth import write_secret

    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path))
    proxy = test_pki.proxy(people["alice"], tmp_path / "x509up")
    token = write_secret(tmp_path / "bt", token_issuer.token("storage.read:/alice"))
    monkeypatch.setenv("X509_USER_PROXY", str(proxy))
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(token))
    submit, _, _ = render_job_files("store", "--credentials", "shared")
    assert f"X509_USER_PROXY={proxy}" in submit and f"BEARER_TOKEN_FILE={token}" in submit, submit
    assert "x509userproxy" not in submit and "use_oauth_services" not in submit
    monkeypatch.setenv("BEARER_TOKEN", token.read_text())  # the client's first choice: the token itself
    submit, _, _ = render_job_files("store", "--credentials", "shared")
    # never the token itself; the file beside it is what the jobs can read
    assert token.read_text() not in submit and f"BEARER_TOKEN_FILE={token}" in submit, submit
    assert f"X509_USER_PROXY={proxy}" in submit


def test_the_shared_route_warns_when_the_jobs_get_no_token_and_keeps_a_renewed_link(
        tmp_path, monkeypatch, caplog, test_pki, people, token_issuer):
    from test_htcondor_workflow import render_job_files

    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "no-runtime-dir"))
    monkeypatch.delenv("BEARER_TOKEN_FILE", raising=False)
    monkeypatch.setenv("BEARER_TOKEN", token_issuer.token("storage.read:/alice"))
    # renewals re-point a link: the jobs must be given the link, not today's target
    today = test_pki.proxy(people["alice"], tmp_path / "proxy.v1")
    link = tmp_path / "x509up"
    link.symlink_to(today.name)
    monkeypatch.setenv("X509_USER_PROXY", str(link))
    with caplog.at_level("WARNING", logger="ckpt_tasks"):
        submit, _, _ = render_job_files("store", "--credentials", "shared")
    assert f"X509_USER_PROXY={link}" in submit and "proxy.v1" not in submit, submit
    if not Path(f"/tmp/bt_u{os.getuid()}").exists():  # the client's last place to look
        assert "BEARER_TOKEN_FILE" not in submit
        assert "the jobs get no token" in caplog.text
    proxy_route, _, _ = render_job_files("store", "--credentials", "proxy")
    assert f"x509userproxy = {link}" in proxy_route or f"x509userproxy={link}" in proxy_route, proxy_route
