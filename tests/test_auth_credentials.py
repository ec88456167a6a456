"""ckpt_tasks.jobenv.credentials on real files: proxies from the test CA, tokens from the
test issuer; found where the XRootD client looks, lifetimes read, content never shown."""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil

import pytest

from ckpt_tasks.jobenv.credentials import (BEARER_TOKEN, X509_PROXY, CredentialError, condor_token_files,
                                           find_credentials, find_proxy, find_token, read_proxy, token_credential)
from conftest import unavailable
from xrootd_auth import write_secret
from xrootd_server import ServerUnavailable

UID = 4242  # a uid whose default files (/tmp/x509up_u4242, /tmp/bt_u4242) no one has


@pytest.fixture(scope="module")
def alice(test_pki):
    return test_pki.user("cred-alice")


@pytest.fixture
def proxy(test_pki, alice, tmp_path):
    return test_pki.proxy(alice, tmp_path / "x509up", lifetime=dt.timedelta(hours=3))


def close_to(when: dt.datetime, expected: dt.datetime, seconds: float = 120) -> bool:
    return abs((when - expected).total_seconds()) < seconds


def test_proxy_from_x509_user_proxy(proxy, alice):
    credential = find_proxy({"X509_USER_PROXY": str(proxy)}, uid=UID)
    assert credential.kind == X509_PROXY and credential.path == proxy and credential.source == "X509_USER_PROXY"
    assert close_to(credential.expires, dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=3))
    assert credential.identity == alice.subject  # the user's subject, not the proxy's own CN
    assert not credential.expired()


def test_proxy_lifetime_is_the_chain_s_earliest_end(test_pki, alice, tmp_path):
    """A proxy longer than its user certificate (2 days) ends with the certificate."""
    long = test_pki.proxy(alice, tmp_path / "long", lifetime=dt.timedelta(days=30))
    from cryptography import x509

    user_end = x509.load_pem_x509_certificate(alice.cert.read_bytes()).not_valid_after_utc
    assert read_proxy(long).expires == user_end


def test_proxy_made_by_xrdgsiproxy(test_pki, alice, tmp_path):
    made = test_pki.xrdgsiproxy(alice, tmp_path / "tool", valid="0:45")
    credential = read_proxy(made)
    assert close_to(credential.expires, dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=45))
    assert credential.identity == alice.subject


@pytest.fixture
def voms_proxy(test_pki, alice, tmp_path):
    try:
        return test_pki.voms_proxy(alice, tmp_path / "x509up_voms", hours=12, voms_hours=2)
    except ServerUnavailable as error:
        unavailable(str(error))


def test_a_voms_proxy_ends_with_its_attributes(voms_proxy, alice):
    """A VOMS proxy of 12 h whose VO attributes last 2 h: storage that authorizes by VO
    refuses after 2 h, so that is its lifetime."""
    now = dt.datetime.now(dt.timezone.utc)
    credential = read_proxy(voms_proxy)
    assert close_to(credential.voms_expires, now + dt.timedelta(hours=2))
    assert credential.expires == credential.voms_expires
    assert "VOMS attributes end first" in str(credential)
    assert credential.identity == alice.subject


def test_a_plain_proxy_has_no_voms_end(proxy):
    assert read_proxy(proxy).voms_expires is None


def test_expired_proxy(test_pki, alice, tmp_path):
    expired = test_pki.proxy(alice, tmp_path / "old", lifetime=-dt.timedelta(minutes=3))
    credential = read_proxy(expired)
    assert credential.expired()
    assert "expired at" in str(credential)


def test_default_proxy_path(proxy, monkeypatch, tmp_path):
    uid = os.getuid()
    default = f"/tmp/x509up_u{uid}"
    if os.path.exists(default):
        pytest.skip(f"{default} exists on this machine; it is not the test's to replace")
    shutil.copy(proxy, default)  # a copy: tmp_path may be on another file system than /tmp
    try:
        credential = find_proxy({}, uid=uid)
        assert str(credential.path) == default and credential.source == "default path"
    finally:
        os.unlink(default)


def test_no_proxy():
    assert find_proxy({}, uid=UID) is None


def test_x509_user_proxy_naming_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(CredentialError, match="X509_USER_PROXY names .*not a file"):
        find_proxy({"X509_USER_PROXY": str(tmp_path / "gone")}, uid=UID)


