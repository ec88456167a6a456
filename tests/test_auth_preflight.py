"""ckpt_tasks.preflight: credential lifetimes (pure) and the store probe on real servers."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ckpt_tasks.jobenv.credentials import BEARER_TOKEN, X509_PROXY, Credential
from ckpt_tasks.preflight import (EXPIRED, MISSING, STORAGE, TOO_SHORT, PreflightRefused, check_credentials,
                                  preflight)
from xrootd_auth import client_env, run_as, write_secret

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
HOUR = dt.timedelta(hours=1)


def proxy_ending(after: dt.timedelta) -> Credential:
    return Credential(X509_PROXY, "X509_USER_PROXY", Path("/tmp/x509up_test"), NOW + after, "/CN=alice")


# -- lifetimes ------------------------------------------------------------------------------

def test_a_long_enough_credential_passes_without_warnings():
    assert check_credentials([proxy_ending(10 * HOUR)], min_lifetime=HOUR, expected_duration=5 * HOUR, now=NOW) == []


def test_an_expired_credential_is_refused():
    with pytest.raises(PreflightRefused) as refused:
        check_credentials([proxy_ending(-HOUR)], now=NOW)
    assert refused.value.reason == EXPIRED
    assert "/tmp/x509up_test" in str(refused.value) and "expired at" in str(refused.value)


def test_a_credential_shorter_than_the_minimum_is_refused():
    with pytest.raises(PreflightRefused) as refused:
        check_credentials([proxy_ending(dt.timedelta(minutes=30))], min_lifetime=HOUR, now=NOW)
    assert refused.value.reason == TOO_SHORT
    assert "1:00:00" in str(refused.value)


def test_the_minimum_is_configurable_in_seconds():
    assert check_credentials([proxy_ending(dt.timedelta(minutes=30))], min_lifetime=600, now=NOW) == []


def test_a_credential_ending_before_the_training_warns(caplog):
    warnings = check_credentials([proxy_ending(3 * HOUR)], min_lifetime=HOUR, expected_duration=20 * HOUR, now=NOW)
    assert len(warnings) == 1 and "before the training's expected end" in warnings[0]
    assert "before the training's expected end" in caplog.text


def test_every_credential_found_is_checked():
    """A good token does not hide an expired proxy the client may pick."""
    token = Credential(BEARER_TOKEN, "BEARER_TOKEN_FILE", Path("/tmp/bt"), NOW + 10 * HOUR, "https://issuer")
    with pytest.raises(PreflightRefused, match="x509 proxy"):
        check_credentials([token, proxy_ending(-HOUR)], now=NOW)


def test_a_required_kind_that_is_missing_is_refused():
    with pytest.raises(PreflightRefused) as refused:
        check_credentials([proxy_ending(10 * HOUR)], require=["token"], now=NOW)
    assert refused.value.reason == MISSING and "BEARER_TOKEN_FILE" in str(refused.value)


def test_tokens_have_a_shorter_default_minimum_than_proxies():
    token = Credential(BEARER_TOKEN, "BEARER_TOKEN_FILE", Path("/tmp/bt"), NOW + dt.timedelta(minutes=20))
    assert check_credentials([token], now=NOW) == []
    with pytest.raises(PreflightRefused, match="too short"):
        check_credentials([proxy_ending(dt.timedelta(minutes=20))], now=NOW)


def test_a_missing_token_names_the_files_htcondor_gave_the_job(tmp_path):
    """use_oauth_services puts tokens where the XRootD client does not look."""
    (tmp_path / "scitokens.use").write_text("x")
    with pytest.raises(PreflightRefused, match=r"scitokens\.use: set BEARER_TOKEN_FILE"):
        check_credentials([], require=["token"], now=NOW, environ={"_CONDOR_CREDS": str(tmp_path)})


def test_an_unknown_expiry_warns():
    opaque = Credential(BEARER_TOKEN, "BEARER_TOKEN", None, None)
    assert "cannot be checked" in check_credentials([opaque], now=NOW)[0]


# -- the probe ------------------------------------------------------------------------------

def test_a_local_store_passes_and_keeps_nothing(tmp_path):
    report = preflight(tmp_path / "store", environ={})
    assert report.probe_seconds is not None and report.credentials == ()
    assert list((tmp_path / "store").iterdir()) == []


def test_a_missing_required_proxy_named_by_its_variable(tmp_path):
    with pytest.raises(PreflightRefused) as refused:
        preflight(tmp_path / "store", require=["x509"], environ={"X509_USER_PROXY": str(tmp_path / "gone")})
    assert refused.value.reason == MISSING and "X509_USER_PROXY" in str(refused.value)


def test_voms_attributes_shorter_than_the_minimum_are_refused(test_pki, tmp_path):
    """A 12-hour VOMS proxy whose VO attributes last 2 hours is too short for a 3-hour minimum."""
    from conftest import unavailable
    from xrootd_server import ServerUnavailable

    try:
        proxy = test_pki.voms_proxy(test_pki.user("pre-voms"), tmp_path / "x509up", hours=12, voms_hours=2)
    except ServerUnavailable as error:
        unavailable(str(error))
    with pytest.raises(PreflightRefused) as refused:
        preflight(tmp_path / "store", min_lifetime=3 * HOUR, require=["x509"],
                  environ={"X509_USER_PROXY": str(proxy)})
    assert refused.value.reason == TOO_SHORT and "VOMS attributes end first" in str(refused.value)


def test_the_minimum_comes_from_the_environment_where_no_caller_names_one(test_pki, tmp_path):
    """The HTCondor workflow's --credential-min-lifetime reaches a job's preflight this way."""
    from ckpt_tasks.preflight import MIN_LIFETIME_VARIABLE

    proxy = test_pki.proxy(test_pki.user("pre-env"), tmp_path / "x509up", lifetime=dt.timedelta(minutes=10))
    environ = {"X509_USER_PROXY": str(proxy)}
    with pytest.raises(PreflightRefused) as refused:  # the default minimum of a proxy is one hour
        preflight(tmp_path / "store", require=["x509"], environ=environ)
    assert refused.value.reason == TOO_SHORT
    report = preflight(tmp_path / "store", require=["x509"], environ={**environ, MIN_LIFETIME_VARIABLE: "60"})
    assert [c.path for c in report.credentials] == [proxy]
    with pytest.raises(PreflightRefused):  # an explicit minimum wins over the variable
        preflight(tmp_path / "store", min_lifetime=HOUR, require=["x509"], environ={**environ, MIN_LIFETIME_VARIABLE: "60"})
    with pytest.raises(ValueError, match=MIN_LIFETIME_VARIABLE):
        preflight(tmp_path / "store", environ={MIN_LIFETIME_VARIABLE: "an hour"})


@pytest.fixture(scope="module")
def gsi(make_auth_server, test_pki, tmp_path_factory):
    alice, bob = test_pki.user("pre-alice"), test_pki.user("pre-bob")
    server = make_auth_server(protocol="gsi", authdb="u alice /alice a\nu bob /bob a\n",
                              gridmap={alice.subject: "alice", bob.subject: "bob"})
    directory = tmp_path_factory.mktemp("pre-proxies")
    return server, {"alice": alice, "bob": bob}, directory


def test_the_owner_passes_and_the_probe_keeps_nothing(gsi, test_pki):
    server, people, directory = gsi
    proxy = test_pki.proxy(people["alice"], directory / "alice", lifetime=3 * HOUR)
    answer = run_as(client_env(test_pki, proxy), "preflight", f"{server.url}//alice/pre")
    assert answer["ok"], answer
    assert len(answer["credentials"]) == 1 and "/CN=pre-alice" in answer["credentials"][0]
    assert list((server.data_dir / "alice" / "pre").iterdir()) == []


def test_another_identity_is_refused_naming_the_step(gsi, test_pki):
    server, people, directory = gsi
    proxy = test_pki.proxy(people["bob"], directory / "bob", lifetime=3 * HOUR)
    answer = run_as(client_env(test_pki, proxy), "preflight", f"{server.url}//alice/pre")
    assert answer["reason"] == STORAGE, answer
    assert "cannot create the directory" in answer["message"] and "permission denied" in answer["message"]


def test_no_credential_for_a_storage_that_wants_one_is_named_missing(gsi, test_pki):
    server, _, _ = gsi
    answer = run_as(client_env(test_pki), "preflight", f"{server.url}//alice/pre")
    assert answer["reason"] == MISSING, answer
    assert "none was found" in answer["message"] and "X509_USER_PROXY" in answer["message"]
    assert answer["seconds"] < 5


def test_an_expired_proxy_is_refused_before_the_probe(gsi, test_pki):
    server, people, directory = gsi
    proxy = test_pki.proxy(people["alice"], directory / "old", lifetime=-HOUR)
    answer = run_as(client_env(test_pki, proxy), "preflight", f"{server.url}//alice/pre")
    assert answer["reason"] == EXPIRED, answer
    assert answer["seconds"] < 2


def test_a_short_proxy_is_refused(gsi, test_pki):
    server, people, directory = gsi
    proxy = test_pki.proxy(people["alice"], directory / "short", lifetime=dt.timedelta(minutes=20))
    answer = run_as(client_env(test_pki, proxy), "preflight", f"{server.url}//alice/pre", "3600")
    assert answer["reason"] == TOO_SHORT, answer


def test_a_token_that_may_create_but_not_replace_is_caught(make_auth_server, token_issuer, test_pki, tmp_path):
    """The users' report: storage.create without storage.modify breaks the commit's rename
    over LATEST; the preflight finds it before any training."""
    server = make_auth_server(protocol="ztn", tls=True, issuer=token_issuer)
    token = write_secret(tmp_path / "token", token_issuer.token("storage.read:/alice storage.create:/alice"))
    answer = run_as(client_env(test_pki, BEARER_TOKEN_FILE=str(token)), "preflight", f"{server.url}//alice/pre")
    assert answer["reason"] == STORAGE, answer
    assert "rename it over the first" in answer["message"]
    full = write_secret(tmp_path / "full", token_issuer.token(
        "storage.read:/alice storage.create:/alice storage.modify:/alice"))
    assert run_as(client_env(test_pki, BEARER_TOKEN_FILE=str(full)), "preflight", f"{server.url}//alice/pre")["ok"]


def test_an_untrusted_server_certificate_is_refused_with_what_to_check(make_auth_server):
    from xrootd_auth import TestPKI

    server = make_auth_server(protocol=None, tls=True)
    stranger = TestPKI()
    try:
        answer = run_as(client_env(stranger), "preflight", f"{server.url}//runs/pre")
    finally:
        stranger.cleanup()
    assert answer["reason"] == STORAGE, answer
    assert "X509_CERT_DIR" in answer["message"] and answer["seconds"] < 5
