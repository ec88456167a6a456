"""Credentials and authenticated XRootD servers for tests, all made on this machine.

- :class:`TestPKI`: a certificate authority, host and user certificates, made with
  ``openssl``, and RFC 3820 proxies of any lifetime (expired ones included), made with
  the ``cryptography`` package because ``openssl x509`` cannot set a past end date.
- :class:`AuthXRootDServer`: an :class:`~xrootd_server.XRootDServer` with ``gsi``,
  ``sss`` or ``ztn`` (bearer tokens) authentication, TLS (``roots://``) and an
  ``acc.authdb`` authorization file that gives each identity its own directory.
- :class:`TokenIssuer`: signs WLCG tokens and hands its public key to the server's
  SciTokens library through that library's key cache, so no network is needed.
- :func:`client_env`: the environment a client process needs for one identity.

The XRootD client reads its credentials once per process, so each identity runs its
storage operations in a subprocess of its own (:func:`run_as`, :class:`ClientSession`,
running ``tests/helpers/auth_client.py``).
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from xrootd_server import ServerUnavailable, XRootDServer

#: the host name the servers' certificates are made for (and clients connect to)
HOST = "localhost"
_SUBJECT_BASE = "/DC=test/O=ckpt-tasks"
# id-pe-proxyCertInfo (RFC 3820) with the policy id-ppl-inheritAll, DER-encoded
_PROXY_CERT_INFO_OID = "1.3.6.1.5.5.7.1.14"
_PROXY_CERT_INFO_INHERIT_ALL = bytes.fromhex("300c300a06082b06010505071501")


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise ServerUnavailable("openssl is not installed")
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ServerUnavailable(f"openssl {args[0]} failed: {result.stderr.strip()[-500:]}")


@dataclass(frozen=True)
class Identity:
    """A user's certificate and key (PEM files) and its subject, as XRootD prints it."""

    name: str
    cert: Path
    key: Path
    subject: str


