"""Certificates for a deployment: a CA, a server certificate it signed, per-hospital key pairs."""

from __future__ import annotations

import ipaddress
import os

import pytest

from fedjax_med.deploy import flower, tls

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import (  # noqa: E402
    load_ssh_private_key,
    load_ssh_public_key,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    return out, tls.make_certificates(str(out), ["north", "south"], hosts=["link.example.org"])


def test_the_server_certificate_is_signed_by_the_ca_for_the_dialled_names(certs):
    _, paths = certs
    ca = x509.load_pem_x509_certificate(open(paths["ca"], "rb").read())
    server = x509.load_pem_x509_certificate(open(paths["server_cert"], "rb").read())
    server.verify_directly_issued_by(ca)  # raises on a wrong signature or issuer
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_each_hospital_gets_its_own_key_pair_in_flowers_format(certs):
    out, paths = certs
    publics = set()
    for site in ("north", "south"):
        private = load_ssh_private_key(open(paths[f"site:{site}"], "rb").read(), None)
        public = load_ssh_public_key(open(paths[f"site:{site}"] + ".pub", "rb").read())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert os.stat(paths[f"site:{site}"]).st_mode & 0o077 == 0  # private: owner only
        publics.add(public.public_numbers().x)
    assert len(publics) == 2
    assert os.stat(out / "server.key").st_mode & 0o077 == 0


def test_bad_site_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        tls.make_certificates(str(tmp_path), ["a", "a"])
    with pytest.raises(ValueError, match="plain, non-empty"):
        tls.make_certificates(str(tmp_path), ["../a"])


def test_missing_flower_names_the_install_command(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_flwr(name, *args):
        if name.startswith("flwr"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_flwr)
    with pytest.raises(ImportError, match=r"pip install 'fedjax_med\[deploy\]'"):
        flower.require()
