"""The local CA and the gateway certificate of `coppice serve --tls` (coppice/tls.py)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from coppice.tls import TlsFiles, ensure_tls

NOW = datetime.datetime(2026, 12, 3, tzinfo=datetime.UTC)


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    """A stand-in for the system's root bundle."""
    path = tmp_path / "system-roots.pem"
    path.write_bytes(_self_signed("Some Public Root").public_bytes(serialization.Encoding.PEM))
    return path


def _self_signed(name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _make(
    data_dir: Path, roots: Path, domain: str = "coppice.lan", now: datetime.datetime = NOW
) -> TlsFiles:
    return ensure_tls(data_dir, domain, roots=roots, now=now)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify(files: TlsFiles, name: x509.DNSName | x509.IPAddress, leaf: x509.Certificate) -> None:
    """Full path validation (name constraints included), as a client does."""
    store = verification.Store([_cert(files.ca_cert)])
    builder = verification.PolicyBuilder().store(store).time(NOW)
    builder.build_server_verifier(name).verify(leaf, [])


def _contents(files: TlsFiles) -> list[bytes]:
    return [p.read_bytes() for p in (files.ca_cert, files.ca_key, files.cert, files.key)]


def test_the_certificate_names_the_domain_its_sandboxes_and_this_host(
    tmp_path: Path, roots: Path
) -> None:
    files = _make(tmp_path, roots)
    names = _cert(files.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert set(names.value.get_values_for_type(x509.DNSName)) == {
        "coppice.lan",
        "*.coppice.lan",
        "localhost",
    }
    assert set(names.value.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("49983-i0abc.coppice.lan"),
        x509.DNSName("coppice.lan"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ],
)
def test_the_ca_signs_it_for_every_name(
    tmp_path: Path, roots: Path, name: x509.GeneralName
) -> None:
    files = _make(tmp_path, roots)
    assert isinstance(name, x509.DNSName | x509.IPAddress)
    _verify(files, name, _cert(files.cert))


def test_the_ca_vouches_for_no_other_site(tmp_path: Path, roots: Path) -> None:
    """Name-constrained: even a certificate its own key signs for another name is refused."""
    files = _make(tmp_path, roots)
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = _cert(files.ca_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.com")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("example.com")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    with pytest.raises(verification.VerificationError):
        _verify(files, x509.DNSName("example.com"), forged)
    with pytest.raises(verification.VerificationError):
        _verify(files, x509.DNSName("49983-i0abc.other.lan"), _cert(files.cert))


def test_an_openssl_client_trusting_the_ca_completes_a_handshake(
    tmp_path: Path, roots: Path
) -> None:
    files = _make(tmp_path, roots)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.cert, files.key)
    client = ssl.create_default_context(cafile=files.bundle)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(to_client, to_server, server_hostname="49999-i0abc.coppice.lan")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):  # its turn to wait for the peer
                end.do_handshake()
        s_in.write(to_server.read())
        to_client.write(s_out.read())
    c.do_handshake()  # raises unless done and verified
    assert c.getpeercert() is not None


def test_keys_are_private_from_their_first_byte(tmp_path: Path, roots: Path) -> None:
    files = _make(tmp_path, roots)
    assert files.ca_key.stat().st_mode & 0o777 == 0o600
    assert files.key.stat().st_mode & 0o777 == 0o600


def test_a_later_start_reuses_everything(tmp_path: Path, roots: Path) -> None:
    first = _make(tmp_path, roots)
    before = _contents(first)
    mtimes = [p.stat().st_mtime_ns for p in (first.ca_cert, first.cert, first.bundle)]
    second = _make(tmp_path, roots, now=NOW + datetime.timedelta(days=100))
    assert _contents(second) == before
    assert [p.stat().st_mtime_ns for p in (second.ca_cert, second.cert, second.bundle)] == mtimes


def test_a_certificate_near_its_end_is_reissued_by_the_same_ca(tmp_path: Path, roots: Path) -> None:
    files = _make(tmp_path, roots, now=NOW)
    ca, cert = files.ca_cert.read_bytes(), files.cert.read_bytes()
    _make(tmp_path, roots, now=NOW + datetime.timedelta(days=800))
    assert files.ca_cert.read_bytes() == ca
    assert files.cert.read_bytes() != cert
    _cert(files.cert).verify_directly_issued_by(_cert(files.ca_cert))


def test_a_broken_certificate_is_reissued(tmp_path: Path, roots: Path) -> None:
    files = _make(tmp_path, roots)
    ca = files.ca_cert.read_bytes()
    files.key.write_bytes(b"not a key")
    _make(tmp_path, roots)
    assert files.ca_cert.read_bytes() == ca
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    assert key.public_key() == _cert(files.cert).public_key()


def test_another_domain_gets_a_new_ca(tmp_path: Path, roots: Path) -> None:
    """The CA is constrained to its domain, so it cannot sign for a new one."""
    files = _make(tmp_path, roots)
    ca = files.ca_cert.read_bytes()
    _make(tmp_path, roots, domain="sandboxes.example")
    assert files.ca_cert.read_bytes() != ca
    _verify(files, x509.DNSName("49983-i0abc.sandboxes.example"), _cert(files.cert))


def test_the_bundle_is_the_system_roots_plus_our_ca_kept_current(
    tmp_path: Path, roots: Path
) -> None:
    files = _make(tmp_path, roots)
    ca = files.ca_cert.read_bytes()
    assert files.bundle.read_bytes() == roots.read_bytes() + ca
    roots.write_bytes(roots.read_bytes() * 2)  # the system's roots changed
    _make(tmp_path, roots)
    assert files.bundle.read_bytes() == roots.read_bytes() + ca
