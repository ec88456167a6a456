"""Bearer tokens (``ztn`` over TLS, SciTokens authorization) and shared secrets (``sss``)
on real servers: what a token's scope allows, and refusals that name their cause."""
from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import time

import pytest

from xrootd_auth import ClientSession, client_env, make_keytab, run_as, write_secret

#: a refusal must come at once, not after the store's retry deadline (20 s in these clients)
PROMPT = 5.0
FULL = "storage.read:/alice storage.create:/alice storage.modify:/alice"


@pytest.fixture(scope="module")
def ztn_server(make_auth_server, token_issuer):
    return make_auth_server(protocol="ztn", tls=True, issuer=token_issuer)


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokens")


@pytest.fixture(scope="module")
def alice_run(ztn_server, token_issuer, test_pki, token_dir):
    location = f"{ztn_server.url}//alice/run"
    token = write_secret(token_dir / "full", token_issuer.token(FULL))
    answer = run_as(client_env(test_pki, BEARER_TOKEN_FILE=str(token)), "save", location, "1")
    assert answer["ok"], answer
    return location


def with_token(test_pki, token_dir, name, token):
    return client_env(test_pki, BEARER_TOKEN_FILE=str(write_secret(token_dir / name, token)))


def test_a_token_with_write_scope_saves_lists_and_restores(alice_run, token_issuer, test_pki, token_dir):
    env = with_token(test_pki, token_dir, "full2", token_issuer.token(FULL))
    assert run_as(env, "save", alice_run, "2")["ok"]
    assert run_as(env, "list", alice_run)["steps"] == [1, 2]
    assert run_as(env, "restore", alice_run)["content"] == "step-2"


def test_the_token_in_the_environment_works_too(alice_run, token_issuer, test_pki):
    """``BEARER_TOKEN`` (the token itself) is the client's first choice."""
    env = client_env(test_pki, BEARER_TOKEN=token_issuer.token("storage.read:/alice"))
    assert run_as(env, "list", alice_run)["ok"]


@pytest.mark.parametrize("scope, step, why", [
    ("storage.read:/alice", 7, "no write scope"),
    ("storage.read:/alice storage.create:/alice", 8, "create but not modify: the rename of a commit"),
    ("storage.read:/bob storage.create:/bob storage.modify:/bob", 9, "scopes for another path"),
])
def test_a_save_the_scope_does_not_cover_is_refused_at_once(alice_run, token_issuer, test_pki, token_dir,
                                                            scope, step, why):
    env = with_token(test_pki, token_dir, "partial", token_issuer.token(scope))
    answer = run_as(env, "save", alice_run, str(step))
    assert not answer["ok"], f"{why}: the save succeeded"
    assert answer["error"] == "StoragePermissionDenied", answer
    # the server's words: "permission denied", or "overwrite ... not permitted" for the pointer
    assert "3010" in answer["message"] and "permi" in answer["message"].lower()
    assert answer["seconds"] < PROMPT
    owner = with_token(test_pki, token_dir, "full3", token_issuer.token(FULL))
    if step == 8:
        # Creating new names is allowed, so the data and the manifest went up complete and
        # verified; only moving LATEST onto them was refused. What is listed is whole.
        restored = run_as(owner, "restore", alice_run)
        assert restored["content"] == f"step-{restored['step']}"
    else:
        assert step not in run_as(owner, "list", alice_run)["steps"]


def test_a_token_for_another_path_cannot_read(alice_run, token_issuer, test_pki, token_dir):
    env = with_token(test_pki, token_dir, "bob", token_issuer.token("storage.read:/bob", subject="bob"))
    for operation in ("list", "restore"):
        answer = run_as(env, operation, alice_run)
        assert answer["error"] == "StoragePermissionDenied", answer
        assert answer["seconds"] < PROMPT


