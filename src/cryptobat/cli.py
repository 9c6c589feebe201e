"""The ``cryptobat`` command: one entry point, a subcommand per job."""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from . import __version__
from .errors import CryptobatError, TokenBusy
from .home import resolve_home

SECRET_PROMPTS = ("Passphrase: ", "Old passphrase: ", "New passphrase: ", "Repeat passphrase: ",
                  "New PIN: ", "PIN: ")


def _home_arg(p: argparse.ArgumentParser, top: bool = False) -> None:
    # on subcommands the option must not overwrite a --home given before the subcommand
    p.add_argument("--home", metavar="DIR", default=None if top else argparse.SUPPRESS,
                   help="token directory (default $CRYPTOBAT_HOME or ~/.local/share/cryptobat)")


def _attach(path: Path, commands: list[str] | None = None) -> int:
    """Relay a console on the daemon's socket to this terminal (or run ``commands``)."""
    import getpass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    r = s.makefile("rb")
    interactive = commands is None and sys.stdin.isatty()

    def read_prompt() -> str | None:
        """Copy the daemon's answer to stdout up to the next prompt; return the prompt."""
        out = bytearray()
        while True:
            c = r.read(1)
            if not c:
                sys.stdout.write(out.decode(errors="replace"))
                return None
            out += c
            text = out.decode(errors="replace")
            for p in ("> ",) + SECRET_PROMPTS:
                if text == p or text.endswith("\n" + p):
                    sys.stdout.write(text[: -len(p)])
                    return p

    lines = iter(commands) if commands is not None else None
    while True:
        prompt = read_prompt()
        sys.stdout.flush()
        if prompt is None:
            return 0
        try:
            if lines is not None:
                line = next(lines)
            elif interactive and prompt in SECRET_PROMPTS:
                line = getpass.getpass(prompt)
            elif interactive:
                line = input(prompt)
            else:  # a script: print a transcript, as the embedded console does
                line = sys.stdin.readline()
                if not line:
                    return 0
                line = line.rstrip("\n")
                sys.stdout.write(prompt + ("" if prompt in SECRET_PROMPTS else line) + "\n")
        except (EOFError, StopIteration):
            return 0
        s.sendall(line.encode() + b"\n")


def _serving(home: Path) -> Path | None:
    """The console socket of a daemon serving ``home``, if one does."""
    from .client import serving
    p = home / "console.sock"
    return p if serving(p) else None


def _custody_pin(a) -> str | None:
    """The backing HSM's PIN: from --custody-pin-file (first line) or $CRYPTOBAT_CUSTODY_PIN, never argv."""
    import os
    from .custody import read_pin_file
    if a.custody_pin_file:
        return read_pin_file(a.custody_pin_file)
    return os.environ.get("CRYPTOBAT_CUSTODY_PIN") if a.custody.startswith("pkcs11") else None


def cmd_init(a) -> int:
    from .custody import parse_spec, spec_from_env
    from .home import init_token
    home = resolve_home(a.home)
    if a.custody is None and a.custody_token is None and a.pcrs is None and a.custody_pin_file is None:
        kind, config = spec_from_env()  # $CRYPTOBAT_CUSTODY, software when unset
    else:
        a.custody = a.custody or "software"
        kind, config = parse_spec(a.custody, token=a.custody_token, pin=_custody_pin(a), pcrs=a.pcrs)
    t = init_token(home, a.quorum, kind=kind, config=config)
    print(f"Initialised token {t.serial()} at {home} (quorum {a.quorum}, custody {t.custody.name})")
    print("Next: enrol officers with 'cryptobat console' -> coadd NAME")
    t.close()
    return 0


def cmd_console(a) -> int:
    home = resolve_home(a.home)
    sock = _serving(home)
    if sock:
        return _attach(sock)
    from .console import Console
    from .home import open_token
    token = open_token(home, rollback_hold=a.rollback_hold)
    console = Console(token)
    if token.held:
        print(f"HELD: {token.held}\nOfficers: cologin, then acceptrollback (quorum) to serve this store; "
              f"nothing is signed until then.", file=sys.stderr)
    interactive = sys.stdin.isatty()
    import getpass
    try:
        while not console.closed:
            try:
                if interactive:
                    line = getpass.getpass(console.prompt) if console.secret_input else input(console.prompt)
                else:  # a script: print a transcript, prompt and command, as on the device
                    line = sys.stdin.readline()
                    if not line:
                        break
                    shown = "" if console.secret_input else line.rstrip("\n")
                    sys.stdout.write(console.prompt + shown + "\n")
            except EOFError:
                break
            sys.stdout.write(console.handle(line))
            sys.stdout.flush()
    finally:
        token.close()
    return 0


def _run_console_commands(home: Path, commands: list[str], check_audit: bool = True) -> tuple[str, bool]:
    """Run console commands on the token, in process or through a daemon serving it; return
    their answers and whether any failed."""
    sock = _serving(home)
    if sock:
        import io
        from contextlib import redirect_stdout

        from .console import failed
        buf = io.StringIO()
        with redirect_stdout(buf):
            _attach(sock, commands)
        return buf.getvalue(), failed(buf.getvalue())
    from .console import Console
    from .home import open_token
    token = open_token(home, check_audit=check_audit)
    try:
        console = Console(token)
        out, bad = [], False
        for c in commands:
            out.append(console.handle(c))
            bad = bad or console.error is not None
        return "".join(out), bad
    finally:
        token.close()


