"""The credentials of this process: an X.509 proxy and a bearer token, with their lifetimes.

They are found where the XRootD client looks for them:

- X.509 proxy: ``$X509_USER_PROXY``, else ``/tmp/x509up_u<uid>``;
- bearer token (the WLCG token discovery): ``$BEARER_TOKEN`` (the token itself), else the
  file ``$BEARER_TOKEN_FILE``, else ``$XDG_RUNTIME_DIR/bt_u<uid>``, else ``/tmp/bt_u<uid>``.
  HTCondor's own token files (``$_CONDOR_CREDS/<service>.use``) are not among them;
  :func:`condor_token_files` lists them so that a job can be told to name one.

Lifetimes are read without external tools: the proxy's certificate chain with the
``cryptography`` package (the chain ends when its first certificate does), a token's
``exp`` claim by decoding the JWT payload (no signature check: only the server's check
counts, this is only the clock).

A :class:`Credential` holds where a credential is and when it ends, never its content: its
``repr`` and ``str`` are safe to log, and so is every error raised here.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ckpt_tasks.errors import CkptTasksError

X509_PROXY = "x509 proxy"
BEARER_TOKEN = "bearer token"


class CredentialError(CkptTasksError):
    """A credential is named (by a variable or a default path) but cannot be read or parsed.
    The message names the file and the cause, never the content."""


@dataclass(frozen=True)
class Credential:
    """Where a credential is and when it expires; it does not hold the credential itself."""

    #: :data:`X509_PROXY` or :data:`BEARER_TOKEN`
    kind: str
    #: how it was found: the variable's name, or "default path"
    source: str
    #: the file; None for a token given in ``$BEARER_TOKEN`` itself
    path: Path | None
    #: when it stops being valid (UTC); None when it cannot be told (a token that is no JWT)
    expires: dt.datetime | None
    #: whose it is, as far as that is no secret: the proxy's subject, the token's issuer
    identity: str | None = None
    #: for a VOMS proxy, when its VO attributes end (storage that authorizes by VO refuses
    #: after that even while the proxy is valid); ``expires`` is then the earlier of the two
    voms_expires: dt.datetime | None = None

    def remaining(self, now: dt.datetime | None = None) -> dt.timedelta | None:
        """The lifetime left (negative once expired); None when the expiry is unknown."""
        if self.expires is None:
            return None
        return self.expires - (now or dt.datetime.now(dt.timezone.utc))

    def expired(self, now: dt.datetime | None = None) -> bool:
        remaining = self.remaining(now)
        return remaining is not None and remaining <= dt.timedelta(0)

    def describe(self, now: dt.datetime | None = None) -> str:
        """``x509 proxy /tmp/x509up_u1000 (X509_USER_PROXY), expires ... (in 1:59:00)``."""
        where = str(self.path) if self.path else "in the environment"
        text = f"{self.kind} {where} ({self.source})"
        if self.identity:
            text += f" of {self.identity}"
        remaining = self.remaining(now)
        if remaining is None:
            return text + ", expiry unknown"
        when = self.expires.strftime("%Y-%m-%d %H:%M:%S UTC")
        if self.voms_expires is not None and self.voms_expires <= self.expires:
            text += ", whose VOMS attributes end first"
        if remaining <= dt.timedelta(0):
            return text + f", expired at {when} ({_duration(-remaining)} ago)"
        return text + f", expires at {when} (in {_duration(remaining)})"

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return f"Credential({self.describe()})"


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _uid(uid: int | None) -> int:
    return os.getuid() if uid is None else uid


# -- X.509 proxy -----------------------------------------------------------------------------

def find_proxy(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Credential | None:
    """The X.509 proxy the XRootD client would use, or None when there is none.

    Raises :class:`CredentialError` when ``$X509_USER_PROXY`` names a file that is not
    there, or when the proxy file cannot be read or holds no certificate.
    """
    env = _environ(environ)
    if env.get("X509_USER_PROXY"):
        path, source = Path(env["X509_USER_PROXY"]), "X509_USER_PROXY"
        if not path.is_file():
            raise CredentialError(f"X509_USER_PROXY names {path}, which is not a file: no proxy there")
    else:
        path, source = Path(f"/tmp/x509up_u{_uid(uid)}"), "default path"
        if not path.is_file():
            return None
    return read_proxy(path, source)


def read_proxy(path: str | os.PathLike, source: str = "file") -> Credential:
    """Read the lifetime of the proxy (or any PEM certificate chain) at ``path``: the earliest
    end of its certificates. The private key in the file is never parsed."""
    from cryptography import x509

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CredentialError(f"cannot read the x509 proxy {path}: {error.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        # the parser's message is generic; never pass on anything of the file's content
        raise CredentialError(f"{path} holds no PEM certificate: not an x509 proxy") from None
    expires = min(cert.not_valid_after_utc for cert in chain)
    voms_ends = [end for cert in chain for end in _voms_ends(cert)]
    voms_expires = min(voms_ends) if voms_ends else None
    return Credential(X509_PROXY, source, path, min(expires, voms_expires or expires),
                      identity=_end_entity_subject(chain), voms_expires=voms_expires)


#: the VOMS attribute certificates a VOMS proxy carries (an RFC 5755 AC sequence)
_VOMS_ACS_DOTTED = "1.3.6.1.4.1.8005.100.100.5"
_SEQUENCE, _GENERALIZED_TIME = 0x30, 0x18


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) of the DER elements that follow each other in ``data``."""
    items, offset = [], 0
    while offset + 2 <= len(data):
        tag, length = data[offset], data[offset + 1]
        offset += 2
        if length & 0x80:  # long form: the next (length & 0x7f) bytes hold the length
            count = length & 0x7F
            length = int.from_bytes(data[offset:offset + count], "big")
            offset += count
        items.append((tag, data[offset:offset + length]))
        offset += length
    return items