def test_a_file_that_is_no_proxy_is_named_without_its_content(tmp_path):
    secret = "top-secret-not-a-certificate"
    path = write_secret(tmp_path / "x509up", secret)
    with pytest.raises(CredentialError) as error:
        read_proxy(path)
    assert str(path) in str(error.value) and secret not in str(error.value)


def test_token_order_of_the_xrootd_client(token_issuer, tmp_path):
    env_token = token_issuer.token("storage.read:/", lifetime=dt.timedelta(minutes=10))
    file_token = write_secret(tmp_path / "file", token_issuer.token("storage.read:/", lifetime=dt.timedelta(hours=2)))
    runtime = tmp_path / "run"
    runtime.mkdir()
    write_secret(runtime / f"bt_u{UID}", token_issuer.token("storage.read:/", lifetime=dt.timedelta(hours=5)))
    full = {"BEARER_TOKEN": env_token, "BEARER_TOKEN_FILE": str(file_token), "XDG_RUNTIME_DIR": str(runtime)}
    now = dt.datetime.now(dt.timezone.utc)

    first = find_token(full, uid=UID)
    assert first.source == "BEARER_TOKEN" and first.path is None
    assert close_to(first.expires, now + dt.timedelta(minutes=10))
    second = find_token({key: full[key] for key in ("BEARER_TOKEN_FILE", "XDG_RUNTIME_DIR")}, uid=UID)
    assert second.source == "BEARER_TOKEN_FILE" and second.path == file_token
    assert close_to(second.expires, now + dt.timedelta(hours=2))
    third = find_token({"XDG_RUNTIME_DIR": str(runtime)}, uid=UID)
    assert third.path == runtime / f"bt_u{UID}" and close_to(third.expires, now + dt.timedelta(hours=5))
    assert third.identity == token_issuer.issuer
    assert find_token({"XDG_RUNTIME_DIR": str(tmp_path / "empty")}, uid=UID) is None


def test_token_in_tmp(token_issuer):
    uid = os.getuid()
    default = f"/tmp/bt_u{uid}"
    if os.path.exists(default):
        pytest.skip(f"{default} exists on this machine; it is not the test's to replace")
    write_secret(default, token_issuer.token("storage.read:/"))
    try:
        assert str(find_token({}, uid=uid).path) == default
    finally:
        os.unlink(default)


def test_bearer_token_file_naming_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(CredentialError, match="BEARER_TOKEN_FILE"):
        find_token({"BEARER_TOKEN_FILE": str(tmp_path / "gone")}, uid=UID)


def test_an_opaque_token_has_an_unknown_expiry():
    credential = token_credential("not-a-jwt-opaque-token", "BEARER_TOKEN", None)
    assert credential.expires is None and credential.remaining() is None and not credential.expired()
    assert "expiry unknown" in str(credential)


def test_nothing_shown_holds_the_content(token_issuer, proxy, tmp_path):
    """repr, str and the fields of a Credential name kind, file and expiry: never the secret."""
    token = token_issuer.token("storage.read:/")
    token_file = write_secret(tmp_path / "tok", token)
    key_lines = [line for line in proxy.read_text().split("-----END CERTIFICATE-----")[1].splitlines()
                 if line and not line.startswith("-----")]
    found = find_credentials({"X509_USER_PROXY": str(proxy), "BEARER_TOKEN_FILE": str(token_file)}, uid=UID)
    assert [credential.kind for credential in found] == [X509_PROXY, BEARER_TOKEN]
    from_env = find_token({"BEARER_TOKEN": token}, uid=UID)
    for credential in [*found, from_env]:
        for shown in (repr(credential), str(credential), repr(dataclasses.asdict(credential))):
            assert token not in shown and token.split(".")[2] not in shown
            assert not any(line in shown for line in key_lines)


def test_htcondor_token_files(tmp_path):
    (tmp_path / "scitokens.use").write_text("t")
    (tmp_path / "scitokens.top").write_text("refresh token: not for the job")
    assert condor_token_files({"_CONDOR_CREDS": str(tmp_path)}) == [tmp_path / "scitokens.use"]
    assert condor_token_files({}) == []
    # the XRootD client does not look there, so neither does find_token
    assert find_token({"_CONDOR_CREDS": str(tmp_path)}, uid=UID) is None