class TestPKI:
    """A test CA in a new directory under ``directory`` (default: the system's temporary
    directory); ``cert_dir`` is what ``X509_CERT_DIR`` points to. The directory must be
    one the server's user can enter, so it is not made inside pytest's private ``tmp_path``."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(tempfile.mkdtemp(prefix="ckpt-pki-", dir=directory))
        self.directory.chmod(0o755)
        self.cert_dir = self.directory / "certificates"
        self.cert_dir.mkdir(exist_ok=True)
        self.cert_dir.chmod(0o755)
        self.ca_cert = self.directory / "ca.pem"
        self.ca_key = self.directory / "ca.key"
        self._serial = 1
        self._make_ca()

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _config(self, name: str, body: str) -> Path:
        path = self.directory / name
        path.write_text(body)
        return path

    def _make_ca(self) -> None:
        config = self._config("ca.cnf", textwrap.dedent("""\
            [req]
            distinguished_name = dn
            prompt = no
            [dn]
            DC = test
            O = ckpt-tasks
            CN = ckpt-tasks test CA
            [ext]
            basicConstraints = critical,CA:true
            keyUsage = critical,keyCertSign,cRLSign
            subjectKeyIdentifier = hash
            """))
        _openssl("req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.ca_key),
                 "-out", str(self.ca_cert), "-days", "3", "-config", str(config), "-extensions", "ext",
                 cwd=self.directory)
        self.ca_key.chmod(0o600)
        # The XRootD client and OpenSSL find a CA in a directory by its subject hash.
        digest = subprocess.run(["openssl", "x509", "-in", str(self.ca_cert), "-noout", "-subject_hash"],
                                capture_output=True, text=True, check=True).stdout.strip()
        shutil.copy(self.ca_cert, self.cert_dir / f"{digest}.0")
        (self.cert_dir / f"{digest}.0").chmod(0o644)

    def _sign(self, stem: str, subject: str, extensions: str) -> tuple[Path, Path]:
        """A new key and a certificate for ``subject`` signed by the CA."""
        key, csr, cert = (self.directory / f"{stem}{suffix}" for suffix in (".key", ".csr", ".pem"))
        ext = self._config(f"{stem}.ext", extensions)
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", subject, cwd=self.directory)
        self._serial += 1
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
                 "-set_serial", str(self._serial), "-days", "2", "-extfile", str(ext), "-out", str(cert),
                 cwd=self.directory)
        key.chmod(0o600)
        cert.chmod(0o644)
        return cert, key

    def host(self, name: str = HOST) -> tuple[Path, Path]:
        """The host certificate and key of ``name`` (also valid for 127.0.0.1)."""
        return self._sign(f"host-{name}", f"{_SUBJECT_BASE}/CN={name}", textwrap.dedent(f"""\
            basicConstraints = critical,CA:false
            keyUsage = critical,digitalSignature,keyEncipherment
            extendedKeyUsage = serverAuth,clientAuth
            subjectAltName = DNS:{name},IP:127.0.0.1
            """))

    def user(self, name: str) -> Identity:
        """A user certificate for ``name``; its subject ends in ``CN=name``."""
        subject = f"{_SUBJECT_BASE}/CN={name}"
        cert, key = self._sign(f"user-{name}", subject, textwrap.dedent("""\
            basicConstraints = critical,CA:false
            keyUsage = critical,digitalSignature,keyEncipherment
            extendedKeyUsage = clientAuth
            """))
        return Identity(name, cert, key, subject)

    def proxy(self, identity: Identity, path: str | os.PathLike, lifetime: dt.timedelta = dt.timedelta(hours=2),
              not_before: dt.datetime | None = None) -> Path:
        """Write an RFC 3820 proxy of ``identity`` to ``path`` (mode 0600): the proxy
        certificate, its private key, then the user certificate, as ``xrdgsiproxy`` does.
        A negative ``lifetime`` makes a proxy that has already expired."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        user_cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
        user_key = serialization.load_pem_private_key(identity.key.read_bytes(), password=None)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = dt.datetime.now(dt.timezone.utc)
        start = not_before or min(now, now + lifetime) - dt.timedelta(minutes=5)
        serial = x509.random_serial_number() >> 96  # the proxy's CN is its serial, as in RFC 3820
        subject = x509.Name(list(user_cert.subject.rdns) + [
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, str(serial))])])
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(user_cert.subject)
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(start).not_valid_after(now + lifetime)
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                               critical=True)
                .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(_PROXY_CERT_INFO_OID),
                                                          _PROXY_CERT_INFO_INHERIT_ALL), critical=True)
                .sign(user_key, hashes.SHA256()))
        path = Path(path)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                         + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption())
                         + identity.cert.read_bytes())
        return path

    def voms_proxy(self, identity: Identity, path: str | os.PathLike, vo: str = "testvo", hours: int = 12,
                   voms_hours: int = 2, voms_started: str | None = None) -> Path:
        """A VOMS proxy made by ``voms-proxy-fake`` (no VOMS server): a proxy of ``hours``
        whose attribute certificate for ``vo``, signed by a host certificate of this CA,
        lasts ``voms_hours`` from ``voms_started`` ago (``"h:mm"``; default now)."""
        if shutil.which("voms-proxy-fake") is None:
            raise ServerUnavailable("voms-proxy-fake is not installed (apt-get install voms-clients)")
        voms_cert, voms_key = self.host(f"voms.{vo}.test")
        result = subprocess.run(
            ["voms-proxy-fake", "-rfc", "-cert", str(identity.cert), "-key", str(identity.key),
             "-certdir", str(self.cert_dir), "-hostcert", str(voms_cert), "-hostkey", str(voms_key),
             "-voms", vo, "-fqan", f"/{vo}/Role=NULL/Capability=NULL", "-uri", f"voms.{vo}.test:15000",
             "-hours", str(hours), "-vomslife", str(voms_hours), "-out", str(path), "-q",
             *(["-pastac", voms_started] if voms_started else [])],
            capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0 or not Path(path).is_file():
            raise ServerUnavailable(f"voms-proxy-fake failed ({result.returncode}): {result.stderr.strip()[-500:]}")
        return Path(path)

    def xrdgsiproxy(self, identity: Identity, path: str | os.PathLike, valid: str = "1:00") -> Path:
        """A proxy made by ``xrdgsiproxy`` (the tool users run), valid for ``valid`` (h:mm)."""
        if shutil.which("xrdgsiproxy") is None:
            raise ServerUnavailable("xrdgsiproxy is not installed (apt-get install xrootd-client)")
        result = subprocess.run(
            ["xrdgsiproxy", "init", "-cert", str(identity.cert), "-key", str(identity.key),
             "-certdir", str(self.cert_dir), "-out", str(path), "-valid", valid, "-bits", "2048"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0 or not Path(path).is_file():
            raise ServerUnavailable(f"xrdgsiproxy failed ({result.returncode}): {result.stderr.strip()[-500:]}")
        return Path(path)


class AuthXRootDServer(XRootDServer):
    """An XRootD server that authenticates and authorizes, on ``localhost``.

    Args:
        pki: the CA whose certificates the server trusts; its host certificate is made here.
        protocol: ``"gsi"`` (X.509 proxies), ``"sss"`` (a shared-secret keytab), ``"ztn"``
            (bearer tokens; needs ``tls`` and ``issuer``) or None.
        tls: serve ``roots://`` (``xrd.tls``), with the PKI's host certificate.
        authdb: the ``acc.authdb`` lines; None: no authorization file (with ``ztn``, the
            tokens' scopes authorize).
        gridmap: for ``gsi``, certificate subject -> user name (what ``u`` lines in ``authdb`` match).
        keytab: for ``sss``, the server's keytab (see :func:`make_keytab`).
        issuer: for ``ztn``, the only token issuer the server trusts.
        voms: for ``gsi``, the VO whose attributes (from :meth:`TestPKI.voms_proxy`) the server
            reads; ``authdb`` lines ``g /VO PATH PRIVS`` then authorize the VO's members.
    """

    def __init__(self, pki: TestPKI, protocol: str | None = "gsi", tls: bool = False,
                 authdb: str | None = None, gridmap: dict[str, str] | None = None,
                 keytab: Path | None = None, issuer: "TokenIssuer | None" = None, voms: str | None = None,
                 port: int | None = None, directory: str | os.PathLike | None = None):
        if protocol == "ztn" and not (tls and issuer):
            raise ValueError("a ztn server needs tls=True and an issuer (ztn refuses connections without TLS)")
        environment = {"XDG_CACHE_HOME": str(issuer.cache_home)} if protocol == "ztn" else None
        super().__init__(port=port, directory=directory, environment=environment)
        self.pki, self.protocol, self.tls, self.voms = pki, protocol, tls, voms
        self.secrets = self.root / "secrets"
        self.secrets.mkdir(mode=0o700)
        host_cert, host_key = pki.host(HOST)
        self.host_cert = Path(shutil.copy(host_cert, self.secrets / "hostcert.pem"))
        self.host_key = Path(shutil.copy(host_key, self.secrets / "hostkey.pem"))
        lines = [f"xrd.tls {self.host_cert} {self.host_key}", f"xrd.tlsca certdir {pki.cert_dir}"] if tls else []
        if protocol == "gsi":
            lines += self._gsi(gridmap or {})
        elif protocol == "sss":
            lines += self._sss(keytab)
        elif protocol == "ztn":
            lines += self._ztn(issuer)
        elif protocol is not None:
            raise ValueError(f"unknown protocol {protocol!r}")
        if authdb is not None:
            authdb_file = self.secrets / "authdb"
            authdb_file.write_text(authdb)
            lines += ["ofs.authorize 1", f"acc.authdb {authdb_file}", "acc.audit deny"]
        with self.config.open("a") as config:
            config.write("".join(line + "\n" for line in lines))
        self._hand_to_server_user(issuer.cache_home if protocol == "ztn" else None)

    def _gsi(self, gridmap: dict[str, str]) -> list[str]:
        gridmap_file = self.secrets / "grid-mapfile"
        gridmap_file.write_text("".join(f'"{subject}" {name}\n' for subject, name in gridmap.items()))
        # -gmapopt:2: a subject that is not in the grid-mapfile is refused (no DN-hash names);
        # -crl:0: the test CA publishes no revocation list.
        return ["xrootd.seclib libXrdSec.so",
                f"sec.protocol gsi -certdir:{self.pki.cert_dir} -cert:{self.host_cert} -key:{self.host_key} "
                f"-gridmap:{gridmap_file} -gmapopt:2 -crl:0 -dlgpxy:0{self._voms_options()}",
                "sec.protbind * only gsi"]

    def _voms_options(self) -> str:
        """With ``voms``: read the VO's attributes from proxies (libXrdVoms), trusting the VOMS
        server that :meth:`TestPKI.voms_proxy` signs with; ``acc.authdb`` ``g /VO`` lines match."""
        if self.voms is None:
            return ""
        vomsdir = self.root / "vomsdir"
        (vomsdir / self.voms).mkdir(parents=True)
        # An .lsc file names the VOMS server's subject and its CA's: that is all the trust it needs.
        (vomsdir / self.voms / f"voms.{self.voms}.test.lsc").write_text(
            f"{_SUBJECT_BASE}/CN=voms.{self.voms}.test\n{_SUBJECT_BASE}/CN=ckpt-tasks test CA\n")
        self.environment.update(X509_VOMS_DIR=str(vomsdir), X509_CERT_DIR=str(self.pki.cert_dir))
        return f" -vomsfun:libXrdVoms.so -vomsat:1 -vomsfunparms:certfmt=raw|vos={self.voms}|grpopt=10"

    def _sss(self, keytab: Path | None) -> list[str]:
        if keytab is None:
            raise ValueError("an sss server needs a keytab")
        server_keytab = Path(shutil.copy(keytab, self.secrets / "sss.keytab"))
        server_keytab.chmod(0o600)
        return ["xrootd.seclib libXrdSec.so", f"sec.protocol sss -s {server_keytab}", "sec.protbind * only sss"]

    def _ztn(self, issuer: "TokenIssuer") -> list[str]:
        config = self.secrets / "scitokens.cfg"
        config.write_text(f"[Global]\naudience = {issuer.audience}\n\n"
                          f"[Issuer test]\nissuer = {issuer.issuer}\nbase_path = /\n")
        return ["xrootd.seclib libXrdSec.so", "sec.protocol ztn", "sec.protbind * only ztn",
                "ofs.authorize 1", f"ofs.authlib libXrdAccSciTokens.so config={config}"]

    def _hand_to_server_user(self, cache_home: Path | None) -> None:
        """The server refuses keys that others can read, and must own what it reads."""
        self.host_key.chmod(0o400)
        if self.user:
            ids = pwd.getpwnam(self.user)
            paths = [self.secrets, *self.secrets.iterdir()]
            if cache_home is not None:
                paths += [cache_home, *cache_home.rglob("*")]
            for path in paths:
                os.chown(path, ids.pw_uid, ids.pw_gid)

    @property
    def url(self) -> str:
        return f"{'roots' if self.tls else 'root'}://{HOST}:{self.port}"


class TokenIssuer:
    """A bearer-token issuer made of files: an EC key, and the key cache of the SciTokens
    library filled in advance with its public key, so a server checks the tokens' signatures
    without fetching the issuer's keys over the network (scitokens-cpp reads
    ``$XDG_CACHE_HOME/scitokens/scitokens_cpp.sqllite`` before it asks the issuer)."""

    def __init__(self, directory: str | os.PathLike | None = None,
                 issuer: str = "https://issuer.ckpt-tasks.test", audience: str = "ckpt-tasks-test"):
        from cryptography.hazmat.primitives.asymmetric import ec

        self.issuer, self.audience = issuer, audience
        self.cache_home = Path(tempfile.mkdtemp(prefix="ckpt-issuer-", dir=directory))
        self.cache_home.chmod(0o755)
        self._key = ec.generate_private_key(ec.SECP256R1())
        numbers = self._key.public_key().public_numbers()
        jwks = {"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "test-key",
                          "x": _b64(numbers.x.to_bytes(32, "big")), "y": _b64(numbers.y.to_bytes(32, "big"))}]}
        (self.cache_home / "scitokens").mkdir()
        never = int(time.time()) + 7 * 86400  # no refresh from the network during a test run
        with contextlib.closing(sqlite3.connect(self.cache_home / "scitokens" / "scitokens_cpp.sqllite")) as db:
            db.execute("CREATE TABLE keycache (issuer text UNIQUE PRIMARY KEY NOT NULL, keys text NOT NULL)")
            db.execute("INSERT INTO keycache VALUES (?, ?)",
                       (issuer, json.dumps({"jwks": jwks, "expires": never, "next_update": never})))
            db.commit()

    def token(self, scope: str, subject: str = "alice", lifetime: dt.timedelta = dt.timedelta(hours=1),
              audience: str | None = None) -> str:
        """A signed WLCG token (ES256) with ``scope``, e.g. ``"storage.read:/alice storage.modify:/alice"``."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        now = int(time.time())
        header = {"alg": "ES256", "typ": "JWT", "kid": "test-key"}
        claims = {"iss": self.issuer, "sub": subject, "aud": audience or self.audience, "scope": scope,
                  "iat": now, "nbf": now - 60, "exp": now + int(lifetime.total_seconds()),
                  "wlcg.ver": "1.0", "jti": os.urandom(8).hex()}
        signed = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signed.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signed}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def cleanup(self) -> None:
        shutil.rmtree(self.cache_home, ignore_errors=True)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_secret(path: str | os.PathLike, text: str) -> Path:
    """Write a credential file readable by its owner only (as the XRootD client wants)."""
    path = Path(path)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)
    return path


def make_keytab(path: str | os.PathLike, user: str, group: str = "users", key_name: str = "ckpt") -> Path:
    """An ``sss`` keytab made by ``xrdsssadmin``: one key that names ``user``."""
    if shutil.which("xrdsssadmin") is None:
        raise ServerUnavailable("xrdsssadmin is not installed (apt-get install xrootd-client)")
    path = Path(path)
    result = subprocess.run(["xrdsssadmin", "-k", key_name, "-u", user, "-g", group, "add", str(path)],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0 or not path.is_file():
        raise ServerUnavailable(f"xrdsssadmin failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    path.chmod(0o600)
    return path


#: variables through which a client could find a credential other than the one a test gives it
_CREDENTIAL_VARIABLES = ("X509_USER_PROXY", "X509_USER_CERT", "X509_USER_KEY", "X509_CERT_DIR",
                         "BEARER_TOKEN", "BEARER_TOKEN_FILE", "XrdSecSSSKT", "XrdSecPROTOCOL")


def client_env(pki: TestPKI | None = None, proxy: str | os.PathLike | None = None,
               keytab: str | os.PathLike | None = None, **extra: str) -> dict[str, str]:
    """The environment of a client process that holds exactly the credentials given."""
    env = {key: value for key, value in os.environ.items() if key not in _CREDENTIAL_VARIABLES}
    # Without a proxy the variable stays unset: the client's TLS layer also loads it as its
    # client certificate and fails to start TLS at all when it names a file that is not there.
    if proxy is not None:
        env["X509_USER_PROXY"] = str(proxy)
    if pki is not None:
        env["X509_CERT_DIR"] = str(pki.cert_dir)
    if keytab is not None:
        env["XrdSecSSSKT"] = str(keytab)
    env.update(extra)
    return env


#: the client process: ``tests/helpers/auth_client.py`` (its docstring lists the operations)
CLIENT = str(Path(__file__).parent / "helpers" / "auth_client.py")


def run_as(env: dict[str, str], operation: str, location: str, *args: str, timeout: float = 60.0) -> dict:
    """Run one store ``operation`` (see :data:`CLIENT`) in a client process with ``env``;
    return its JSON answer: ``{"ok": ..., "error": class name, "message": ..., "seconds": ...}``."""
    result = subprocess.run([sys.executable, CLIENT, operation, location, *args], env=env,
                            capture_output=True, text=True, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise AssertionError(f"client {operation} exited with {result.returncode}: {result.stderr[-2000:]}")
    answer = json.loads(lines[-1])
    answer["stderr"] = result.stderr
    return answer


class ClientSession:
    """One client process that keeps its XRootD connections across operations (as a training
    does): ``session.do("save", "3")`` answers like :func:`run_as`."""

    def __init__(self, env: dict[str, str], location: str):
        self.process = subprocess.Popen([sys.executable, CLIENT, "serve", location], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def do(self, operation: str, *args: str) -> dict:
        self.process.stdin.write(" ".join([operation, *args]) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the client session ended with {self.process.wait(10)}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
