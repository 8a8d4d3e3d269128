"""Certificates and keys of a deployment, made with ``cryptography``.

:func:`make_certificates` writes into one folder:

* ``ca.crt`` / ``ca.key``: a certificate authority (EC P-384, self-signed, 1 year). ``ca.crt``
  goes to every party (the SuperNodes and ``flwr`` verify the SuperLink with it); ``ca.key``
  stays with whoever issues certificates.
* ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for
  ``localhost``, ``127.0.0.1`` and the ``hosts`` given (the names the hospitals dial).
* ``sites/<NAME>`` / ``sites/<NAME>.pub``: each hospital's SuperNode authentication key pair
  (EC P-384, OpenSSH format, as Flower's node authentication reads them). The private key goes
  to that hospital only; the public key is registered with the SuperLink, and only registered
  SuperNodes may join.

These are for a study's own small PKI and for tests: an institution with its own CA issues the
server certificate from it instead.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence

from fedjax_med.deploy import flower


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as e:
        raise ImportError(f"certificates need the cryptography package: {flower.INSTALL}") from e
    return x509, hashes, serialization, ec, NameOID


def _write(path: str, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str):
    x509, _, _, _, NameOID = _crypto()
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    _, _, serialization, _, _ = _crypto()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: Sequence[str]):
    x509 = _crypto()[0]
    names = []
    for host in dict.fromkeys(("localhost", "127.0.0.1", *hosts)):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(
    out: str, sites: Sequence[str], hosts: Sequence[str] = (), days: int = 365
) -> dict[str, str]:
    """Writes the CA, the SuperLink's certificate and one key pair per site into ``out``.

    Args:
      out: the folder (created if needed).
      sites: the hospitals' names (one authentication key pair each).
      hosts: DNS names or IP addresses of the SuperLink besides localhost / 127.0.0.1.
      days: validity of the certificates.

    Returns:
      name -> path of what was written (``ca``, ``server_cert``, ``server_key``, ``site:NAME``).

    Raises:
      ValueError: for an empty or repeated site name, or one that is not a plain file name.
    """
    x509, hashes, serialization, ec, _ = _crypto()
    for s in sites:
        if not s or s in (".", "..") or os.sep in s:
            raise ValueError(f"site name {s!r} must be a plain, non-empty file name")
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names {list(sites)} must be distinct")
    os.makedirs(os.path.join(out, "sites"), exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedjax_med study CA"))
        .issuer_name(_name("fedjax_med study CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("fedjax_med superlink"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    written = {
        "ca": os.path.join(out, "ca.crt"),
        "ca_key": os.path.join(out, "ca.key"),
        "server_cert": os.path.join(out, "server.pem"),
        "server_key": os.path.join(out, "server.key"),
    }
    _write(written["ca"], ca.public_bytes(pem))
    _write(written["ca_key"], _pem_key(ca_key), private=True)
    _write(written["server_cert"], server.public_bytes(pem))
    _write(written["server_key"], _pem_key(server_key), private=True)
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        path = os.path.join(out, "sites", site)
        private = key.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(path, private, private=True)
        _write(path + ".pub", public + b"\n")
        written[f"site:{site}"] = path
    return written