def _sequences(data: bytes) -> list[bytes]:
    return [content for tag, content in _der_items(data) if tag == _SEQUENCE]


def _voms_ends(cert) -> list[dt.datetime]:
    """When each VOMS attribute certificate in ``cert`` ends. The extension holds
    SEQUENCE { SEQUENCE OF AttributeCertificate ... }; an AC's first field is its
    AttributeCertificateInfo, whose attrCertValidityPeriod is the one field that is a
    sequence of two GeneralizedTimes."""
    from cryptography import x509

    try:
        extension = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(_VOMS_ACS_DOTTED))
    except x509.ExtensionNotFound:
        return []
    ends = []
    for outer in _sequences(extension.value.value):
        for ac_sequence in _sequences(outer):
            for ac in _sequences(ac_sequence):
                info = _sequences(ac)[:1]
                for field in _sequences(info[0]) if info else []:
                    times = _der_items(field)
                    if len(times) == 2 and all(tag == _GENERALIZED_TIME for tag, _ in times):
                        ends.append(dt.datetime.strptime(times[1][1].decode("ascii"), "%Y%m%d%H%M%SZ")
                                    .replace(tzinfo=dt.timezone.utc))
                        break
    return ends


#: id-pe-proxyCertInfo (RFC 3820): marks a proxy certificate
_PROXY_CERT_INFO_DOTTED = "1.3.6.1.5.5.7.1.14"


def _end_entity_subject(chain: list) -> str:
    """The subject of the user certificate behind the proxies, in the slash form grid tools print."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    def is_proxy(cert) -> bool:
        try:
            cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(_PROXY_CERT_INFO_DOTTED))
            return True
        except x509.ExtensionNotFound:
            return False

    user = next((cert for cert in chain if not is_proxy(cert)), chain[-1])
    names = {NameOID.DOMAIN_COMPONENT: "DC", NameOID.ORGANIZATION_NAME: "O",
             NameOID.ORGANIZATIONAL_UNIT_NAME: "OU", NameOID.COMMON_NAME: "CN", NameOID.COUNTRY_NAME: "C",
             NameOID.LOCALITY_NAME: "L", NameOID.STATE_OR_PROVINCE_NAME: "ST"}
    return "".join(f"/{names.get(attribute.oid, attribute.oid.dotted_string)}={attribute.value}"
                   for attribute in user.subject)


# -- bearer token ----------------------------------------------------------------------------

def find_token(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Credential | None:
    """The bearer token the XRootD client would use, or None when there is none.

    Raises :class:`CredentialError` when ``$BEARER_TOKEN_FILE`` names a file that is not
    there or cannot be read.
    """
    env = _environ(environ)
    if env.get("BEARER_TOKEN", "").strip():
        return token_credential(env["BEARER_TOKEN"], "BEARER_TOKEN", None)
    if env.get("BEARER_TOKEN_FILE"):
        path = Path(env["BEARER_TOKEN_FILE"])
        if not path.is_file():
            raise CredentialError(f"BEARER_TOKEN_FILE names {path}, which is not a file: no token there")
        return read_token(path, "BEARER_TOKEN_FILE")
    candidates = [Path(env["XDG_RUNTIME_DIR"]) / f"bt_u{_uid(uid)}"] if env.get("XDG_RUNTIME_DIR") else []
    candidates.append(Path(f"/tmp/bt_u{_uid(uid)}"))
    for path in candidates:
        if path.is_file():
            return read_token(path, "default path")
    return None


def read_token(path: str | os.PathLike, source: str = "file") -> Credential:
    """Read the lifetime of the token in the file ``path``."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        raise CredentialError(f"cannot read the bearer token {path}: {error.strerror}") from None
    if not text.strip():
        raise CredentialError(f"the bearer token file {path} is empty")
    return token_credential(text, source, path)


def token_credential(token: str, source: str, path: Path | None) -> Credential:
    """A :class:`Credential` for ``token``: its expiry and issuer from the JWT payload, when
    it is a JWT (an opaque token has an unknown expiry). The token itself is not kept."""
    claims = _jwt_claims(token.strip())
    expires = None
    if isinstance(claims.get("exp"), (int, float)):
        expires = dt.datetime.fromtimestamp(claims["exp"], dt.timezone.utc)
    issuer = claims.get("iss") if isinstance(claims.get("iss"), str) else None
    return Credential(BEARER_TOKEN, source, path, expires, identity=issuer)


def _jwt_claims(token: str) -> dict:
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def condor_token_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The tokens HTCondor gives a job submitted with ``use_oauth_services``
    (``$_CONDOR_CREDS/<service>.use``, kept fresh by HTCondor). The XRootD client does not
    look there: the job must point ``BEARER_TOKEN_FILE`` at one of them."""
    directory = _environ(environ).get("_CONDOR_CREDS")
    if not directory or not Path(directory).is_dir():
        return []
    return sorted(Path(directory).glob("*.use"))


def find_credentials(environ: Mapping[str, str] | None = None, uid: int | None = None) -> list[Credential]:
    """Every credential found (proxy first, then token); errors as :func:`find_proxy`."""
    return [credential for credential in (find_proxy(environ, uid), find_token(environ, uid))
            if credential is not None]