def cmd_status(a) -> int:
    out, bad = _run_console_commands(resolve_home(a.home), ["status"])
    sys.stdout.write(out)
    return 1 if bad else 0


def _audit_read(a) -> int:
    """``audit --json`` / ``--follow``: the store read-only (a daemon may be running), one line an entry."""
    import json

    from .auditview import Reader, is_refusal, line
    reader = Reader(resolve_home(a.home))
    try:
        reader.start(max(0, a.n))
        for entry in (reader.follow() if a.follow else reader.new()):
            if a.refusals and not is_refusal(entry):
                continue
            print(json.dumps(entry, sort_keys=True) if a.json else line(entry), flush=a.follow)
    finally:
        reader.close()
    return 0


def cmd_audit(a) -> int:
    if a.action == "show" and (a.follow or a.json or a.refusals):
        return _audit_read(a)
    cmd = "audit verify" if a.action == "verify" else f"audit {a.n}"
    out, bad = _run_console_commands(resolve_home(a.home), [cmd], check_audit=False)  # shows a broken log too
    sys.stdout.write(out)
    return 1 if bad else 0


def cmd_recover(a) -> int:
    """Open a token whose store lost acknowledged changes, accepting the loss (audited)."""
    from .home import open_token
    if not a.accept_lost_changes:
        raise CryptobatError("say what to accept: cryptobat recover --accept-lost-changes")
    t = open_token(resolve_home(a.home), accept_lost_changes=True, rollback_hold=True)
    try:
        print(f"Token {t.serial()} opens at audit entry {t.audit_seq()}; "
              f"check its policy, keys and officers with: cryptobat status")
        if t.held:  # lost changes put the store behind the TPM's counter too: the quorum's decision
            print(f"HELD: {t.held}")
    finally:
        t.close()
    return 0


def cmd_keyfiles(a) -> int:
    from . import keyfiles
    from .client import connect
    client = connect(None, a.home)
    try:
        zone = a.zone if a.zone.endswith(".") else a.zone + "."
        keys = [k for k in client.keys() if k.zone == zone.lower()]
    finally:
        client.close()
    if not keys:
        raise CryptobatError(f"no keys for zone {zone} in the token")
    for p in keyfiles.write(keys, Path(a.dir)):
        print(p)
    return 0


def cmd_serve(a) -> int:
    from .serve import replace, serve
    home = resolve_home(a.home)
    if a.replace:
        return replace(home)
    sockets = Path(a.socket_dir) if a.socket_dir else None
    p11 = None if a.no_pkcs11 else Path(a.pkcs11_socket) if a.pkcs11_socket else (sockets or home) / "pkcs11.sock"
    return serve(home, pty=a.pty, serial_dev=a.serial, baud=a.baud,
                 console_sock=Path(a.console_socket) if a.console_socket else None,
                 native_sock=Path(a.native_socket) if a.native_socket else None, p11_sock=p11,
                 signer_group=a.signer_group, socket_dir=sockets, takeover=a.takeover,
                 takeover_check=a.takeover_check,
                 syslog=a.syslog_socket or ("/dev/log" if a.syslog else None))


def cmd_demo(a) -> int:
    from .demo import run
    return run(keep=a.keep)


def cmd_signzone(argv: list[str]) -> int:
    from .signzone import main
    return main(argv)


