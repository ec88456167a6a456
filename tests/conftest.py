"""Shared fixtures: real servers on free loopback ports.

A test that needs a server it cannot start is skipped on a developer machine,
and fails under CI (CI=true), where every server must be available.
"""
from __future__ import annotations

import os
import signal
import uuid

import pytest

from xrootd_server import ServerUnavailable, XRootDServer

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true and a required server cannot start: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Checkpointers made in-process take over SIGTERM/SIGINT; no test leaves them to the next."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def xrootd_server():
    """One XRootD server for the session; tests use their own sub-directories."""
    try:
        server = XRootDServer().start()
    except ServerUnavailable as error:
        unavailable(str(error))
    yield server
    server.cleanup()


def _server_factory(server_class, *args):
    """Yield a factory of started ``server_class(*args, **kwargs)``; clean them all up after."""
    servers = []

    def make(**kwargs):
        try:
            server = server_class(*args, **kwargs).start()
        except ServerUnavailable as error:
            unavailable(str(error))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.cleanup()


@pytest.fixture
def make_xrootd_server():
    """A factory of private servers, for tests that stop or break them."""
    yield from _server_factory(XRootDServer)


@pytest.fixture(params=["local", "xrootd"])
def location(request, tmp_path):
    """A fresh store location on a local directory and on the real server
    (``store_helpers.Location``: ``url``, ``on_disk``, ``store()``; unpacks as ``url, on_disk``)."""
    from store_helpers import Location

    name = f"ckpt-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        return Location("local", str(tmp_path / name), tmp_path / name)
    server = request.getfixturevalue("xrootd_server")
    return Location("xrootd", f"{server.url}//runs/{name}", server.data_dir / "runs" / name)


# -- authenticated servers (tests/xrootd_auth.py) ----------------------------------------

@pytest.fixture(scope="session")
def test_pki():
    """A test CA with host and user certificates, made by openssl for the session."""
    from xrootd_auth import TestPKI

    try:
        pki = TestPKI()
    except ServerUnavailable as error:
        unavailable(str(error))
    yield pki
    pki.cleanup()


@pytest.fixture(scope="session")
def token_issuer():
    """A bearer-token issuer whose public key servers find without a network."""
    from xrootd_auth import TokenIssuer

    issuer = TokenIssuer()
    yield issuer
    issuer.cleanup()


@pytest.fixture(scope="module")
def make_auth_server(test_pki):
    """A factory of authenticating servers (``xrootd_auth.AuthXRootDServer`` arguments)."""
    from xrootd_auth import AuthXRootDServer

    yield from _server_factory(AuthXRootDServer, test_pki)
