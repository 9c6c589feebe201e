"""The console language of the original Cryptobat, as a sans-I/O line handler.

A :class:`Console` takes one input line at a time and returns the text to
print; it never touches a terminal or socket. Answers follow the original
device's format, leading spaces and all (`` CO lamb Ok``, `` Configuration
disabled``). A bad line gets one ``fail:`` line, never a traceback. Secret
input (passphrases, PIN) is flagged by :attr:`Console.secret_input` so an
adapter can turn off echo; it is never logged.
"""
from __future__ import annotations

import contextlib
import io
import secrets
import shlex
import time
from typing import Callable

import segno

from . import __version__, algorithms, bindkey, keystore, rrsig
from .errors import (ConfigurationDisabled, CryptobatError, IntegrityError, InvalidArgument, LimitReached, NotFound,
                     NotPermitted, PinIncorrect, Refusal)
from .custody import DeviceKey
from .quorum import Approval
from .timespec import parse_time
from .release import code_hash
from .token import MAX_KEY_FILE, WINDOW_KEYS, Token

_KEYGEN_ALGS = "|".join(str(a.number) for a in algorithms.TABLE.values() if a.generate)

HELP = f"""\
 version                      firmware version and code hash
 date                         token time (UTC fields, then epoch seconds)
 status                       the token at a glance
 colist                       officers and whether each is present on this session
 coadd NAME [--qr FILE]       enrol an officer (TOTP secret, URI, QR); quorum once M are enrolled
 codel NAME                   remove an officer (quorum)
 cologin NAME CODE            log in on this session with a TOTP code (then the passphrase, if set)
 copass NAME                  change your own passphrase (logged in; asks for the old one)
 coreset                      log every officer of this session out
 pending                      operations waiting for approvals from officers on other sessions
 approve ID                   approve a pending operation as the officers logged in here
 cancel ID                    drop a pending operation
 setmaxval SECONDS            maximum RRSIG validity from token time (quorum)
 setquorum M                  officers needed for a change (quorum)
 setpin                       set the PKCS#11 and native signer PIN (quorum; asks for it)
 settime EPOCH|YYYYMMDDHHMMSS|now   set token time, clears clock tamper (quorum)
 setclockgap SECONDS          clock jump allowed across a restart before tamper (quorum)
 setcompat LABEL on|off       allow hash-only PKCS#11 signing for a key (quorum)
 p11window SECONDS ZONE [keys N]  open PKCS#11 key generation/deletion for ZONE's keys, N new keys (quorum)
 keyallow ZONE DNSKEY-RDATA   let ZONE's KSK sign DNSKEY/CDS/CDNSKEY sets with this key (quorum)
 keydisallow ZONE KEYTAG      withdraw a keyallow (quorum)
 cdsdelete SECONDS ZONE       allow the RFC 8078 delete CDS/CDNSKEY for ZONE for a while (quorum)
 signerpeers uid:N|gid:N ...|none   Unix users/groups that sign without the PIN (quorum)
 keygen ALG ROLE ZONE [LABEL] generate a key: ALG {_KEYGEN_ALGS} or mnemonic, ROLE ksk|zsk|csk (quorum)
 keyimport ROLE ZONE FILE [LABEL]  import a BIND .private or PEM key file (quorum)
 keydel LABEL                 delete a key (quorum)
 keyrole LABEL ksk|zsk|csk    set a key's role, DNSKEY flags and key tag, and fix it (quorum)
 keylist                      keys with key tag, DNSKEY and DS
 signerlogin                  give the signer PIN on this session, for console signing (asks for it)
 tpmloadkey LABEL             load a key for signing: ok: key loaded handle=XXXXXXXX
 tpmtimedsign HANDLE HEXDATA  sign RRSIG signing data (RFC 4034 3.1.8.1) under policy
 tpmflush HANDLE              unload a key
 tpmreset                     unload every key
 audit [N] | audit verify     last N audit entries | check the hash chain
 custodymigrate tpm2[:TCTI] [pcrs LIST] | pkcs11:MODULE TOKEN PINFILE   move a software token's keys into a TPM or HSM (quorum)
 acceptrollback               accept a store the TPM's rollback counter refused (quorum; console --rollback-hold)
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
_UNAUDITED_READS = frozenset({"help", "version", "date", "colist", "keylist", "status", "audit", "pending",
                              "tpmloadkey", "tpmflush", "tpmreset"})
MAX_LINE = 64 * 1024  # a console line longer than this is refused before it is parsed


def _open_qr_file(path: str):
    """The QR code file, opened before the officer is enrolled; PNG or SVG by its name."""
    kind = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if kind not in ("png", "svg"):
        raise InvalidArgument("the QR code file must end in .png or .svg")
    try:
        return open(path, "wb")
    except OSError as e:
        raise CryptobatError(f"cannot write the QR code to {path}: {e.strerror}") from None


def failed(answer: str) -> bool:
    """Whether a console answer relayed as text (the daemon's console socket) reports a failure:
    the console protocol starts those, and only those, with ``fail:``; in process, use
    :attr:`Console.error`."""
    return answer.startswith("fail:")


class _Usage(Exception):
    pass


def _want(args: list[str], n: int) -> list[str]:
    if len(args) != n:
        raise _Usage
    return args


def _int(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise InvalidArgument(f"{what} must be a number")
    return int(text)


class Console:
    """One console session on a token: its officers, key handles and pending secret prompt.

    ``transport`` names where the session is (``local``, ``pty``, ``serial``, ``socket``):
    officers logged in here count for commands typed here only. ``lock``, if given, is held
    while a command runs (never while a line is parsed), so adapters share the token safely.
    """

    PROMPT = "> "

    def __init__(self, token: Token, transport: str = "local", lock=None) -> None:
        self.token = token
        self.session = token.open_session(transport)
        self.handles: dict[str, str] = {}
        self._pending: Callable[[str], str] | None = None
        self._pending_prompt = ""
        self._lock = lock or contextlib.nullcontext()
        self.closed = False
        self.error: CryptobatError | None = None  # why the last line failed, if it did

    @property
    def prompt(self) -> str:
        return self._pending_prompt if self._pending else self.PROMPT

    @property
    def secret_input(self) -> bool:
        return self._pending is not None

    def _ask(self, prompt: str, then: Callable[[str], str]) -> str:
        self._pending, self._pending_prompt = then, prompt
        return ""

    def close(self) -> None:
        """The session ends: its officers are logged out."""
        self.session.reset()
        self.handles.clear()
        self.closed = True

    def handle(self, line: str) -> str:
        """Process one line; return the text to print (may be empty). :attr:`error` says
        whether (and why) it failed, for callers that act on the outcome."""
        self.error = None
        if len(line) > MAX_LINE:
            self._pending = None
            return self._answer(LimitReached("line too long"))
        if self._pending is not None:
            then, self._pending = self._pending, None
            with self._lock:
                return self._run(lambda: then(line.rstrip("\r\n")), None)
        try:
            words = shlex.split(line)
        except ValueError:
            return self._answer(InvalidArgument("unbalanced quotes"))
        if not words:
            return ""
        cmd, args = words[0].lower(), words[1:]
        fn = getattr(self, "do_" + cmd, None)
        if fn is None or not cmd.isascii():
            return self._answer(NotFound(f"unknown command {cmd[:32]!r} (try help)"))
        with self._lock:
            return self._run(lambda: fn(args), cmd)

    def _run(self, fn: Callable[[], str], cmd: str | None) -> str:
        try:
            out = fn()
            if cmd in _UNAUDITED_READS:  # a read still answers when a full disk refuses its audit line
                with contextlib.suppress(CryptobatError):
                    self.token.audit("command", command=cmd, session=self.session.id)
            return out
        except _Usage:
            return self._answer(InvalidArgument(f"usage: {self._usage(cmd or '')}"))
        except CryptobatError as e:
            return self._answer(e)
        except Exception as e:  # the console must keep serving whatever happens
            return self._answer(CryptobatError(f"internal error: {type(e).__name__}"))

    def _answer(self, e: CryptobatError) -> str:
        """The console's one translation of an error: the original's line for a missing quorum,
        ``fail: <why>`` for anything else."""
        self.error = e
        if isinstance(e, ConfigurationDisabled):
            return f" {e}\n"
        return f"fail: {e}\n"

    @staticmethod
    def _usage(cmd: str) -> str:
        for line in HELP.splitlines():
            if line.strip().startswith(cmd + " ") or line.strip() == cmd:
                return line.strip().split("  ")[0]
        return cmd

    def _now(self) -> int:
        return self.token.now()

    def _quorum(self, text: str, run: Callable[[Approval], object], answer: str | None = None) -> str:
        """Run a quorum command with the officers of this session, or hold it for approvals.

        With nobody logged in here (or fewer than M officers enrolled) the answer is the
        original's `` Configuration disabled``; otherwise the same line and the id other
        officers approve it by.
        """
        if answer is not None:  # a token method that returns nothing: the console's answer is fixed
            act = run

            def run(by: Approval) -> str:
                act(by)
                return answer
        now = self._now()
        by = self.session.approval(now)
        try:
            out = run(by)
        except ConfigurationDisabled:
            if not by.approvers or not self.token.can_approve():
                raise  # nobody here, or not enough officers enrolled to ever approve it
            op = self.token.hold(self.session, text, run)
            m = self.token.quorum_size()
            return (f" Configuration disabled\n pending {op.id}: {text} ({len(op.approvals)} of {m} approvals);"
                    f" other officers may: approve {op.id}\n")
        self.session.refresh(by.names(), now)
        return out

    # --- the original device's commands ----------------------------------------
    def do_help(self, args: list[str]) -> str:
        return HELP

    def do_version(self, args: list[str]) -> str:
        up = int(self.token.uptime())
        return (f"Cryptobat firmware version {__version__}.{code_hash()} (c) Cryptobat "
                f"rst:{self.token.custody.name}\nuptime:{up}s serial:{self.token.serial()}\n")

    def do_date(self, args: list[str]) -> str:
        return format_date(self._now())

    def do_colist(self, args: list[str]) -> str:
        return "".join(f" |{n}| {'present' if p else 'not present'}\n" for n, p in self.token.colist(self.session))

    def do_coadd(self, args: list[str]) -> str:
        if not args:
            raise _Usage
        name, qr_file = args[0], None
        if len(args) == 3 and args[1] == "--qr":
            qr_file = args[2]
        elif len(args) != 1:
            raise _Usage

        def run(by: Approval) -> str:
            qr = _open_qr_file(qr_file) if qr_file else None  # before enrolling: no officer behind a failure
            try:
                secret, uri = self.token.coadd(name, self.session, by)
                out = f"Added CO: {name}\nSecret: {secret}\n{uri}\n{qr_text(uri)}"
                if qr is not None:
                    segno.make(uri, error="m").save(qr, kind=qr_file.rsplit(".", 1)[-1].lower(), scale=6)
                    out += f"QR code written to {qr_file}\n"
                return out
            finally:
                if qr is not None:
                    qr.close()

        if not self.token.can_approve():
            return run(Approval())
        return self._quorum(f"coadd {name}", run)

    def do_codel(self, args: list[str]) -> str:
        name, = _want(args, 1)
        return self._quorum(f"codel {name}", lambda by: self.token.codel(name, by), f" Removed CO: {name}\n")

    def do_cologin(self, args: list[str]) -> str:
        name, code = _want(args, 2)
        if self.token.is_officer(name) and self.token.has_passphrase(name):
            return self._ask("Passphrase: ", lambda p: self._login(name, code, p))
        return self._login(name, code, None)

    def _login(self, name: str, code: str, passphrase: str | None) -> str:
        ok = self.token.cologin(name, code, passphrase, self.session)
        return f" CO {name} Ok\n" if ok else " Failed\n"

    def do_copass(self, args: list[str]) -> str:
        name, = _want(args, 1)
        if name not in self.token.present(self.session):
            raise NotPermitted(f"CO {name} must be logged in on this session to set a passphrase")

        def new(old: str | None) -> str:
            return self._ask("New passphrase: ", lambda p1: self._ask("Repeat passphrase: ",
                                                                      lambda p2: second(old, p1, p2)))

        def second(old: str | None, p1: str, p2: str) -> str:
            if p1 != p2:
                raise InvalidArgument("passphrases differ")
            self.token.copass(name, old, p1, self.session)
            return f" Passphrase set for CO {name}\n"

        if self.token.has_passphrase(name):
            return self._ask("Old passphrase: ", new)
        return new(None)

    def do_coreset(self, args: list[str]) -> str:
        self.token.coreset(self.session)
        return ""

    def do_pending(self, args: list[str]) -> str:
        now, m = self._now(), self.token.quorum_size()
        return "".join(f" {op.id}  {op.text}  ({len(op.approvals)} of {m}: "
                       f"{', '.join(f'{n}@{s}' for n, s in sorted(op.approvals.items()))})  "
                       f"expires in {op.expires - now} s\n" for op in self.token.pending())

    def do_approve(self, args: list[str]) -> str:
        i, = _want(args, 1)
        op, out = self.token.approve(self.session, _int(i, "ID"))
        if out is None:
            return (f" Approved {op.id}: {op.text} ({len(op.approvals)} of {self.token.quorum_size()} "
                    f"approvals)\n")
        return f" Approved {op.id}: {op.text}; running it\n{out}"

    def do_cancel(self, args: list[str]) -> str:
        i, = _want(args, 1)
        self.token.cancel(self.session, _int(i, "ID"))
        return f" Cancelled {i}\n"

    def do_setmaxval(self, args: list[str]) -> str:
        s, = _want(args, 1)
        seconds = _int(s.lstrip("+"), "SECONDS")
        return self._quorum(f"setmaxval {seconds}", lambda by: self.token.setmaxval(seconds, by),
                            f" Maximum validity period set to +{seconds} seconds\n")

    def do_setquorum(self, args: list[str]) -> str:
        m, = _want(args, 1)
        n = _int(m, "M")
        return self._quorum(f"setquorum {n}", lambda by: self.token.setquorum(n, by),
                            f" Quorum set to {n} officers\n")

    def do_setpin(self, args: list[str]) -> str:
        def run(pin: str) -> str:
            self.token.check_new_pin(pin)
            return self._quorum("setpin", lambda by: self.token.setpin(pin, by), " Signer PIN set\n")

        if args:
            return run(args[0])
        if not self.token.present(self.session):
            raise ConfigurationDisabled()
        return self._ask("New PIN: ", run)

    def do_settime(self, args: list[str]) -> str:
        t, = _want(args, 1)
        now = int(time.time())
        when = parse_time(t, now, now)
        def run(by: Approval) -> str:
            self.token.settime(when, by)
            return f" Token time set\n{format_date(self.token.now())}"

        return self._quorum(f"settime {when}", run)

    def do_setclockgap(self, args: list[str]) -> str:
        s, = _want(args, 1)
        n = _int(s, "SECONDS")
        return self._quorum(f"setclockgap {n}", lambda by: self.token.setclockgap(n, by),
                            f" Clock gap allowed across a restart set to {n} seconds\n")

    def do_setcompat(self, args: list[str]) -> str:
        label, on = _want(args, 2)
        if on not in ("on", "off"):
            raise _Usage
        return self._quorum(f"setcompat {label} {on}", lambda by: self.token.setcompat(label, on == "on", by),
                            f" Compat (hash-only) signing {on} for {label}\n")

    def do_p11window(self, args: list[str]) -> str:
        if len(args) == 4 and args[2] == "keys":
            keys = _int(args[3], "N")
        elif len(args) == 2:
            keys = WINDOW_KEYS
        else:
            raise _Usage
        s, zone = args[:2]
        n = _int(s, "SECONDS")
        return self._quorum(f"p11window {n} {zone} keys {keys}",
                            lambda by: self.token.p11window(n, zone, by, keys),
                            f" PKCS#11 key management open for {n} seconds (up to {keys} new keys for {zone})\n")

    def do_keyrole(self, args: list[str]) -> str:
        label, r = _want(args, 2)
        role = keystore.parse_role(r)

        def run(by: Approval) -> str:
            info = self.token.keyrole(label, role, by)
            return f"ok: key {info.label} role={info.role} flags={info.flags} tag={info.keytag}\n"

        return self._quorum(shlex.join(["keyrole", label, role]), run)

    def do_keyallow(self, args: list[str]) -> str:
        if len(args) < 5:
            raise _Usage
        zone, rdata = args[0], " ".join(args[1:])

        def run(by: Approval) -> str:
            tag = self.token.keyallow(zone, rdata, by)
            return f" Key {tag} allowed in {zone}'s DNSKEY, CDS and CDNSKEY sets\n"

        return self._quorum(f"keyallow {zone} {rdata}", run)

    def do_keydisallow(self, args: list[str]) -> str:
        zone, t = _want(args, 2)
        tag = _int(t, "KEYTAG")
        return self._quorum(f"keydisallow {zone} {tag}", lambda by: self.token.keydisallow(zone, tag, by),
                            f" Key {tag} no longer allowed in {zone}\n")

    def do_cdsdelete(self, args: list[str]) -> str:
        s, zone = _want(args, 2)
        n = _int(s, "SECONDS")
        return self._quorum(f"cdsdelete {n} {zone}", lambda by: self.token.cdsdelete(n, zone, by),
                            f" RFC 8078 delete CDS/CDNSKEY for {zone} allowed for {n} seconds\n")

    def do_signerpeers(self, args: list[str]) -> str:
        if not args:
            raise _Usage
        peers = [] if args == ["none"] else args
        return self._quorum(f"signerpeers {' '.join(args)}", lambda by: self.token.signerpeers(peers, by),
                            f" Signer peers: {' '.join(peers) or 'none'}\n")

    def do_keygen(self, args: list[str]) -> str:
        if len(args) not in (3, 4):
            raise _Usage
        alg = keystore.parse_algorithm(args[0])
        role = keystore.parse_role(args[1])
        label = args[3] if len(args) == 4 else None

        def run(by: Approval) -> str:
            info = self.token.keygen(alg, role, args[2], label, by)
            return (f"ok: key generated label={info.label} zone={info.zone} algorithm={alg} "
                    f"role={role} tag={info.keytag}\n")

        return self._quorum(shlex.join(["keygen", *args]), run)

    def do_keyimport(self, args: list[str]) -> str:
        if len(args) not in (3, 4):
            raise _Usage
        role = keystore.parse_role(args[0])

        def run(by: Approval) -> str:
            self.token.require(by, "keyimport")  # the quorum before the file is even opened
            text = bindkey.read_file(args[2], MAX_KEY_FILE)
            info = self.token.keyimport(role, args[1], text, args[3] if len(args) == 4 else None, by)
            return (f"ok: key imported label={info.label} zone={info.zone} algorithm={info.algorithm} "
                    f"role={role} tag={info.keytag}\n")

        return self._quorum(shlex.join(["keyimport", *args]), run)

    def do_keydel(self, args: list[str]) -> str:
        label, = _want(args, 1)
        return self._quorum(shlex.join(["keydel", label]), lambda by: self.token.keydel(label, by),
                            f" Key {label} deleted\n")

    def do_keylist(self, args: list[str]) -> str:
        out = []
        records = self.token.snapshot().keys
        for k in self.token.keys():
            rec = records.get(k.label)
            extra = (" compat" if k.compat else "") + (f" id={k.p11_id.hex()}" if k.p11_id is not None else "") \
                + (" role-open" if rec is not None and rec.role_open else "")
            out.append(f" {k.label}  zone={k.zone} alg={k.algorithm} ({algorithms.by_number(k.algorithm).mnemonic}) "
                       f"role={k.role} tag={k.keytag}{extra}\n"
                       f"   {k.zone} IN DNSKEY {k.dnskey().to_text()}\n"
                       f"   {k.zone} IN DS {k.ds().to_text()}\n")
        return "".join(out)

    def do_signerlogin(self, args: list[str]) -> str:
        def check(pin: str) -> str:
            if not self.token.check_pin(pin, source=self.session.id):
                raise PinIncorrect("PIN incorrect")
            self.session.signer = True
            return "ok: signer logged in\n"
        return self._ask("PIN: ", check)

    def do_tpmloadkey(self, args: list[str]) -> str:
        """Load a key: on a device custody (TPM 2.0) into the device, answering its real handle;
        on software custody a random handle names it, as before. Either way the handle only
        names the key for this console: ``tpmtimedsign`` signs through the token's policy check."""
        label, = _want(args, 1)
        if not self.session.signer:
            raise NotPermitted("signing needs the signer PIN on this session: signerlogin")
        self.token.key(label)
        key = self._device_key(label)
        if key is not None:
            # a handle this console gave another key before now names this one (that key was evicted)
            handle = f"{key.resident():08X}"
        else:
            handle = secrets.token_hex(4).upper()
        self.handles[handle] = label
        return f"ok: key loaded handle={handle}\n"

    def do_tpmtimedsign(self, args: list[str]) -> str:
        handle, hexdata = _want(args, 2)
        if not self.session.signer:
            raise NotPermitted("signing needs the signer PIN on this session: signerlogin")
        label = self.handles.get(handle.upper())
        if label is None:
            raise NotFound(f"no key loaded with handle {handle}")
        try:
            data = bytes.fromhex(hexdata)
        except ValueError:
            raise InvalidArgument("signing data is not hex") from None
        result, limit = self.token.timed_sign_verbose(label, data)
        out = ""
        with contextlib.suppress(Refusal):  # echo the header fields the policy looked at, as the original did
            h = rrsig.header(data)
            out = f" checking expiration time {h.expiration} < {limit} and algorithm {h.algorithm}\n"
        if not result.ok:
            return out + self._answer(Refusal(f"{result.reason}"))
        return out + f" computing hash of {len(data)} bytes:\nok: signature\n{hexdump(result.signature)}DONE\n"

    def do_tpmflush(self, args: list[str]) -> str:
        handle, = _want(args, 1)
        label = self.handles.pop(handle.upper(), None)
        if label is None:
            raise NotFound(f"no key loaded with handle {handle}")
        self._unload(handle.upper(), label)
        return "ok: flushed\n"

    def do_tpmreset(self, args: list[str]) -> str:
        handles, self.handles = self.handles, {}
        for handle, label in handles.items():
            self._unload(handle, label)
        return "ok: reset\n"

    def _unload(self, handle: str, label: str) -> None:
        """Flush ``label``'s key from the device if it still sits at ``handle`` (it may have been
        evicted and reloaded elsewhere since, or deleted); nothing to do on software custody."""
        try:
            key = self._device_key(label)
        except NotFound:
            return
        if key is not None and key.handle() == int(handle, 16):
            key.unload()

    def _device_key(self, label: str) -> DeviceKey | None:
        """``label``'s key if a device holds it by handle; None on software custody (whose keys
        are not unsealed merely to be named)."""
        if self.token.custody.name == "software":
            return None
        key = self.token.loaded_key(label)
        return key if isinstance(key, DeviceKey) else None

    def do_audit(self, args: list[str]) -> str:
        if args == ["verify"]:
            n, problem = self.token.audit_verify()
            if problem:
                raise IntegrityError(f"audit log: {problem}")
            return f"ok: audit log verified, {n} entries\n"
        n = _int(args[0], "N") if args else 20
        return "".join(e + "\n" for e in self.token.audit_tail(n))

    def do_status(self, args: list[str]) -> str:
        from .status import render
        return render(self.token, self.session)

    def do_acceptrollback(self, args: list[str]) -> str:
        _want(args, 0)

        def run(by: Approval) -> str:
            was, now = self.token.acceptrollback(by)
            return (f" Rollback accepted: the store's counter {was} set to the TPM's {now}; "
                    f"signing resumes\n")
        return self._quorum("acceptrollback", run)

    def do_custodymigrate(self, args: list[str]) -> str:
        """The target named as ``init --custody`` names it; an HSM's PIN from a file, never the line."""
        from . import migration
        from .custody import parse_spec, read_pin_file
        if not args:
            raise _Usage
        spec, rest = args[0], args[1:]
        hsm = spec.startswith("pkcs11")
        if len(rest) != 2 if hsm else not (not rest or (len(rest) == 2 and rest[0] == "pcrs")):
            raise _Usage

        def target() -> tuple[str, dict]:
            if hsm:  # the PIN file is read only once a quorum decided, in run()
                return parse_spec(spec, token=rest[0], pin=read_pin_file(rest[1]))
            return parse_spec(spec, pcrs=rest[1] if rest else None)
        if not hsm:
            target()  # a bad spec is refused before officers approve it

        def run(by: Approval) -> str:
            self.token.require(by, "custody-migrated")  # the quorum first: only then is a PIN file read
            kind, config = target()
            moved = self.token.custodymigrate(kind, config, by, migration)
            tags = " ".join(f"{m['label']}={m['keytag']}" for m in moved) or "none"
            return f"ok: custody migrated to {kind}; keys moved (label=tag): {tags}; master.key destroyed\n"
        return self._quorum(shlex.join(["custodymigrate", *args]), run)

    def do_quit(self, args: list[str]) -> str:
        self.close()
        return ""

    do_exit = do_quit
