"""``cryptobat status``: the token at a glance, as a readable table."""
from __future__ import annotations

import time

from . import algorithms, tally
from .quorum import Session
from .token import Token


MAX_REFUSED_ROWS = 20  # the cumulative refusal counters shown, most frequent first


def _ago(now: int, t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "-"


def custody_line(token: Token) -> str:
    """The custody's kind and what it says of its device (manufacturer, firmware, objects...)."""
    describe = getattr(token.custody, "describe", None)
    try:
        fields = describe() if describe is not None else {}
    except Exception as e:  # a device gone quiet must not take status with it
        fields = {"device": f"unavailable ({type(e).__name__}: {str(e)[:80]})"}
    return "  ".join([token.custody.name] + [f"{k} {v}" for k, v in fields.items() if k != "kind"])


def render(token: Token, session: Session | None = None) -> str:
    s = token.snapshot()
    now = token.now()
    here = token.present(session)
    mv = s.max_validity
    rows = [
        ("token", f"{token.info()['label']}  serial {s.serial}  custody {token.custody.name}"),
        ("home", str(token.home)),
        ("clock", f"{_ago(now, now)} ({now})" + ("  TAMPER: signing refused until settime" if token.policy().clock_tampered else "  trusted")),
        ("quorum", f"{s.quorum} of {len(s.officers)} officers, {len(here)} present"),
        ("policy", f"max validity +{mv} s" if mv else "no max validity set: signing disabled"),
        ("signer PIN", ("set" if s.pin else "not set") + (
            "  LOCKED after wrong PINs: a quorum must setpin" if token.pin_locked() else
            f"  {s.pin_failures} wrong in a row" if s.pin_failures else "")),
        ("clock gap", f"{s.clock.max_gap} s allowed across a restart"),
        ("custody", custody_line(token)),
    ]
    counter = token.rollback_values()
    if counter is not None:
        rows.append(("rollback", f"counter store {counter[0]} / TPM {counter[1]}" + (
            f"  HELD: {token.held}" if token.held else "")))
    pend = token.pending()
    if pend:
        rows.append(("pending", ", ".join(f"{op.id}: {op.text}" for op in pend)))
    if s.signer_peers:
        rows.append(("signer peers", " ".join(s.signer_peers)))
    c = token.counters()
    rows.append(("counters", f"signatures {c['signatures']}  refusals {c['refusals']}  "
                             f"compat {c['compat_signatures']}  logins {c['logins']}  failed logins {c['login_failures']}"))
    if s.p11_window_until > now:
        rows.append(("pkcs11", f"key management window open for {s.p11_window_until - now} s"))
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    out.append("")
    out.append(f"{'officer':<16} {'present':<8} {'factors':<20} state")
    for name, o in s.officers.items():
        factors = "TOTP + passphrase" if o.passphrase else "TOTP only"
        state = "; ".join(f"{where} locked until {_ago(now, until)}"
                          for where, until in (("console", o.locked_until), ("remote", o.remote_locked_until))
                          if until > now) or "ok"
        out.append(f"{name:<16} {'yes' if name in here else 'no':<8} {factors:<20} {state}")
    refused = tally.rows(c["refused"])
    if refused:
        out.append("")
        out.append(f"{'refused (key)':<28} {'count':>8}  reason")
        for key, why, n in refused[:MAX_REFUSED_ROWS]:
            out.append(f"{key:<28} {n:>8}  {why}")
        if len(refused) > MAX_REFUSED_ROWS:
            out.append(f"{'...':<28} {sum(r[2] for r in refused[MAX_REFUSED_ROWS:]):>8}  "
                       f"{len(refused) - MAX_REFUSED_ROWS} more (key, reason) pairs")
    out.append("")
    out.append(f"{'key':<28} {'zone':<20} {'alg':<18} {'role':<5} {'tag':>5}  mode")
    for k in token.keys():
        alg = f"{k.algorithm} {algorithms.by_number(k.algorithm).mnemonic}"
        out.append(f"{k.label:<28} {k.zone:<20} {alg:<18} {k.role:<5} {k.keytag:>5}  "
                   f"{'compat (hash-only allowed)' if k.compat else 'full policy'}")
    return "\n".join(out) + "\n"
