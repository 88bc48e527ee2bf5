"""The local CA and the gateway's certificate of `coppice serve --tls`, kept in `<data dir>/tls/`.

Made on the first start, reused on later ones: the CA (clients trust it once) lives ten years; the
server certificate, for `<domain>`, `*.<domain>`, `localhost` and 127.0.0.1/::1, is re-issued
by that CA when it is near its end, when the domain changes, or when the CA is new. The CA is
name-constrained to those names, so trusting it can never vouch for any other site. All of this
is blocking file and crypto work: callers on an event loop run it in a thread.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = datetime.timedelta(days=3650)
# 825 days: the longest any client accepts for a server certificate, even from a private CA.
SERVER_LIFETIME = datetime.timedelta(days=825)
# Re-issued at a start this close to its end, so a running service does not meet it.
RENEW_BEFORE = datetime.timedelta(days=30)
LOCAL_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))

# Where the common systems keep their root bundle (Debian, Fedora, FreeBSD, macOS/Alpine).
_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/usr/local/share/certs/ca-root-nss.crt",
    "/etc/ssl/cert.pem",
)


@dataclass(frozen=True)
class TlsFiles:
    """The files of `<data dir>/tls/`: PEM certificates, PEM keys (mode 0600)."""

    directory: Path
    ca_cert: Path  # our CA: what NODE_EXTRA_CA_CERTS names
    ca_key: Path
    cert: Path  # the gateway's certificate, signed by the CA
    key: Path
    bundle: Path  # the system's roots plus our CA: what SSL_CERT_FILE names


def tls_files(data_dir: Path) -> TlsFiles:
    """The paths (nothing is read or made)."""
    tls = data_dir / "tls"
    return TlsFiles(
        directory=tls,
        ca_cert=tls / "ca.pem",
        ca_key=tls / "ca-key.pem",
        cert=tls / "server.pem",
        key=tls / "server-key.pem",
        bundle=tls / "ca-bundle.pem",
    )


def server_names(domain: str) -> tuple[str, ...]:
    """The DNS names of the server certificate: sandbox hosts are `<port>-<id>.<domain>`."""
    return (domain, f"*.{domain}", "localhost")


def ensure_tls(
    data_dir: Path, domain: str, *, now: datetime.datetime | None = None, roots: Path | None = None
) -> TlsFiles:
    """Make (or reuse) the CA and the server certificate for `domain`, and rewrite the bundle
    from the system's roots (`roots`, default `system_roots()`) plus our CA."""
    now = now or datetime.datetime.now(datetime.UTC)
    files = tls_files(data_dir)
    files.directory.mkdir(parents=True, exist_ok=True)
    ca = _load_ca(files, domain, now)
    if ca is None:
        ca = _new_ca(domain, now)
        _write(files.ca_key, _key_pem(ca[1]), private=True)
        _write(files.ca_cert, ca[0].public_bytes(serialization.Encoding.PEM))
    ca_cert, ca_key = ca
    if not _server_cert_fits(files, ca_cert, domain, now):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _new_server_cert(key, ca_cert, ca_key, domain, now)
        _write(files.key, _key_pem(key), private=True)
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    roots = roots if roots is not None else system_roots()
    system = roots.read_bytes().rstrip(b"\n") + b"\n" if roots is not None else b""
    bundle = system + ca_cert.public_bytes(serialization.Encoding.PEM)
    with contextlib.suppress(FileNotFoundError):
        if files.bundle.read_bytes() == bundle:
            return files
    _write(files.bundle, bundle)
    return files


def system_roots() -> Path | None:
    """This system's root bundle: OpenSSL's default file, a known path, or certifi's."""
    candidates = [ssl.get_default_verify_paths().cafile, *_SYSTEM_BUNDLES]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    try:
        import certifi
    except ImportError:
        return None
    return Path(certifi.where())


def _load_ca(
    files: TlsFiles, domain: str, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA on disk if it is whole, not near its end, and permitted to vouch for `domain`."""
    try:
        cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    if x509.DNSName(domain) not in (constraints.permitted_subtrees or ()):
        return None  # made for another domain: a new CA, which clients must trust anew
    return cert, key


def _new_ca(
    domain: str, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Coppice local CA for {domain}")])
    permitted: list[x509.GeneralName] = [x509.DNSName(domain), x509.DNSName("localhost")]
    permitted += [x509.IPAddress(ipaddress.ip_network(ip)) for ip in LOCAL_IPS]
    cert = (
        _builder(name, name, key.public_key(), now, CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.NameConstraints(permitted, None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    domain: str,
    now: datetime.datetime,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(subject, ca_cert.subject, key.public_key(), now, SERVER_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(_alt_names(domain)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _alt_names(domain: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names(domain)]
    return names + [x509.IPAddress(ip) for ip in LOCAL_IPS]


def _server_cert_fits(
    files: TlsFiles, ca_cert: x509.Certificate, domain: str, now: datetime.datetime
) -> bool:
    """The certificate on disk is signed by this CA, names exactly what it should, has its key,
    and is not near its end."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        alt_names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (
        key.public_key() == cert.public_key()
        and _same_names(list(alt_names), _alt_names(domain))
        and cert.not_valid_after_utc - now >= RENEW_BEFORE
    )


def _same_names(have: Sequence[x509.GeneralName], want: Sequence[x509.GeneralName]) -> bool:
    return sorted(map(repr, have)) == sorted(map(repr, want))


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    lifetime: datetime.timedelta,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # An hour back: a client whose clock is a little behind still accepts it.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Atomically (a reader never sees half a file); a key is 0600 from its first byte."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
