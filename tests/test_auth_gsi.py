"""X.509 (gsi) on a real server: each identity owns its directory and is told when it may not.

The server maps two users' certificate subjects to ``alice`` and ``bob`` and lets each
do anything in its own directory and nothing elsewhere (``acc.authdb``). Every client
runs in a process of its own, because the XRootD client reads its proxy once per process.
"""
from __future__ import annotations

import datetime as dt
import os
import time

import pytest

from xrootd_auth import ClientSession, client_env, run_as

#: a refusal must come at once, not after the store's retry deadline (20 s in these clients)
PROMPT = 5.0


@pytest.fixture(scope="module")
def people(test_pki, tmp_path_factory):
    """alice's and bob's certificates, and a proxy of each valid for two hours."""
    directory = tmp_path_factory.mktemp("proxies")
    alice, bob = test_pki.user("alice"), test_pki.user("bob")
    return {
        "alice": (alice, test_pki.proxy(alice, directory / "x509up_alice")),
        "bob": (bob, test_pki.proxy(bob, directory / "x509up_bob")),
        "directory": directory,
    }


@pytest.fixture(scope="module")
def gsi_server(make_auth_server, people):
    alice, bob = people["alice"][0], people["bob"][0]
    return make_auth_server(protocol="gsi", authdb="u alice /alice a\nu bob /bob a\n",
                            gridmap={alice.subject: "alice", bob.subject: "bob"})


@pytest.fixture(scope="module")
def alice_run(gsi_server, test_pki, people):
    """alice's location, holding her checkpoint of step 1."""
    location = f"{gsi_server.url}//alice/run"
    answer = run_as(client_env(test_pki, people["alice"][1]), "save", location, "1")
    assert answer["ok"], answer
    return location


def as_(test_pki, people, name):
    return client_env(test_pki, people[name][1])


def test_owner_saves_lists_and_restores(alice_run, test_pki, people):
    env = as_(test_pki, people, "alice")
    assert run_as(env, "save", alice_run, "2")["ok"]
    assert run_as(env, "list", alice_run)["steps"] == [1, 2]
    restored = run_as(env, "restore", alice_run)
    assert (restored["step"], restored["content"]) == (2, "step-2")


@pytest.mark.parametrize("operation", [("list",), ("restore",), ("save", "7"), ("remove", "LATEST")])
def test_another_identity_is_refused_and_told_so(alice_run, gsi_server, test_pki, people, operation):
    """bob can neither read, overwrite nor delete alice's checkpoints; he hears "permission
    denied" at once, never "no checkpoint" and never an outage retried for minutes."""
    answer = run_as(as_(test_pki, people, "bob"), operation[0], alice_run, *operation[1:])
    assert not answer["ok"], f"bob's {operation[0]} of alice's run succeeded: {answer}"
    assert answer["error"] == "StoragePermissionDenied", answer
    assert "permission denied" in answer["message"].lower()
    assert answer["seconds"] < PROMPT
    # and nothing of alice's changed
    owner = run_as(as_(test_pki, people, "alice"), "restore", alice_run)
    assert owner["ok"] and owner["content"] == f"step-{owner['step']}"
    assert 7 not in run_as(as_(test_pki, people, "alice"), "list", alice_run)["steps"]


def test_each_identity_writes_its_own_directory(gsi_server, test_pki, people):
    location = f"{gsi_server.url}//bob/run"
    env = as_(test_pki, people, "bob")
    assert run_as(env, "save", location, "3")["ok"]
    assert run_as(env, "restore", location)["content"] == "step-3"


def test_an_expired_proxy_fails_at_once_naming_authentication(alice_run, test_pki, people):
    alice = people["alice"][0]
    expired = test_pki.proxy(alice, people["directory"] / "x509up_expired", lifetime=-dt.timedelta(minutes=10))
    answer = run_as(client_env(test_pki, expired), "list", alice_run)
    assert not answer["ok"]
    assert answer["error"] == "StorageAuthenticationFailed", answer
    assert answer["seconds"] < PROMPT


def test_no_proxy_fails_at_once_naming_authentication(alice_run, test_pki, people):
    env = client_env(test_pki, X509_USER_PROXY=str(people["directory"] / "no-such-proxy"))
    answer = run_as(env, "list", alice_run)
    assert not answer["ok"]
    assert answer["error"] == "StorageAuthenticationFailed", answer
    assert answer["seconds"] < PROMPT


def test_an_unknown_subject_is_refused(alice_run, test_pki, people):
    """A valid proxy whose subject the grid-mapfile does not name gets no access."""
    mallory = test_pki.user("mallory")
    proxy = test_pki.proxy(mallory, people["directory"] / "x509up_mallory")
    answer = run_as(client_env(test_pki, proxy), "list", alice_run)
    assert not answer["ok"]
    assert answer["error"] in ("StorageAuthenticationFailed", "StoragePermissionDenied"), answer
    assert answer["seconds"] < PROMPT


def test_a_proxy_made_by_xrdgsiproxy_works(alice_run, test_pki, people):
    """The tool users run makes proxies the server accepts (not only the fixture's own)."""
    alice = people["alice"][0]
    proxy = test_pki.xrdgsiproxy(alice, people["directory"] / "x509up_tool", valid="0:30")
    answer = run_as(client_env(test_pki, proxy), "list", alice_run)
    assert answer["ok"], answer
    assert 1 in answer["steps"]


def test_a_proxy_expiring_mid_run_fails_the_next_connection_and_a_renewed_file_is_used(
        alice_run, test_pki, people):
    """What a long training sees: an authenticated connection outlives its proxy, but the next
    connection (after the client closed the idle one, here after 1 s instead of 300) is refused
    at once as an authentication failure; once the file is replaced by a fresh proxy, as
    HTCondor refreshes ``x509userproxy``, the same process commits again."""
    alice, directory = people["alice"][0], people["directory"]
    lifetime = dt.timedelta(seconds=6)
    proxy = test_pki.proxy(alice, directory / "x509up_short", lifetime=lifetime)
    expires = time.monotonic() + lifetime.total_seconds()
    session = ClientSession(client_env(test_pki, proxy, XRD_DATASERVERTTL="1"), alice_run)
    try:
        assert session.do("save", "20")["ok"]
        time.sleep(max(0.0, expires - time.monotonic()) + 3)  # expired, and the idle connection closed
        refused = session.do("save", "21")
        assert refused["error"] == "StorageAuthenticationFailed", refused
        assert refused["seconds"] < PROMPT
        renewed = test_pki.proxy(alice, directory / "x509up_renewed", lifetime=dt.timedelta(hours=1))
        os.replace(renewed, proxy)
        again = session.do("save", "22")
        assert again["ok"], again
    finally:
        session.close()