def cmd_p11_stdio(a) -> int:
    from .p11serve import serve_stdio
    return serve_stdio(resolve_home(a.home))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cryptobat", description="A DNSSEC signing HSM that enforces DNSSEC policy itself.")
    p.add_argument("--version", action="version", version=f"cryptobat {__version__}")
    _home_arg(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("init", help="create a token")
    _home_arg(s)
    s.add_argument("--quorum", type=int, default=2, metavar="M", help="officers needed for a change (default 2)")
    s.add_argument("--custody", metavar="SPEC",
                   help="where private keys live ($CRYPTOBAT_CUSTODY when not given): software (the default; "
                        "a 0600 master key in the home), "
                        "tpm2[:TCTI] (inside a TPM 2.0; TCTI default device:/dev/tpmrm0, e.g. "
                        "swtpm:path=/run/swtpm.sock; with a rollback counter) or pkcs11:MODULE (an existing HSM)")
    s.add_argument("--pcrs", metavar="LIST", help="tpm2: bind the sealed master secret to these PCRs, e.g. 0,2,4,7")
    s.add_argument("--custody-token", metavar="LABEL", help="pkcs11: the HSM token's label")
    s.add_argument("--custody-pin-file", metavar="FILE",
                   help="pkcs11: a file whose first line is the HSM token's PIN (else $CRYPTOBAT_CUSTODY_PIN)")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("console", help="the token's console on this terminal")
    _home_arg(s)
    s.add_argument("--rollback-hold", action="store_true",
                   help="open a store the TPM's rollback counter refuses, held: nothing is signed, officers may "
                        "log in and a quorum may acceptrollback (audited with both counter values)")
    s.set_defaults(fn=cmd_console)

    s = sub.add_parser("status", help="the token at a glance")
    _home_arg(s)
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("audit", help="show or verify the audit log")
    _home_arg(s)
    s.add_argument("action", choices=["show", "verify"], nargs="?", default="show")
    s.add_argument("-n", type=int, default=20, help="entries to show (with --follow: before the new ones)")
    s.add_argument("--follow", "-f", action="store_true",
                   help="then print each new entry as it is committed, until interrupted (works while the "
                        "daemon runs: the store is read read-only, by the token's own user only)")
    s.add_argument("--json", action="store_true", help="one JSON object per line instead of readable lines")
    s.add_argument("--refusals", action="store_true", help="only entries that record refused calls")
    s.set_defaults(fn=cmd_audit)

    s = sub.add_parser("recover", help="open a token whose store lost acknowledged changes")
    _home_arg(s)
    s.add_argument("--accept-lost-changes", action="store_true",
                   help="accept that changes the token had acknowledged are gone (audited)")
    s.set_defaults(fn=cmd_recover)

    s = sub.add_parser("keyfiles", help="write BIND K*.key/.private files for a zone's token keys")
    _home_arg(s)
    s.add_argument("zone")
    s.add_argument("dir", nargs="?", default=".")
    s.set_defaults(fn=cmd_keyfiles)

    s = sub.add_parser("serve", help="run the daemon: console, native API and PKCS#11 sockets")
    _home_arg(s)
    s.add_argument("--pty", action="store_true", help="also serve the console on a pseudo-terminal")
    s.add_argument("--serial", metavar="DEV", help="also serve the console on a serial device")
    s.add_argument("--baud", type=int, default=115200)
    s.add_argument("--console-socket", metavar="PATH")
    s.add_argument("--native-socket", metavar="PATH")
    s.add_argument("--pkcs11-socket", metavar="PATH")
    s.add_argument("--no-pkcs11", action="store_true", help="do not serve PKCS#11")
    s.add_argument("--signer-group", metavar="GROUP",
                   help="native and PKCS#11 sockets mode 0660 for this group (the signers' group, e.g. pdns); "
                        "the console socket stays owner-only. Without it every socket is owner-only")
    s.add_argument("--socket-dir", metavar="DIR",
                   help="put the sockets in DIR (e.g. /run/cryptobat) with links in the home, "
                        "so signers need not reach the (0700) home")
    s.add_argument("--replace", action="store_true",
                   help="restart the daemon serving this home, with the code installed now, keeping every "
                        "PKCS#11 and native connection (console sessions end); the other options are ignored. "
                        "Exit status 0 if it restarted; if not, it serves on as before (systemd: ExecReload=)")
    s.add_argument("--syslog", action="store_true",
                   help="also log each refusal decision to syslog/journald (/dev/log), aggregated as in the audit")
    s.add_argument("--syslog-socket", metavar="PATH", help="log refusals to this Unix socket instead of /dev/log")
    s.add_argument("--takeover", type=int, metavar="FD", help=argparse.SUPPRESS)  # the daemon's own restarts
    s.add_argument("--takeover-check", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("demo", help="replay the original device's sessions on a throwaway token")
    s.add_argument("--keep", metavar="DIR", help="keep the token and zone files in DIR")
    s.set_defaults(fn=cmd_demo)

    sub.add_parser("signzone", help="sign a zone under the token's policy (dnssec-signzone options)", add_help=False)

    s = sub.add_parser("p11-stdio", help="serve PKCS#11 (p11-kit RPC) on stdin/stdout")
    _home_arg(s)
    s.set_defaults(fn=cmd_p11_stdio)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # signzone takes dnssec-signzone's own options, so hand it the rest untouched
        if "signzone" in argv:
            i = argv.index("signzone")
            pre = argparse.ArgumentParser(add_help=False)
            pre.add_argument("--home")
            home = pre.parse_known_args(argv[:i])[0].home
            rest = argv[i + 1:]
            if home and "--home" not in rest:
                rest = ["--home", home] + rest
            return cmd_signzone(rest)
        a = build_parser().parse_args(argv)
        return a.fn(a)
    except TokenBusy as e:
        print(f"cryptobat: {e}; is 'cryptobat serve' running for it?", file=sys.stderr)
    except CryptobatError as e:
        print(f"cryptobat: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError as e:
        import os
        import select
        try:  # stdout a pipe or socket whose reader is gone (`cryptobat ... | head`): nothing to say
            p = select.poll()
            p.register(sys.stdout.fileno(), select.POLLOUT)
            stdout_closed = any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
        except (OSError, ValueError, AttributeError):
            stdout_closed = False
        if stdout_closed:
            try:  # and nothing left in stdout's buffer to fail at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            return 0
        print(f"cryptobat: connection closed mid-command ({e.strerror or 'broken pipe'})", file=sys.stderr)
    except OSError as e:  # one line, as for every other failure
        print(f"cryptobat: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
