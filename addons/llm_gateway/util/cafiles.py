"""The gateway's CA as files: made (RSA, `cryptography`), read, saved and installed where mitmproxy looks.

One CA for every replica (a Kubernetes Secret), instead of a CA per confdir; addons/ca.py installs it, and
tools/ca.py (scripts/make-ca) makes it. No mitmproxy import: the file names are mitmproxy's, as constants.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CONF_BASENAME = "mitmproxy"  # mitmproxy.options.CONF_BASENAME: the file names TlsConfig looks for


SECRET_NAME = "llm-gateway-ca"  # the Secret deploy/k8s/deployment.yaml mounts


NAMESPACE = "llm-gateway"


DEFAULT_CN = "LLM gateway CA"


DEFAULT_DAYS = 3650


KEY_BITS = 3072


class CAError(ValueError):
    """A CA that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class CA:
    key: PrivateKeyTypes  # RSA from make-ca; whatever cryptography loads otherwise
    cert: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def create(cn: str = DEFAULT_CN, days: int = DEFAULT_DAYS) -> CA:
    """A CA with the extensions mitmproxy gives its own (clients with strict X.509 checks accept it)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))  # clocks that lag a little
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(key, cert)


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (0600 whatever the umask), atomically."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save(ca: CA, folder: Path) -> tuple[Path, Path]:
    """`tls.crt` and `tls.key` in `folder` (made 0700 if new), as `kubectl create secret tls` takes them."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, cert_path = folder / "tls.key", folder / "tls.crt"
    write_private(key_path, ca.key_pem())
    write_public(cert_path, ca.cert_pem())
    return cert_path, key_path


def read(source: str | os.PathLike[str]) -> CA:
    """The CA at `source`: a folder with tls.crt + tls.key or mitmproxy-ca.pem, or one PEM with both."""
    path = Path(source)
    if path.is_dir():
        if (path / "tls.crt").exists() or (path / "tls.key").exists():
            return _parse(_read(path / "tls.key"), _read(path / "tls.crt"), path)
        if (path / f"{CONF_BASENAME}-ca.pem").exists():
            pem = _read(path / f"{CONF_BASENAME}-ca.pem")
            return _parse(pem, pem, path / f"{CONF_BASENAME}-ca.pem")
        raise CAError(f"{path}: holds neither tls.crt and tls.key nor {CONF_BASENAME}-ca.pem")
    pem = _read(path)
    return _parse(pem, pem, path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CAError(f"{path}: {e.strerror or e}") from None


def _parse(key_pem: bytes, cert_pem: bytes, where: Path) -> CA:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CAError(f"{where}: no unencrypted PEM private key ({e})") from None
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except (ValueError, IndexError):
        raise CAError(f"{where}: no PEM certificate") from None
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*der) != key.public_key().public_bytes(*der):
        raise CAError(f"{where}: the private key does not belong to the certificate")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CAError(f"{where}: the certificate is not a CA (no basicConstraints CA:TRUE)")
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        raise CAError(f"{where}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return CA(key, cert)


def install(ca: CA, folder: Path) -> None:
    """Lay the CA out as mitmproxy's confdir expects it; the key file is readable by its owner only."""
    write_private(folder / f"{CONF_BASENAME}-ca.pem", ca.key_pem() + ca.cert_pem())
    write_public(folder / f"{CONF_BASENAME}-ca-cert.pem", ca.cert_pem())
    write_public(folder / f"{CONF_BASENAME}-ca-cert.cer", ca.cert_pem())
