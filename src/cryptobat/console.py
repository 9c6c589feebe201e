"""The console language of the original Cryptobat, as a sans-I/O line handler.

A :class:`Console` takes one input line at a time and returns the text to
print; it never touches a terminal or socket. Answers follow the original
device's format, leading spaces and all (`` CO lamb Ok``, `` Configuration
disabled``). A bad line gets one ``fail:`` line, never a traceback. Secret
input (passphrases, PIN) is flagged by :attr:`Console.secret_input` so an
adapter can turn off echo; it is never logged.
"""
from __future__ import annotations

import io
import secrets
import shlex
import time
from typing import Callable

import segno

from . import __version__, keystore
from .errors import CryptobatError
from .timespec import parse_time
from .token import Token, code_hash

HELP = """\
 version                      firmware version and code hash
 date                         token time (UTC fields, then epoch seconds)
 status                       the token at a glance
 colist                       officers and whether each is present
 coadd NAME [--qr FILE]       enrol an officer (TOTP secret, URI, QR); quorum once M are enrolled
 codel NAME                   remove an officer (quorum)
 cologin NAME CODE            log in with a TOTP code (then the passphrase, if set)
 copass NAME                  set the passphrase of a logged-in officer
 coreset                      log every officer out
 setmaxval SECONDS            maximum RRSIG validity from token time (quorum)
 setquorum M                  officers needed for a change (quorum)
 setpin                       set the PKCS#11 signer PIN (quorum; asks for it)
 settime EPOCH|YYYYMMDDHHMMSS|now   set token time, clears clock tamper (quorum)
 setcompat LABEL on|off       allow hash-only PKCS#11 signing for a key (quorum)
 p11window SECONDS ZONE       open PKCS#11 key generation/deletion for ZONE's keys (quorum)
 keygen ALG ROLE ZONE [LABEL] generate a key: ALG 8|10|13|14|15|16 or mnemonic, ROLE ksk|zsk|csk (quorum)
 keyimport ROLE ZONE FILE [LABEL]  import a BIND .private or PEM key file (quorum)
 keydel LABEL                 delete a key (quorum)
 keylist                      keys with key tag, DNSKEY and DS
 tpmloadkey LABEL             load a key for signing: ok: key loaded handle=XXXXXXXX
 tpmtimedsign HANDLE HEXDATA  sign RRSIG signing data (RFC 4034 3.1.8.1) under policy
 tpmflush HANDLE              unload a key
 tpmreset                     unload every key
 audit [N] | audit verify     last N audit entries | check the hash chain
 help                         this list
"""


def format_date(now: int) -> str:
    t = time.gmtime(now)
    return (f"Y:{t.tm_year % 100:02d} M:{t.tm_mon:02d} D:{t.tm_mday:02d} "
            f"h:{t.tm_hour:02d} m:{t.tm_min:02d} s:{t.tm_sec:02d} ok\n{now}\n")


def hexdump(data: bytes) -> str:
    return "".join(" " + " ".join(f"{b:02X}" for b in data[i:i + 16]) + "\n" for i in range(0, len(data), 16))


def qr_text(uri: str) -> str:
    buf = io.StringIO()
    segno.make(uri, error="m").terminal(out=buf, compact=True)
    return buf.getvalue()


# Commands that change nothing: the token audits them here, by name only (arguments may be secret).
_UNAUDITED_READS = frozenset({"help", "version", "date", "colist", "keylist", "status", "audit",
                              "tpmloadkey", "tpmflush", "tpmreset"})


class _Usage(Exception):
    pass


def _want(args: list[str], n: int) -> list[str]:
    if len(args) != n:
        raise _Usage
    return args


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CryptobatError(f"{what} must be a number") from None


