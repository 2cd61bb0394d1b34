"""One CA for every replica: making it (scripts/make-ca), reading it, and the gateway_ca addon."""

from __future__ import annotations

import datetime
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mitmproxy import certs, exceptions
from mitmproxy.test import taddons

from llm_gateway.tools import ca as ca_tool
from llm_gateway.util import cafiles
from llm_gateway.util.cafiles import CAError
from llm_gateway.addons.ca import GatewayCA


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def made() -> cafiles.CA:
    return cafiles.create("Test gateway CA", days=30)


@pytest.fixture
def ca_dir(tmp_path, made) -> Path:
    cafiles.save(made, tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture
def open_umask():
    old = os.umask(0)  # the most permissive: the key must still come out owner-only
    yield
    os.umask(old)


# -- making ---------------------------------------------------------------------------------------------


def test_save_writes_key_owner_only_whatever_the_umask(tmp_path, made, open_umask):
    cert_path, key_path = cafiles.save(made, tmp_path / "new")
    assert mode(key_path) == 0o600
    assert mode(cert_path) == 0o644
    assert mode(tmp_path / "new") == 0o700
    assert not [p for p in (tmp_path / "new").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_made_ca_is_a_ca_with_the_extensions_strict_clients_need(made):
    cert = made.cert
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "Test gateway CA"
    days = (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).days
    assert 29 <= days <= 30


def test_make_ca_command_prints_the_secret_command_and_makes_the_ca_once(tmp_path, capsys, open_umask):
    out = tmp_path / "shared-ca"
    assert ca_tool.main(["--out", str(out), "--cn", "Cluster CA", "--days", "10"]) == 0
    printed = capsys.readouterr().out
    assert f"kubectl -n llm-gateway create secret tls {cafiles.SECRET_NAME} --cert={out}/tls.crt --key={out}/tls.key" in printed
    assert mode(out / "tls.key") == 0o600
    first = (out / "tls.key").read_bytes()
    assert cafiles.read(out).cert.subject.rfc4514_string() == "O=Cluster CA,CN=Cluster CA"

    assert ca_tool.main(["--out", str(out)]) == 1  # made once
    assert "exists" in capsys.readouterr().err
    assert (out / "tls.key").read_bytes() == first
    assert ca_tool.main(["--out", str(out), "--force"]) == 0
    assert (out / "tls.key").read_bytes() != first
    assert mode(out / "tls.key") == 0o600


# -- reading --------------------------------------------------------------------------------------------


def test_reads_a_tls_secret_folder_a_mitmproxy_confdir_and_one_pem(tmp_path, ca_dir, made):
    assert cafiles.read(ca_dir).fingerprint == made.fingerprint
    confdir = tmp_path / "confdir"
    confdir.mkdir()
    cafiles.install(made, confdir)
    assert cafiles.read(confdir).fingerprint == made.fingerprint
    pem = tmp_path / "both.pem"
    pem.write_bytes(made.cert_pem() + made.key_pem())  # either order
    assert cafiles.read(pem).fingerprint == made.fingerprint


def test_reads_mitmproxys_own_ca(tmp_path):
    certs.CertStore.create_store(tmp_path, "mitmproxy", 2048)
    store = certs.CertStore.from_store(tmp_path, "mitmproxy", 2048)
    assert cafiles.read(tmp_path).cert == store.default_ca._cert


def pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def test_refuses_what_cannot_be_a_ca(tmp_path, made):
    other = cafiles.create("Other", days=5)
    folder = tmp_path / "mismatch"
    folder.mkdir()
    (folder / "tls.crt").write_bytes(made.cert_pem())
    (folder / "tls.key").write_bytes(other.key_pem())
    with pytest.raises(CAError, match="does not belong"):
        cafiles.read(folder)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "leaf")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
    )
    leaf = builder.not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    (tmp_path / "leaf.pem").write_bytes(pem_key(key) + leaf.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CAError, match="not a CA"):
        cafiles.read(tmp_path / "leaf.pem")

    expired = cafiles.create("Old", days=-1)
    (tmp_path / "old.pem").write_bytes(expired.key_pem() + expired.cert_pem())
    with pytest.raises(CAError, match="expired"):
        cafiles.read(tmp_path / "old.pem")

    (tmp_path / "cert-only.pem").write_bytes(made.cert_pem())
    with pytest.raises(CAError, match="private key"):
        cafiles.read(tmp_path / "cert-only.pem")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CAError, match="neither"):
        cafiles.read(tmp_path / "empty")
    with pytest.raises(CAError, match="No such file"):
        cafiles.read(tmp_path / "missing")


# -- the addon ------------------------------------------------------------------------------------------


def test_gateway_ca_installs_into_a_private_confdir_and_leaves_the_configured_one_alone(tmp_path, ca_dir, made, open_umask):
    own = tmp_path / "own-confdir"
    certs.CertStore.create_store(own, "mitmproxy", 2048)
    before = {p.name: p.read_bytes() for p in own.iterdir()}
    addon = GatewayCA()
    with taddons.context(addon) as tctx:
        tctx.options.confdir = str(own)
        tctx.configure(addon, gateway_ca=str(ca_dir))
        confdir = Path(tctx.options.confdir)
        assert confdir != own and confdir == addon.folder
        assert mode(confdir) == 0o700
        assert mode(confdir / "mitmproxy-ca.pem") == 0o600
        assert mode(confdir / "mitmproxy-ca-cert.pem") == 0o644
        # what mitmproxy's TlsConfig loads from there is this CA
        store = certs.CertStore.from_store(confdir, "mitmproxy", 2048)
        assert store.default_ca._cert == made.cert
        assert (confdir / "mitmproxy-ca-cert.pem").read_bytes() == made.cert_pem()
        assert {p.name: p.read_bytes() for p in own.iterdir()} == before

        addon.done()
        assert not confdir.exists()


def test_broken_ca_at_start_is_an_error_and_confdir_is_kept(tmp_path, caplog):
    addon = GatewayCA()
    with taddons.context(addon) as tctx:
        tctx.options.confdir = str(tmp_path / "confdir")
        with caplog.at_level(logging.ERROR):
            tctx.configure(addon, gateway_ca=str(tmp_path / "nope"))
        assert "gateway_ca:" in caplog.text and "nope" in caplog.text
        assert tctx.options.confdir == str(tmp_path / "confdir")
        assert addon.ca is None


def test_broken_ca_later_is_refused_and_the_running_ca_stays(tmp_path, ca_dir, made):
    addon = GatewayCA()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_ca=str(ca_dir))
        confdir = tctx.options.confdir
        with pytest.raises(exceptions.OptionsError, match="gateway_ca: .*nope"):
            tctx.configure(addon, gateway_ca=str(tmp_path / "nope"))
        assert tctx.options.confdir == confdir
        assert addon.ca.fingerprint == made.fingerprint
        addon.done()


def test_without_gateway_ca_nothing_changes(tmp_path):
    addon = GatewayCA()
    with taddons.context(addon) as tctx:
        tctx.options.confdir = str(tmp_path)
        tctx.configure(addon, gateway_ca="")
        assert tctx.options.confdir == str(tmp_path)
        assert addon.folder is None
