"""Pytest fixtures only; what they make comes from :mod:`support`."""
from __future__ import annotations

import grp
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cryptobat.home import init_token
from cryptobat.console import Console
from support import (CONFIGURED_PIN, use_custody, ZONE_KEYS, Clocked, Codes, Hsm, Officers, Pdns, cli, configure, free_port,
                     need)


def pytest_configure(config):
    """``CRYPTOBAT_TEST_CUSTODY=tpm2|pkcs11``: this run's tokens keep their keys in that custody."""
    config.addinivalue_line("markers", "not_on(custody, why): the test cannot apply on that custody; "
                                       "deselected (and counted as such) in a run on it")
    kind = os.environ.get("CRYPTOBAT_TEST_CUSTODY")
    if kind:
        use_custody(kind)


def pytest_collection_modifyitems(config, items):
    kind = os.environ.get("CRYPTOBAT_TEST_CUSTODY", "software")
    out = [i for i in items if any(m.args[0] == kind for m in i.iter_markers("not_on"))]
    if out:
        config.hook.pytest_deselected(items=out)
        items[:] = [i for i in items if i not in out]


@pytest.fixture
def token(tmp_path):
    t = init_token(tmp_path / "token", quorum=2)
    yield t
    t.close()


@pytest.fixture
def console(token):
    return Console(token)


@pytest.fixture
def officers(console):
    return Officers(console)


@pytest.fixture
def ready(token, console, officers):
    """A token with two officers present, max validity 3600 s, an RSA KSK and ZSK and an ECDSA ZSK for testzone."""
    configure(officers, enrol=("lamb", "jakob"), maxval=3600,
              keys=("8 ksk testzone ksk8", "8 zsk testzone zsk8", "13 zsk testzone zsk13"))
    return token


@pytest.fixture
def clocked(tmp_path):
    c = Clocked(tmp_path / "clocked")
    yield c
    c.token.close()


@pytest.fixture
def configured(tmp_path):
    """A token with one officer (quorum 1), a policy and a key, set up through the CLI console:
    (home, the officer's apps with the officer "solo")."""
    home = tmp_path / "t"
    cli("init", "--quorum", "1", home=home)
    codes = Codes()
    codes.enrol("solo", cli("console", home=home, input="coadd solo\n").stdout)
    r = cli("console", home=home, input=f"cologin solo {codes('solo')}\nsetmaxval 3600\nkeygen 13 zsk testzone z\n"
                                        f"setpin {CONFIGURED_PIN}\n")
    assert " CO solo Ok" in r.stdout and "ok: key generated" in r.stdout and " Signer PIN set" in r.stdout, r.stdout
    return home, codes


@pytest.fixture
def signer(tmp_path):
    """Make (Hsm, Pdns) for a max validity; everything started is stopped and removed afterwards."""
    for tool, pkg in (("pdns_server", "pdns-server"), ("pdnsutil", "pdns-server"),
                      ("kdig", "knot-dnsutils")):
        need(tool, pkg)
    made: list = []

    def make(maxval: int) -> tuple[Hsm, Pdns]:
        hsm = Hsm(tmp_path / "token", maxval, ZONE_KEYS)
        made.append(hsm)
        base = Path(tempfile.mkdtemp(prefix="cryptobat-pdns-"))  # not under pytest's 0700 dir
        made.append(base)
        os.chmod(base, 0o755)
        pdns = Pdns(base, base / "pkcs11.sock", free_port())
        made.append(pdns)
        # as root, PowerDNS runs as another user: the socket's group (and the daemon's peer check) let it in
        group = ["--signer-group", grp.getgrgid(pdns.user.pw_gid).gr_name] if pdns.user else []
        hsm.start(base / "pkcs11.sock", *group)
        pdns.add_zones(hsm.label)
        pdns.start()
        return hsm, pdns

    yield make
    for thing in reversed(made):
        if isinstance(thing, Path):
            shutil.rmtree(thing, ignore_errors=True)
        else:
            thing.stop()
