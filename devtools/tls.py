"""Throw-away certificates for the local broker's TLS listeners, made with the openssl command.

:func:`make_certificates` writes a test CA, a broker certificate it signs for 127.0.0.1 and
localhost (a PKCS12 keystore Kafka reads), the same broker key with an already expired
certificate, and a second, unrelated CA (a client trusting only that one must refuse the broker).
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HOSTS = ("IP:127.0.0.1", "DNS:localhost")


@dataclass(frozen=True)
class BrokerCertificates:
    ca: Path  # PEM: what clients trust
    other_ca: Path  # PEM: a CA that signed nothing of the broker's
    keystore: Path  # PKCS12: the broker's key and valid certificate chain
    expired_keystore: Path  # PKCS12: the same key, a certificate that expired yesterday
    password: str  # of both keystores


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is not installed (Debian: apt-get install openssl)")
    result = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def _authority(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", cert.name, "-days", "30",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return key, cert


def make_certificates(directory: Path) -> BrokerCertificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _authority(directory, "test-ca")
    _, other_ca = _authority(directory, "other-ca")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
             "-subj", "/CN=localhost", cwd=directory)
    (directory / "broker.ext").write_text(f"subjectAltName={','.join(HOSTS)}\nextendedKeyUsage=serverAuth\n")
    password = secrets.token_urlsafe(12)
    keystores = {}
    for name, days in (("broker", "30"), ("expired", "-1")):  # -1: not after = a day before not before
        _openssl("x509", "-req", "-in", "broker.csr", "-CA", ca.name, "-CAkey", ca_key.name, "-set_serial",
                 str(secrets.randbits(63)), "-days", days, "-extfile", "broker.ext", "-out", f"{name}.pem",
                 cwd=directory)
        _openssl("pkcs12", "-export", "-in", f"{name}.pem", "-inkey", "broker.key", "-certfile", ca.name,
                 "-name", "broker", "-out", f"{name}.p12", "-passout", f"pass:{password}", cwd=directory)
        keystores[name] = directory / f"{name}.p12"
    return BrokerCertificates(ca, other_ca, keystores["broker"], keystores["expired"], password)
