"""``cryptobat demo``: the original device's sessions, replayed on a throwaway token.

Two officers enrol and log in with TOTP codes (computed here from the printed
secrets, as their authenticator apps would), one alone cannot set the policy,
two can; a KSK and a ZSK are generated; the seed's ``dnssec-signzone``
command line then signs a small zone with expiration +300 (accepted and
validated) and +3700 (refused by the token's policy).
"""
from __future__ import annotations

import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path

import pyotp

from . import keyfiles
from .console import Console
from .home import init_token
from .token import Token

ZONE = """\
$TTL 300
testzone.       IN SOA  ns.testzone. hostmaster.testzone. 2013070601 3600 900 604800 300
testzone.       IN NS   ns.testzone.
ns.testzone.    IN A    192.0.2.53
www.testzone.   IN A    192.0.2.80
www.testzone.   IN AAAA 2001:db8::80
"""


class _Session:
    def __init__(self, console: Console, out) -> None:
        self.console, self.out = console, out

    def __call__(self, line: str, note: str = "") -> str:
        text = self.console.handle(line)
        self.out.write(f"> {line}{'   # ' + note if note else ''}\n{text}")
        return text


def _secret(text: str) -> str:
    return next(l.split()[1] for l in text.splitlines() if l.startswith("Secret:"))


def _code(secret: str, token: Token) -> str:
    return pyotp.TOTP(secret).at(token.now())


def run(keep: str | None = None, out=None) -> int:
    out = out or sys.stdout
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="cryptobat-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "token"
    out.write(f"# A throwaway token in {home} (quorum 2, as the original device)\n")
    token = init_token(home, quorum=2)
    try:
        s = _Session(Console(token), out)
        s("version")
        s("date")
        s("colist")
        lamb = _secret(s("coadd lamb"))
        s("colist")
        s(f"cologin lamb {_code(lamb, token)}", "code from lamb's authenticator app")
        s("colist")
        s("setmaxval 3600", "one officer is not a quorum")
        jakob = _secret(s("coadd jakob"))
        s("colist")
        good = _code(jakob, token)
        s(f"cologin jakob {(int(good) + 1) % 1000000:06d}", "a mistyped code")
        s(f"cologin jakob {good}")
        s("colist")
        s("setmaxval 3600", "two officers present: the policy is set")
        s("keygen RSASHA256 ksk testzone")
        s("keygen RSASHA256 zsk testzone")
        s("keylist")
        s("coreset")
        s("colist")
        s("date")
        keys = token.keys()
    finally:
        token.close()
    ksk = next(k for k in keys if k.role == "ksk")
    zsk = next(k for k in keys if k.role == "zsk")
    keyfiles.write(keys, work)
    (work / "testzone").write_text(ZONE)
    ok = True
    for end, expect in (("+300", 0), ("+3700", 1)):
        argv = ["--home", str(home), "-s", "now", "-e", end, "-v", "5" if expect == 0 else "1", "-x",
                "-o", "testzone", "-k", keyfiles.basename(ksk), "testzone", keyfiles.basename(zsk)]
        out.write(f"\n# cryptobat signzone {' '.join(argv[2:])}\n")
        rc = _signzone(work, argv, out)
        ok &= rc == expect
        if rc == 0:
            out.write((work / "testzone.signed").read_text())
    out.write(f"\n# {'As the original: +300 signed and validated, +3700 refused by the token.' if ok else 'UNEXPECTED RESULT'}\n")
    if keep:
        out.write(f"# The token stays in {home}: cryptobat --home {home} audit\n")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _signzone(work: Path, argv: list[str], out) -> int:
    from .signzone import main
    with contextlib.chdir(work):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
    out.write(err.getvalue())
    return rc
