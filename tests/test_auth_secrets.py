"""No credential's content in anything a run writes: a small training against an
authenticating server, with a proxy and a bearer token in its environment, every log line at
DEBUG (the XRootD client's at Dump), and every file it left on the storage and on the local
disk searched for the secrets."""
from __future__ import annotations

import datetime as dt

import pytest

from xrootd_auth import client_env, run_as


@pytest.fixture(scope="module", params=["gsi-root", "gsi-roots", "ztn-roots"])
def server(request, make_auth_server, test_pki, token_issuer):
    """gsi on root:// and on roots:// (the proxy is sent), ztn on roots:// (the token is sent):
    the seed's Checkpointer and the store on each."""
    protocol, tls = request.param.split("-")[0], request.param.endswith("roots")
    if protocol == "ztn":
        return make_auth_server(protocol="ztn", tls=True, issuer=token_issuer)
    alice = test_pki.user("leak-alice")
    return make_auth_server(protocol="gsi", tls=tls, authdb="u alice /alice a\n", gridmap={alice.subject: "alice"})


def secrets_of(proxy_text: str, token: str) -> list[str]:
    """What must never appear: every line of the proxy's private key, the PEM marker of a key,
    the token and its signature."""
    begin, end = "-----BEGIN RSA PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----"
    key = proxy_text[proxy_text.index(begin):proxy_text.index(end)]
    key_lines = [line for line in key.splitlines()[1:] if len(line) > 20]
    assert len(key_lines) > 10
    return [*key_lines, "PRIVATE KEY", token, token.rsplit(".", 1)[1]]


def test_a_training_writes_no_secret(server, test_pki, token_issuer, tmp_path):
    proxy = test_pki.proxy(test_pki.user("leak-alice"), tmp_path / "x509up", lifetime=dt.timedelta(hours=3))
    scope = "storage.read:/alice storage.create:/alice storage.modify:/alice"
    token = token_issuer.token(scope, lifetime=dt.timedelta(hours=3))
    env = client_env(test_pki, proxy, BEARER_TOKEN=token, XRD_LOGLEVEL="Dump", TMPDIR=str(tmp_path))
    location = f"{server.url}//alice/leak"
    answer = run_as(env, "train", location, "4", f"{server.url}//elsewhere/run", timeout=180)
    assert answer["ok"], answer
    assert answer["steps"] == [2, 3]

    written = {"the run's log (stdout and stderr)": answer["stderr"] + repr(answer)}
    stored = [path for path in (server.data_dir / "alice" / "leak").rglob("*") if path.is_file()]
    assert any(path.suffix == ".json" for path in stored)  # manifests are among them
    assert any(path.name == "seed.pt" for path in stored)  # the seed's Checkpointer wrote too
    for path in stored + [path for path in tmp_path.rglob("*") if path.is_file() and path != proxy]:
        written[str(path)] = path.read_bytes().decode("latin-1")
    # the log has what it should: the credentials named, the refusal explained
    assert "x509 proxy" in written["the run's log (stdout and stderr)"]
    assert "preflight refused (storage)" in written["the run's log (stdout and stderr)"]

    for secret in secrets_of(proxy.read_text(), token):
        leaks = [where for where, text in written.items() if secret in text]
        assert not leaks, f"a secret ({secret[:6]}...) was written to {leaks}"
