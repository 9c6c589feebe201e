"""Read private keys to import into the token: BIND ``Private-key-format`` files or PEM.

Importing an existing key lets an operator move a KSK into the token without a
roll at the parent. No maintained Python library reads BIND's private-key
format, so the few fields we need are parsed here; the key objects themselves
come from ``cryptography``.
"""
from __future__ import annotations

import base64
import os
import stat

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from . import algorithms
from .errors import CryptobatError

_RSA_FIELDS = ("Modulus", "PublicExponent", "PrivateExponent", "Prime1", "Prime2",
               "Exponent1", "Exponent2", "Coefficient")


def _fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith(";"):
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def _int(b64: str) -> int:
    return int.from_bytes(base64.b64decode(b64), "big")


def load(text: str):
    """Return (algorithm number or None for PEM, cryptography private key)."""
    if "-----BEGIN" in text:
        try:
            return None, serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError) as e:
            raise CryptobatError(f"cannot read PEM private key: {e}") from None
    f = _fields(text)
    if "Private-key-format" not in f or "Algorithm" not in f:
        raise CryptobatError("not a BIND private key file (no Private-key-format/Algorithm)")
    if "Label" in f and "Modulus" not in f and "PrivateKey" not in f:
        raise CryptobatError("this key file names an HSM key; it holds no key to import")
    try:
        alg = int(f["Algorithm"].split()[0])
        row = algorithms.TABLE.get(alg)
        if row is None:
            raise CryptobatError(f"algorithm {alg} cannot be imported")
        if row.kind == "rsa":
            n, e, d, p, q, dp, dq, qi = (_int(f[k]) for k in _RSA_FIELDS)
            key = rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)).private_key()
        elif row.kind == "ecdsa":
            key = ec.derive_private_key(_int(f["PrivateKey"]), row.curve)
        else:
            key = row.dnspython.key_cls.from_private_bytes(base64.b64decode(f["PrivateKey"]))
    except KeyError as e:
        raise CryptobatError(f"private key file lacks the {e.args[0]} field") from None
    except (ValueError, TypeError) as e:
        raise CryptobatError(f"private key file is malformed: {e}") from None
    return alg, key


def algorithm_of(key) -> int:
    """The DNSSEC algorithm a PEM key implies (RSA defaults to RSASHA256); 0 for none."""
    alg = algorithms.by_private_key(key)
    return 0 if alg is None else alg.number


def read_file(path: str, limit: int) -> str:
    """The text of a key file an officer named: a regular file of at most ``limit`` bytes.

    Opened without blocking (a FIFO or device must not hang the token) and without
    following a final symlink; errors name only the file and the problem, never its bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    except OSError as e:
        raise CryptobatError(f"cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CryptobatError(f"cannot read {path}: not a regular file")
        if st.st_size > limit:
            raise CryptobatError(f"cannot read {path}: larger than {limit} bytes")
        data = os.read(fd, limit + 1)
    except OSError as e:
        raise CryptobatError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CryptobatError(f"cannot read {path}: not a text key file") from None