@pytest.mark.parametrize("token_args, why", [
    ({"lifetime": -dt.timedelta(minutes=5)}, "expired"),
    ({"audience": "another-service"}, "for another audience"),
])
def test_a_token_the_server_does_not_accept_fails_at_once(alice_run, token_issuer, test_pki, token_dir,
                                                          token_args, why):
    env = with_token(test_pki, token_dir, "bad", token_issuer.token(FULL, **token_args))
    answer = run_as(env, "list", alice_run)
    assert not answer["ok"], f"a token {why} was accepted"
    assert answer["error"] in ("StorageAuthenticationFailed", "StoragePermissionDenied"), answer
    assert answer["seconds"] < PROMPT


def test_no_token_fails_at_once_naming_authentication(alice_run, test_pki):
    answer = run_as(client_env(test_pki), "list", alice_run)
    assert not answer["ok"]
    assert answer["error"] == "StorageAuthenticationFailed", answer
    assert answer["seconds"] < PROMPT


def test_a_token_expiring_mid_run_fails_the_next_connection_and_a_renewed_file_is_used(
        alice_run, token_issuer, test_pki, token_dir):
    """As with a proxy: the open connection outlives the token, the next one (the idle one
    closed after 1 s instead of 300) is refused at once, and a token file replaced in place
    (as HTCondor's credmon or htgettoken renew it) is read at the next connection."""
    lifetime = dt.timedelta(seconds=6)
    token = write_secret(token_dir / "short", token_issuer.token(FULL, lifetime=lifetime))
    expires = time.monotonic() + lifetime.total_seconds()
    session = ClientSession(client_env(test_pki, BEARER_TOKEN_FILE=str(token), XRD_DATASERVERTTL="1"), alice_run)
    try:
        assert session.do("save", "30")["ok"]
        time.sleep(max(0.0, expires - time.monotonic()) + 3)
        refused = session.do("save", "31")
        assert refused["error"] == "StorageAuthenticationFailed", refused
        assert refused["seconds"] < PROMPT
        os.replace(write_secret(token_dir / "renewed", token_issuer.token(FULL)), token)
        assert session.do("save", "32")["ok"]
    finally:
        session.close()


# -- sss: shared-secret keytabs -------------------------------------------------------------

@pytest.fixture(scope="module")
def keytabs(tmp_path_factory):
    """One server keytab with a key for alice and one for bob; each client holds its own key."""
    directory = tmp_path_factory.mktemp("keytabs")
    server = directory / "server.keytab"
    make_keytab(server, "alice", key_name="alice")
    make_keytab(server, "bob", key_name="bob")
    clients = {}
    for name, other in (("alice", "bob"), ("bob", "alice")):
        clients[name] = shutil.copy(server, directory / f"{name}.keytab")
        subprocess.run(["xrdsssadmin", "-k", other, "del", str(clients[name])], check=True,
                       capture_output=True, stdin=subprocess.DEVNULL)
    return server, clients


@pytest.fixture(scope="module")
def sss_server(make_auth_server, keytabs):
    return make_auth_server(protocol="sss", keytab=keytabs[0], authdb="u alice /alice a\nu bob /bob a\n")


def test_sss_owner_and_stranger(sss_server, keytabs):
    location = f"{sss_server.url}//alice/run"
    alice = client_env(keytab=keytabs[1]["alice"])
    bob = client_env(keytab=keytabs[1]["bob"])
    assert run_as(alice, "save", location, "1")["ok"]
    assert run_as(alice, "restore", location)["content"] == "step-1"
    for operation in (("list",), ("save", "2"), ("remove", "LATEST")):
        answer = run_as(bob, operation[0], location, *operation[1:])
        assert answer["error"] == "StoragePermissionDenied", (operation, answer)
        assert answer["seconds"] < PROMPT
    assert run_as(alice, "list", location)["steps"] == [1]


def test_sss_without_a_keytab_fails_at_once(sss_server, tmp_path):
    answer = run_as(client_env(XrdSecSSSKT=str(tmp_path / "none.keytab")), "list", f"{sss_server.url}//alice/run")
    assert not answer["ok"]
    assert answer["error"] == "StorageAuthenticationFailed", answer
    assert answer["seconds"] < PROMPT