class Console:
    """One console session on a token: its own key handles and pending secret prompt."""

    PROMPT = "> "

    def __init__(self, token: Token) -> None:
        self.token = token
        self.handles: dict[str, str] = {}
        self._pending: Callable[[str], str] | None = None
        self._pending_prompt = ""
        self.closed = False

    @property
    def prompt(self) -> str:
        return self._pending_prompt if self._pending else self.PROMPT

    @property
    def secret_input(self) -> bool:
        return self._pending is not None

    def _ask(self, prompt: str, then: Callable[[str], str]) -> str:
        self._pending, self._pending_prompt = then, prompt
        return ""

    def handle(self, line: str) -> str:
        """Process one line; return the text to print (may be empty)."""
        if self._pending is not None:
            then, self._pending = self._pending, None
            try:
                return then(line.rstrip("\r\n"))
            except CryptobatError as e:
                return f"fail: {e}\n"
        try:
            words = shlex.split(line)
        except ValueError:
            return "fail: unbalanced quotes\n"
        if not words:
            return ""
        cmd, args = words[0].lower(), words[1:]
        fn = getattr(self, "do_" + cmd, None)
        if fn is None:
            return f"fail: unknown command {cmd!r} (try help)\n"
        try:
            out = fn(args)
            if cmd in _UNAUDITED_READS:
                self.token.audit("command", command=cmd)
            return out
        except _Usage:
            return f"fail: usage: {self._usage(cmd)}\n"
        except CryptobatError as e:
            return f" {e}\n" if str(e) == "Configuration disabled" else f"fail: {e}\n"
        except Exception as e:  # the console must keep serving whatever happens
            return f"fail: internal error: {type(e).__name__}\n"

    @staticmethod
    def _usage(cmd: str) -> str:
        for line in HELP.splitlines():
            if line.strip().startswith(cmd + " ") or line.strip() == cmd:
                return line.strip().split("  ")[0]
        return cmd

    # --- the original device's commands ----------------------------------------
    def do_help(self, args: list[str]) -> str:
        return HELP

    def do_version(self, args: list[str]) -> str:
        up = int(self.token.uptime())
        return (f"Cryptobat firmware version {__version__}.{code_hash()} (c) Cryptobat "
                f"rst:{self.token.custody.name}\nuptime:{up}s serial:{self.token.state['serial']}\n")

    def do_date(self, args: list[str]) -> str:
        return format_date(self.token.now())

    def do_colist(self, args: list[str]) -> str:
        return "".join(f" |{n}| {'present' if p else 'not present'}\n" for n, p in self.token.colist())

    def do_coadd(self, args: list[str]) -> str:
        if not args:
            raise _Usage
        name, qr_file = args[0], None
        if len(args) == 3 and args[1] == "--qr":
            qr_file = args[2]
        elif len(args) != 1:
            raise _Usage
        secret, uri = self.token.coadd(name)
        out = f"Added CO: {name}\nSecret: {secret}\n{uri}\n{qr_text(uri)}"
        if qr_file:
            try:
                segno.make(uri, error="m").save(qr_file, scale=6)
                out += f"QR code written to {qr_file}\n"
            except (OSError, ValueError) as e:
                out += f"fail: QR code not written: {e}\n"
        return out

    def do_codel(self, args: list[str]) -> str:
        name, = _want(args, 1)
        self.token.codel(name)
        return f" Removed CO: {name}\n"

    def do_cologin(self, args: list[str]) -> str:
        name, code = _want(args, 2)
        if name in self.token.state["officers"] and self.token.has_passphrase(name):
            return self._ask("Passphrase: ", lambda p: self._login(name, code, p))
        return self._login(name, code, None)

    def _login(self, name: str, code: str, passphrase: str | None) -> str:
        return f" CO {name} Ok\n" if self.token.cologin(name, code, passphrase) else " Failed\n"

    def do_copass(self, args: list[str]) -> str:
        name, = _want(args, 1)
        if name not in self.token.present():
            raise CryptobatError(f"CO {name} must be logged in to set a passphrase")

        def first(p1: str) -> str:
            return self._ask("Repeat passphrase: ", lambda p2: second(p1, p2))

        def second(p1: str, p2: str) -> str:
            if p1 != p2:
                return "fail: passphrases differ\n"
            self.token.copass(name, p1)
            return f" Passphrase set for CO {name}\n"

        return self._ask("New passphrase: ", first)

    def do_coreset(self, args: list[str]) -> str:
        self.token.coreset()
        return ""

    def do_setmaxval(self, args: list[str]) -> str:
        s, = _want(args, 1)
        seconds = _int(s.lstrip("+"), "SECONDS")
        self.token.setmaxval(seconds)
        return f" Maximum validity period set to +{seconds} seconds\n"

    def do_setquorum(self, args: list[str]) -> str:
        m, = _want(args, 1)
        self.token.setquorum(_int(m, "M"))
        return f" Quorum set to {m} officers\n"

    def do_setpin(self, args: list[str]) -> str:
        if args:
            self.token.setpin(args[0])
            return " Signer PIN set\n"
        self.token._require("setpin")
        return self._ask("New PIN: ", lambda pin: (self.token.setpin(pin), " Signer PIN set\n")[1])

    def do_settime(self, args: list[str]) -> str:
        t, = _want(args, 1)
        now = int(time.time())
        when = parse_time(t, now, now)
        self.token.settime(when)
        return f" Token time set\n{format_date(self.token.now())}"

    def do_setcompat(self, args: list[str]) -> str:
        label, on = _want(args, 2)
        if on not in ("on", "off"):
            raise _Usage
        self.token.setcompat(label, on == "on")
        return f" Compat (hash-only) signing {on} for {label}\n"

    def do_p11window(self, args: list[str]) -> str:
        s, zone = _want(args, 2)
        self.token.p11window(_int(s, "SECONDS"), zone)
        return f" PKCS#11 key management open for {s} seconds (keys for {zone})\n"

    def do_keygen(self, args: list[str]) -> str:
        if len(args) not in (3, 4):
            raise _Usage
        alg = keystore.parse_algorithm(args[0])
        role = keystore.parse_role(args[1])
        info = self.token.keygen(alg, role, args[2], args[3] if len(args) == 4 else None)
        return (f"ok: key generated label={info.label} zone={info.zone} algorithm={alg} "
                f"role={role} tag={info.keytag}\n")

    def do_keyimport(self, args: list[str]) -> str:
        if len(args) not in (3, 4):
            raise _Usage
        role = keystore.parse_role(args[0])
        try:
            with open(args[2]) as f:
                text = f.read(1 << 20)
        except (OSError, UnicodeDecodeError) as e:
            raise CryptobatError(f"cannot read {args[2]}: {e}") from None
        info = self.token.keyimport(role, args[1], text, args[3] if len(args) == 4 else None)
        return (f"ok: key imported label={info.label} zone={info.zone} algorithm={info.algorithm} "
                f"role={role} tag={info.keytag}\n")

    def do_keydel(self, args: list[str]) -> str:
        label, = _want(args, 1)
        self.token.keydel(label)
        return f" Key {label} deleted\n"

    def do_keylist(self, args: list[str]) -> str:
        out = []
        for k in self.token.keys():
            out.append(f" {k.label}  zone={k.zone} alg={k.algorithm} ({keystore.SUPPORTED[k.algorithm]}) "
                       f"role={k.role} tag={k.keytag}{' compat' if k.compat else ''}\n"
                       f"   {k.zone} IN DNSKEY {k.dnskey().to_text()}\n"
                       f"   {k.zone} IN DS {k.ds().to_text()}\n")
        return "".join(out)

    def do_tpmloadkey(self, args: list[str]) -> str:
        label, = _want(args, 1)
        self.token.key(label)
        handle = secrets.token_hex(4).upper()
        self.handles[handle] = label
        return f"ok: key loaded handle={handle}\n"

    def do_tpmtimedsign(self, args: list[str]) -> str:
        handle, hexdata = _want(args, 2)
        label = self.handles.get(handle.upper())
        if label is None:
            return f"fail: no key loaded with handle {handle}\n"
        try:
            data = bytes.fromhex(hexdata)
        except ValueError:
            return "fail: signing data is not hex\n"
        result, limit = self.token.timed_sign_verbose(label, data)
        out = ""
        if len(data) >= 18:  # echo the header fields the policy looked at, as the original did
            out = f" checking expiration time {int.from_bytes(data[8:12], 'big')} < {limit} and algorithm {data[2]}\n"
        if not result.ok:
            return out + f"fail: {result.reason}\n"
        return out + f" computing hash of {len(data)} bytes:\nok: signature\n{hexdump(result.signature)}DONE\n"

    def do_tpmflush(self, args: list[str]) -> str:
        handle, = _want(args, 1)
        if self.handles.pop(handle.upper(), None) is None:
            return f"fail: no key loaded with handle {handle}\n"
        return "ok: flushed\n"

    def do_tpmreset(self, args: list[str]) -> str:
        self.handles.clear()
        return "ok: reset\n"

    def do_audit(self, args: list[str]) -> str:
        if args == ["verify"]:
            n, problem = self.token.audit_verify()
            return f"fail: audit log: {problem}\n" if problem else f"ok: audit log verified, {n} entries\n"
        n = _int(args[0], "N") if args else 20
        return "".join(e + "\n" for e in self.token.audit_tail(n))

    def do_status(self, args: list[str]) -> str:
        from .status import render
        return render(self.token)

    def do_quit(self, args: list[str]) -> str:
        self.closed = True
        return ""

    do_exit = do_quit
