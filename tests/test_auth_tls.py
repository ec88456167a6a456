"""``roots://``: the store over TLS, and TLS refusals (unknown CA, host name) on a real server."""
from __future__ import annotations

import pytest

from ckpt_tasks.storage.location import validate_location
from xrootd_auth import TestPKI, client_env, run_as

#: the store's retry deadline in the clients of the refusal tests; a refusal must beat it
DEADLINE = 4.0

@pytest.fixture(scope="module")
def tls_server(make_auth_server):
    """Anonymous users over TLS: the transport alone is under test here."""
    return make_auth_server(protocol=None, tls=True)


@pytest.fixture(scope="module")
def gsi_tls_server(make_auth_server, test_pki):
    alice = test_pki.user("tls-alice")
    server = make_auth_server(protocol="gsi", tls=True, authdb="u alice /alice a\n",
                              gridmap={alice.subject: "alice"})
    server.alice = alice
    return server


def test_validate_location_accepts_roots(tls_server):
    location = f"{tls_server.url}//runs/a"
    assert validate_location(location).startswith("roots://")


def test_store_saves_lists_and_restores_over_roots(tls_server, test_pki):
    location = f"{tls_server.url}//runs/store"
    env = client_env(test_pki)
    for step in (1, 2):
        saved = run_as(env, "save", location, str(step))
        assert saved["ok"], saved
    assert run_as(env, "list", location)["steps"] == [1, 2]
    restored = run_as(env, "restore", location)
    assert (restored["step"], restored["content"]) == (2, "step-2")
    # the server saw TLS connections, not plain ones
    logs = "".join(path.read_text(errors="replace") for path in tls_server.root.rglob("xrootd.log"))
    assert "upgraded to TLS" in logs


def test_gsi_over_tls(gsi_tls_server, test_pki, tmp_path):
    proxy = test_pki.proxy(gsi_tls_server.alice, tmp_path / "x509up")
    location = f"{gsi_tls_server.url}//alice/run"
    env = client_env(test_pki, proxy)
    assert run_as(env, "save", location, "5")["ok"]
    assert run_as(env, "restore", location)["content"] == "step-5"


def _refused(env: dict, location: str) -> dict:
    answer = run_as(env, "list", location)
    assert not answer["ok"], f"the client was not refused: {answer}"
    assert "TLS" in answer["message"], answer
    return answer


def _at_once(answer: dict) -> None:
    """A permanent error (the client's errTlsError, fatal), not an outage retried to the deadline."""
    assert "PermanentStorageError" in answer["errors"], answer
    assert answer["seconds"] < DEADLINE / 2


def test_an_unknown_ca_is_refused(tls_server):
    """A client that trusts another CA does not talk to the server at all."""
    stranger = TestPKI()
    try:
        answer = _refused(client_env(stranger, AUTH_TEST_DEADLINE=str(DEADLINE)), f"{tls_server.url}//runs/store")
    finally:
        stranger.cleanup()
    _at_once(answer)


def test_a_host_name_not_in_the_certificate_is_refused(tls_server, test_pki):
    """127.0.0.2 reaches the same server, whose certificate names localhost and 127.0.0.1 only."""
    location = f"roots://127.0.0.2:{tls_server.port}//runs/store"
    answer = _refused(client_env(test_pki, AUTH_TEST_DEADLINE=str(DEADLINE)), location)
    assert "127.0.0.2" in answer["message"]
    _at_once(answer)


def test_cli_and_law_targets_over_roots(tls_server, test_pki):
    """``ckpt-tasks ls`` and the law targets read a roots:// location like a root:// one."""
    import json
    import shutil
    import subprocess
    import sys

    location = f"{tls_server.url}//runs/tools"
    env = client_env(test_pki)
    assert run_as(env, "save", location, "4")["ok"]
    cli = shutil.which("ckpt-tasks") or "ckpt-tasks"
    listed = subprocess.run([cli, "ls", location, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [entry["step"] for entry in json.loads(listed.stdout)] == [4]
    probe = ("import sys; from ckpt_tasks.storage.targets import XRootDFileTarget, checkpoints_target\n"
             "print(XRootDFileTarget(sys.argv[1] + '/LATEST').exists(), checkpoints_target(sys.argv[1]).exists())")
    targets = subprocess.run([sys.executable, "-c", probe, location], env=env, capture_output=True, text=True,
                             timeout=60)
    assert targets.stdout.split() == ["True", "True"], targets.stderr[-2000:]
