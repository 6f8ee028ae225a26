"""What locks SeaweedFS's internal ports: JWT signing keys, mutual TLS, the admin password.

Why: `weed mini` runs a master, a volume server, a filer, an admin server and the S3 gateway,
and only the gateway checks the S3 keys. Unlocked, anyone on the host can read or write the
buckets through the filer (HTTP and gRPC), delete a bucket's collection through the master's
HTTP API, or read chunks from the volume server. The stack therefore writes, at every start,
a `security.toml` (SeaweedFS reads it from the server's working directory) that

- signs every filer and volume-server request with fresh JWT keys (`jwt.signing[.read]`,
  `jwt.filer_signing[.read]`): a request without a token signed by the gateway or the master
  gets 401;
- requires mutual TLS, with a CA made for this start only, on every gRPC port (the filer's
  gRPC API takes writes without a JWT; the in-process Unix sockets SeaweedFS puts at fixed
  /tmp paths are the same servers, so a socket another user plants there fails the handshake)
  and on the master's, volume server's, filer's and admin server's HTTP ports;
- sets a random admin password.

Nothing here is needed by clients: they reach SeaweedFS only through the S3 gateway.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vl.private import private_dir, write_private

SECURITY_FILE = "security.toml"
# Every SeaweedFS component with a gRPC server (security.toml's [grpc.<name>] sections); all of
# them share one certificate (SeaweedFS does not check host names).
GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker",
                   "msg_agent", "mq")
HTTPS_COMPONENTS = ("master", "volume", "filer", "admin")
CERT_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    """A private CA and one certificate it signed (server and client auth), as PEM files."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_tls(directory: Path) -> TlsFiles:
    """A fresh CA and a certificate for 127.0.0.1 in `directory` (0700; keys 0600).

    The CA's key is not kept: nothing can sign another certificate this stack would trust.
    """
    directory = private_dir(directory)
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(CERT_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"videolights local stack CA {secrets.token_hex(4)}")
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name("videolights-local-seaweedfs"))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    files = TlsFiles(ca=directory / "ca.crt", cert=directory / "tls.crt",
                     key=directory / "tls.key")
    write_private(files.ca, ca.public_bytes(serialization.Encoding.PEM))
    write_private(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    write_private(files.key, _pem_key(key))
    return files


def _toml_str(value: str | Path) -> str:
    text = str(value)
    if any(c in text for c in '"\\\n'):
        raise ValueError(f"path {text!r} cannot be written into security.toml")
    return f'"{text}"'


def security_toml(tls: TlsFiles, keys: dict[str, str]) -> str:
    """The text of SeaweedFS's security.toml for these TLS files and secrets (see module doc)."""
    cert, key, ca = _toml_str(tls.cert), _toml_str(tls.key), _toml_str(tls.ca)
    sections = [
        f'[jwt.signing]\nkey = "{keys["volume_write"]}"\n',
        f'[jwt.signing.read]\nkey = "{keys["volume_read"]}"\n',
        f'[jwt.filer_signing]\nkey = "{keys["filer_write"]}"\n',
        f'[jwt.filer_signing.read]\nkey = "{keys["filer_read"]}"\n',
        "[access]\nui = false\n",
        "[filer.expose_directory_metadata]\nenabled = false\n",
        f'[admin]\nuser = "admin"\npassword = "{keys["admin_password"]}"\n',
        f"[grpc]\nca = {ca}\n",
        *(f"[grpc.{name}]\ncert = {cert}\nkey = {key}\n" for name in GRPC_COMPONENTS),
        f"[grpc.client]\ncert = {cert}\nkey = {key}\n",
        *(f"[https.{name}]\ncert = {cert}\nkey = {key}\nca = {ca}\n"
          for name in HTTPS_COMPONENTS),
        f"[https.client]\nenabled = true\ncert = {cert}\nkey = {key}\nca = {ca}\n",
    ]
    return "\n".join(sections)


def write_security(server_dir: Path) -> Path:
    """Fresh keys, a fresh CA and certificate, and `server_dir/security.toml`; returns its path.

    Everything is regenerated at each start: JWTs live seconds and the TLS trust is only
    between the processes of one `weed mini`, so nothing needs to survive a restart.
    """
    tls = write_tls(Path(server_dir) / "tls")
    keys = {name: secrets.token_hex(32) for name in
            ("volume_write", "volume_read", "filer_write", "filer_read", "admin_password")}
    return write_private(Path(server_dir) / SECURITY_FILE, security_toml(tls, keys))
