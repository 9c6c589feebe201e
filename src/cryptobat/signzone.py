"""``cryptobat signzone``: dnssec-signzone's command line, signing through the token.

The zone is read (:mod:`cryptobat.zonesign.reader`), completed with the DNSKEY
RRset, an NSEC or NSEC3 chain and the new SOA serial, and every authoritative
RRset becomes one RFC 4034 §3.1.8.1 signing input per key: the RRSIG RDATA
without its signature, then the RRs in canonical form and order.  Those go to
the token in large batches (``Client.timed_sign``) from a worker thread while
the rest of the zone is prepared; the token checks each against its policy and
a refusal ends the run with BIND's message and no output file.  Unless ``-P``,
every signature is then verified against the DNSKEY (in threads, overlapping
signing), a sample of RRsets is re-validated by dnspython from the presentation
form, and the chain is checked; then the file is written to a temporary name,
fsynced and renamed into place.

What a key signs follows its role in the token, as the policy demands
(:func:`key_roles`): the apex DNSKEY, CDS and CDNSKEY only KSKs and CSKs, as
with ``dnssec-signzone -x``; everything else the ZSKs, or CSKs where there is none.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import random
import re
import secrets
import stat
import struct
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import dns.dnssec
import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cryptography.exceptions import InvalidSignature

from .errors import CryptobatError
from .policy import SKEW, serial_gt
from .timespec import parse_time
from .zonesign import keys as zkeys
from .zonesign import reader
from .zonesign.reader import (
    DELEGATION, DNAME, DNSKEY, NS, NSEC, NSEC3, NSEC3PARAM, OCCLUDED, RRSIG, SOA,
    Node, RRset, ZoneError, key_text, key_wire,
)

PROG = "cryptobat signzone"
DS, CDS, CDNSKEY = 43, 59, 60
KEYSET_TYPES = frozenset((DNSKEY, CDS, CDNSKEY))  # signed by the KSKs and CSKs only
SEP_ROLES = ("ksk", "csk")  # token roles whose keys sign KEYSET_TYPES
BATCH = 8192  # signing inputs per timed_sign call
VERIFY_CHUNK = 2048
VERIFY_INFLIGHT = 48  # verification chunks queued before the signer waits for the verifiers
MAX_INFLIGHT = 2  # signing batches at the token at once (one signing, one queued)
SAMPLE = 24  # RRsets re-validated with dns.dnssec.validate from the text form


class Fatal(CryptobatError):
    """Ends the run with one ``fatal:`` line."""


# ---------------------------------------------------------------- options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Sign a zone with keys held by the Cryptobat token.")
    p.add_argument("-o", dest="origin", help="zone origin (default: zone file name)")
    p.add_argument("-f", dest="output", help="output file (default ZONEFILE.signed; - for stdout)")
    p.add_argument("-s", dest="start", help="signature inception: YYYYMMDDHHMMSS, epoch, +N, now, now+N (default now-3600); "
                                            f"the token refuses an inception more than {SKEW} s after its own time")
    p.add_argument("-e", dest="end", help="signature expiration: as -s, +N from start (default start+30 days)")
    p.add_argument("-k", dest="ksk", action="append", default=[],
                   help="key signing key file (repeatable); each key's role in the token decides what it signs")
    p.add_argument("-x", dest="ksk_only", action="store_true",
                   help="accepted for compatibility and always in effect: DNSKEY, CDS and CDNSKEY are signed "
                        "only by KSKs and CSKs, never by ZSKs (the token refuses that)")
    p.add_argument("-S", dest="smart", action="store_true", help="smart signing: use the zone's keys in the token")
    p.add_argument("-3", dest="salt", help="NSEC3 with this hex salt (- for none)")
    p.add_argument("-H", dest="iterations", type=int, default=0, help="NSEC3 iterations (default 0)")
    p.add_argument("-A", dest="optout", action="store_true", help="NSEC3 opt-out")
    p.add_argument("-N", dest="serial", default="keep", choices=("keep", "increment", "unixtime", "date"))
    p.add_argument("-j", dest="jitter", type=int, default=0, help="expiration jitter in seconds")
    p.add_argument("-P", dest="noverify", action="store_true", help="skip post-sign verification")
    p.add_argument("-v", dest="verbose", type=int, default=0, help="verbosity level")
    p.add_argument("-t", dest="stats", action="store_true", help="print statistics")
    p.add_argument("-n", dest="nthreads", type=int, help="ignored: the token parallelises signing itself")
    p.add_argument("-a", dest="verify_all", action="store_true", help="ignored: signatures are always verified unless -P")
    p.add_argument("--hsm", help="token to use, e.g. unix:/path/native.sock (default $CRYPTOBAT_HSM or the embedded token)")
    p.add_argument("--pin-file", metavar="FILE",
                   help="signer PIN for --hsm, first line of FILE (default $CRYPTOBAT_PIN)")
    p.add_argument("--home", help="home directory of the embedded token")
    p.add_argument("zonefile")
    p.add_argument("zsk", nargs="*", help="zone signing key files")
    return p


def new_serial(old: int, method: str, now: int) -> int:
    if method == "keep":
        return old
    if method == "increment":
        new = (old + 1) & 0xFFFFFFFF
    elif method == "unixtime":
        new = now & 0xFFFFFFFF
    else:
        new = int(time.strftime("%Y%m%d", time.gmtime(now))) * 100
    if not serial_gt(new, old):
        new = (old + 1) & 0xFFFFFFFF
    return new or 1


# ---------------------------------------------------------------- zone completion


def _bitmap(types) -> bytes:
    windows: dict[int, bytearray] = {}
    for t in types:
        w = windows.setdefault(t >> 8, bytearray(32))
        w[(t & 0xFF) >> 3] |= 0x80 >> (t & 7)
    out = bytearray()
    for win in sorted(windows):
        bits = windows[win].rstrip(b"\0")
        out += bytes((win, len(bits))) + bits
    return bytes(out)


class _TypeMaps:
    """Type bitmap wire + text per distinct type set (few per zone)."""

    def __init__(self):
        self._c: dict[tuple, tuple[bytes, str]] = {}

    def get(self, types) -> tuple[bytes, str]:
        k = tuple(sorted(types))
        r = self._c.get(k)
        if r is None:
            r = self._c[k] = (_bitmap(k), " ".join(dns.rdatatype.to_text(t) for t in k))
        return r


def classify(order: list[tuple], nodes: dict[tuple, Node], apex_key: tuple) -> None:
    """Mark delegations (NS below the apex) and what they and DNAMEs occlude."""
    cut = None
    for key in order:
        node = nodes[key]
        if cut is not None and key[: len(cut)] == cut:
            node.kind = OCCLUDED
            continue
        cut = None
        if key != apex_key:
            if NS in node.rrsets:
                node.kind = DELEGATION
                cut = key
            elif DNAME in node.rrsets:
                cut = key


def _lower_text(node: Node) -> str:
    return node.disp.lower() if "\\" not in node.disp else key_text(node.key)


def _chain_types(node: Node) -> list[int]:
    if node.kind == DELEGATION:
        return [t for t in node.rrsets if t in (NS, DS)]
    return list(node.rrsets)


def nsec3_hasher(salt: bytes, iterations: int):
    sha1 = hashlib.sha1

    def h(wire: bytes) -> bytes:
        d = sha1(wire + salt).digest()
        for _ in range(iterations):
            d = sha1(d + salt).digest()
        return d

    return h


def add_nsec3(zone: reader.Zone, order: list[tuple], ttl: int, salt: bytes, iterations: int, optout: bool) -> int:
    nodes = zone.nodes
    okey = zone.origin_key
    flags = 1 if optout else 0
    apex = zone.apex
    p = apex.rrsets[NSEC3PARAM] = RRset(0)
    p.add(struct.pack("!BBHB", 1, 0, iterations, len(salt)) + salt, f"1 0 {iterations} {salt.hex() or '-'}")
    # names with an NSEC3: authoritative names and delegations (insecure ones
    # not under opt-out), and the empty non-terminals above them
    covered: dict[tuple, list[int]] = {}
    for key in order:
        node = nodes[key]
        if node.kind == OCCLUDED:
            continue
        if node.kind == DELEGATION and optout and DS not in node.rrsets:
            continue
        types = _chain_types(node)
        if node.kind != DELEGATION or DS in node.rrsets:
            types.append(RRSIG)
        covered[key] = types
        for i in range(len(okey) + 1, len(key)):
            anc = key[:i]
            if anc not in nodes and anc not in covered:
                covered[anc] = []
    h = nsec3_hasher(salt, iterations)
    hashed = sorted((h(key_wire(k)), types) for k, types in covered.items())
    for i in range(1, len(hashed)):
        if hashed[i][0] == hashed[i - 1][0]:
            raise Fatal("NSEC3 hash collision; choose another salt")
    maps = _TypeMaps()
    pre = struct.pack("!BBHB", 1, flags, iterations, len(salt)) + salt + b"\x14"
    ptext = f"1 {flags} {iterations} {salt.hex() or '-'} "
    b32 = base64.b32hexencode
    otext = zone.origin_text
    for i, (d, types) in enumerate(hashed):
        nd = hashed[i + 1][0] if i + 1 < len(hashed) else hashed[0][0]
        label = b32(d).decode().lower()
        key = okey + (label,)
        if key in nodes:
            raise Fatal(f"NSEC3 owner {label}.{otext} is already in the zone")
        node = nodes[key] = Node(key, f"{label}.{otext}" if otext != "." else f"{label}.")
        bw, bt = maps.get(types)
        rrs = node.rrsets[NSEC3] = RRset(ttl)
        rrs.add(pre + nd + bw, ptext + b32(nd).decode() + (" " + bt if bt else ""))
    return len(hashed)


# ---------------------------------------------------------------- keys


def select_keys(args, token_keys, origin: str) -> list[zkeys.SignKey]:
    chosen: dict[str, zkeys.SignKey] = {}
    try:
        for path, sep in [(p, True) for p in args.ksk] + [(p, False) for p in args.zsk]:
            info = zkeys.match(zkeys.read_keyfile(path), token_keys, origin)
            if info.label not in chosen:
                chosen[info.label] = zkeys.make_signkey(info, sep)
        if args.smart or not chosen:
            for info in token_keys:
                if info.zone.lower() == origin and info.label not in chosen:
                    chosen[info.label] = zkeys.make_signkey(info, info.role in SEP_ROLES)
    except zkeys.KeyFileError as e:
        raise Fatal(str(e)) from None
    except (ValueError, dns.exception.DNSException) as e:
        raise Fatal(f"unusable key: {e}") from None
    if not chosen:
        raise Fatal(f"no keys for zone {origin} in the token")
    return list(chosen.values())


def key_roles(keys: list[zkeys.SignKey]):
    """(keys signing DNSKEY/CDS/CDNSKEY, keys signing everything else), by each key's token role.

    Per algorithm, every KSK and CSK signs the key sets, as ``dnssec-signzone -x`` does: the
    token refuses a ZSK's signature over DNSKEY, CDS or CDNSKEY, so, unlike BIND without -x,
    ZSKs never sign them. The ZSKs sign the rest, or the CSKs if there is no ZSK; a KSK signs
    nothing else (the token refuses that too). Where the roles of an algorithm's keys leave
    either side unsigned, :class:`Fatal` names the algorithm before anything is signed.
    """
    keyset, others = [], []
    for alg in sorted({k.info.algorithm for k in keys}):
        mine = [k for k in keys if k.info.algorithm == alg]
        seps = [k for k in mine if k.info.role in SEP_ROLES]
        if not seps:
            raise Fatal(f"no KSK or CSK of algorithm {_alg_name(alg)} to sign DNSKEY, CDS and CDNSKEY "
                        "(the token refuses a ZSK's signature over them)")
        zsks = [k for k in mine if k.info.role == "zsk"] or [k for k in seps if k.info.role == "csk"]
        if not zsks:
            raise Fatal(f"no ZSK or CSK of algorithm {_alg_name(alg)} to sign the zone "
                        "(the token refuses a KSK's signature outside DNSKEY, CDS and CDNSKEY)")
        keyset += seps
        others += zsks
    return tuple(keyset), tuple(others)


def _alg_name(alg: int) -> str:
    name = dns.dnssec.algorithm_to_text(alg)
    return name if name == str(alg) else f"{name} ({alg})"


# ---------------------------------------------------------------- the run


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.last = total, enabled, 0.0

    def update(self, done: int, final: bool = False) -> None:
        if not self.enabled:
            return
        t = time.monotonic()
        if final or t - self.last > 0.2:
            self.last = t
            sys.stderr.write(f"\r{PROG}: {done}/{self.total} signatures ({100 * done // max(self.total, 1)}%)")
            if final:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _fmt_time(t: int) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(t))


def _pin(path: str | None) -> str | None:
    """The signer PIN from ``--pin-file`` (its first line); None leaves it to $CRYPTOBAT_PIN."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            pin = f.readline(1024).rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CryptobatError(f"cannot read the PIN file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not pin:
        raise CryptobatError(f"the PIN file {path} is empty")
    return pin


# ---------------------------------------------------------------- the output file
#
# The signed zone is written to ``.NAME.XXXXXXXX.tmp`` beside the output file NAME
# (eight of [a-z0-9_]), fsynced and renamed over NAME.  Its writer holds an exclusive
# flock on it from the moment it exists until it is renamed or removed; a run that was
# killed leaves it unlocked, and the next run writing NAME removes it.


def _temp_name_re(out: str) -> re.Pattern:
    return re.compile(r"\." + re.escape(os.path.basename(out)) + r"\.[a-z0-9_]{8}\.tmp\Z")


def clean_stale_temps(out: str) -> list[str]:
    """Remove the temporary files of runs writing ``out`` whose writer is gone; return their paths.

    Only files of the exact temporary name pattern, in the output's directory, regular,
    owned by this user and not locked: a writer locks its file before writing to it and
    checks afterwards that it was not removed in between (:func:`_create_temp`), so a
    file that can be locked here without waiting has no writer.
    """
    d = os.path.dirname(os.path.abspath(out))
    match = _temp_name_re(out).match
    try:
        names = [n for n in os.listdir(d) if match(n)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(d, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a writer holds it
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _create_temp(out: str) -> tuple[int, str]:
    """(fd, path) of a new, exclusively flocked temporary file beside ``out``."""
    d = os.path.dirname(os.path.abspath(out))
    base = os.path.basename(out)
    for _ in range(100):
        path = os.path.join(d, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise Fatal(f"cannot create a temporary file in {d}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink:
                return fd, path
        except BlockingIOError:
            pass
        # a concurrent clean_stale_temps took the new file for stale before it was locked
        # and removes it (or already did): take another name
        os.close(fd)
    raise Fatal(f"cannot create a temporary file in {d}")


def main(argv: list[str] | None = None, client=None) -> int:
    """Run the signer; ``client`` is the token to use (default: ``cryptobat.client.connect``)."""
    args = _parser().parse_args(argv)
    own = client is None
    try:
        if own:
            from .client import connect

            client = connect(args.hsm, args.home, _pin(args.pin_file))
        return _run(args, client)
    except (CryptobatError, ZoneError) as e:
        print(f"{PROG}: fatal: {e}", file=sys.stderr)
        return 1
    finally:
        if own and client is not None:
            client.close()


def _run(args, client) -> int:
    t0 = time.monotonic()
    try:
        origin = dns.name.from_text(args.origin or os.path.basename(args.zonefile))
    except dns.exception.DNSException as e:
        raise Fatal(f"bad origin: {e}") from None
    otext = origin.to_text().lower()
    if args.salt is not None:
        try:
            salt = b"" if args.salt == "-" else bytes.fromhex(args.salt)
        except ValueError:
            raise Fatal(f"bad NSEC3 salt {args.salt!r}") from None
        if len(salt) > 255 or not 0 <= args.iterations <= 65535:
            raise Fatal("bad NSEC3 salt or iterations")
    elif args.optout:
        raise Fatal("-A requires -3")

    token_keys = client.keys()
    now = int(client.time())
    keys = select_keys(args, token_keys, otext)
    roles = key_roles(keys)
    start = parse_time(args.start, now, now) if args.start else now - 3600
    end = parse_time(args.end, start, now) if args.end else start + 30 * 86400
    if end <= start:
        raise Fatal("start time is not before end time")
    if args.jitter < 0 or args.jitter >= end - start:
        raise Fatal("jitter must be between 0 and the validity period")

    # start the token's signing workers and the verifier processes while the zone is read
    try:
        size_hint = os.path.getsize(args.zonefile) // 12
    except OSError:
        size_hint = 0
    verifier = None if args.noverify else _verifier_pool(size_hint)
    warmer = threading.Thread(target=_warm, args=(client, verifier), daemon=True)
    warmer.start()
    try:
        return _sign(args, client, verifier, warmer, origin, otext, keys, roles, now, start, end, t0)
    except BaseException:
        warmer.join()
        if verifier is not None:
            verifier.shutdown(wait=True, cancel_futures=True)
        raise


def _warm(client, verifier) -> None:
    engine = getattr(getattr(client, "token", None), "engine", None)
    if engine is not None and hasattr(engine, "warm"):
        engine.warm()
    if verifier is not None:
        try:
            for f in [verifier.submit(int) for _ in range(os.cpu_count() or 2)]:
                f.result()
        except Exception:
            pass


def _sign(args, client, verifier, warmer, origin, otext, keys, roles, now, start, end, t0) -> int:
    verbose = args.verbose
    salt = b""
    if args.salt is not None:
        salt = b"" if args.salt == "-" else bytes.fromhex(args.salt)
    zone = reader.read_zone(args.zonefile, origin)
    nodes = zone.nodes
    apex = zone.apex
    soa_rrs = apex.rrsets[SOA]
    (soa_wire, soa_text), = soa_rrs.rdatas.items()
    soa = dns.rdata.from_text(dns.rdataclass.IN, SOA, soa_text, origin=origin, relativize=False)
    serial = new_serial(soa.serial, args.serial, now)
    if serial != soa.serial:
        soa = soa.replace(serial=serial)
        soa_rrs.rdatas = {soa.to_digestable(origin): soa.to_text()}
    neg_ttl = min(soa_rrs.ttl, soa.minimum)  # RFC 9077

    # DNSKEY RRset: the zone's own plus every signing key
    dk = apex.rrsets.get(DNSKEY)
    if dk is None:
        dk = apex.rrsets[DNSKEY] = RRset(soa.minimum)
    for k in keys:
        rd = k.info.dnskey()
        dk.add(rd.to_digestable(), rd.to_text())
    keyset_keys, zone_keys = roles

    order = sorted(nodes)
    classify(order, nodes, zone.origin_key)
    use_nsec = args.salt is None
    if not use_nsec:
        nchain = add_nsec3(zone, order, neg_ttl, salt, args.iterations, args.optout)
        order = sorted(nodes)
    auth = [k for k in order if nodes[k].kind != OCCLUDED]  # names with NSEC (the signed ones)
    if use_nsec:
        nchain = len(auth)
    t_prep = time.monotonic()

    # ---- one pass in canonical order: build signing inputs a batch at a time, keep
    # at most MAX_INFLIGHT batches at the token, and as each batch comes back render
    # its names (records + RRSIGs) into the temporary output file and hand its
    # signatures to the verifier processes; then drop it.
    pack_hdr = struct.Struct("!HBBIIIH").pack
    pack_tct = struct.Struct("!HHI").pack
    inception = start & 0xFFFFFFFF
    incs = _fmt_time(inception)
    jitter = args.jitter
    rand = random.SystemRandom().randrange
    b64 = base64.b64encode
    okey = zone.origin_key
    kindex = {id(k): i for i, k in enumerate(keys)}
    kspecs = [(k.info.algorithm, k.info.flags, k.info.public_key) for k in keys]
    # per key: (label, header fields, signer wire, RRSIG text after the type, its index)
    kmeta = {id(k): (k.info.label, k.info.algorithm, k.info.keytag, k.signer_wire, k.info.zone, kindex[id(k)])
             for k in keys}
    keyset_meta = [kmeta[id(k)] for k in keyset_keys]
    zone_meta = [kmeta[id(k)] for k in zone_keys]
    tnames: dict[int, str] = {}
    exps: dict[int, str] = {}
    maps = _TypeMaps()
    rng = random.Random()
    sample_keys = set(auth[:8] + [rng.choice(auth) for _ in range(SAMPLE)]) if (auth and not args.noverify) else set()
    samples: list = []  # (disp, type, ttl, [texts], [(global index, rrsig text prefix)])
    warmer.join()  # the worker pool exists before the first batch (no second pool from a race)
    signer = ThreadPoolExecutor(1, thread_name_prefix="signzone-sign")
    nrrsets = 0
    nsigs = 0  # signatures received
    submitted = 0
    inflight: deque = deque()  # (first index, items, key indexes, template, future)
    vfuts: deque = deque()
    bad: list[int] = []
    bad_key: list = []
    progress = _Progress(0, False)

    out = args.output or args.zonefile + ".signed"
    tmp = None
    stdout_parts: list[bytes] = []
    if out == "-":
        write = stdout_parts.append
        fobj = None
    else:
        clean_stale_temps(out)
        fd, tmp = _create_temp(out)  # locked until renamed into place or removed
        fobj = os.fdopen(fd, "wb")
        write = fobj.write

    def vcollect(limit: int) -> None:
        while len(vfuts) > limit:
            a, kid, f = vfuts.popleft()
            for i in f.result():
                bad.append(a + i)
                bad_key.append(keys[kid[i]])

    def finish() -> None:
        nonlocal nsigs
        i0, batch, kid, tmpl, fut = inflight.popleft()
        res = fut.result()
        n = len(batch)
        if len(res) != n:
            raise Fatal(f"the token returned {len(res)} results for {n} signing requests")
        sigs = [r.signature for r in res]
        del res
        for j, sg in enumerate(sigs):
            if sg is None:
                r = fut.result()[j]
                raise Fatal(f"dnskey '{keys[kid[j]].name}' failed to sign data: {r.reason or 'refused'}")
        text = "".join([x if type(x) is str else x[1] + b64(sigs[x[0]]).decode() + "\n" for x in tmpl])
        write(text.encode("latin-1"))
        del text
        for sm in samples:
            if sm[5] is batch:
                sm[4][:] = [p + b64(sigs[j]).decode() for j, p in sm[4]]
                sm[5] = None
        if verifier is not None:
            for a in range(0, n, VERIFY_CHUNK):
                b = min(a + VERIFY_CHUNK, n)
                vfuts.append((i0 + a, kid[a:b], verifier.submit(
                    _verify_chunk, kspecs, kid[a:b], [it[1] for it in batch[a:b]], sigs[a:b])))
            vcollect(VERIFY_INFLIGHT)
        nsigs += n
        progress.update(nsigs)

    items: list[tuple[str, bytes]] = []
    kid = bytearray()
    tmpl: list = []
    app = tmpl.append

    def submit() -> None:
        nonlocal items, kid, tmpl, app, submitted
        inflight.append((submitted, items, bytes(kid), tmpl, signer.submit(client.timed_sign, items)))
        submitted += len(items)
        items, kid, tmpl = [], bytearray(), []
        app = tmpl.append
        while len(inflight) > MAX_INFLIGHT or (inflight and inflight[0][4].done()):
            finish()

    if sys.stderr.isatty() and len(auth) >= 10000:
        total = len(auth) * len(zone_keys) + sum(
            len(keyset_meta if (t in KEYSET_TYPES and k == okey) else zone_meta)
            for k in auth for t in nodes[k].rrsets
            if nodes[k].kind != DELEGATION or t == DS)
        progress = _Progress(total, True)
    try:
        ai = 0
        nauth = len(auth)
        carry_key, carry_wire = None, b""
        for key in order:
            node = nodes[key]
            kind = node.kind
            disp = node.disp
            rrsets = node.rrsets
            types = sorted(rrsets)
            if kind == OCCLUDED:
                owire = b""
            else:
                owire = carry_wire if key == carry_key else key_wire(key)
                if use_nsec:
                    ai += 1
                    nkey = auth[ai] if ai < nauth else auth[0]
                    nxt = nodes[nkey]
                    nwire = key_wire(nkey)
                    carry_key, carry_wire = nkey, nwire
                    bw, bt = maps.get(_chain_types(node) + [RRSIG, NSEC])
                    nsec = RRset(neg_ttl)
                    nsec.rd = (nwire + bw, f"{_lower_text(nxt)} {bt}")
                    types.append(NSEC)
                    types.sort()
            apex_parts = None
            if key == okey:  # the key RRsets are signed first, as dnssec-signzone does; SOA is written first
                apex_parts = {}
                types.sort(key=lambda t: (t not in KEYSET_TYPES, t))
            labels = len(key) - (1 if key and key[-1] == "*" else 0)
            sampled = key in sample_keys
            for t in types:
                if apex_parts is not None:
                    app = apex_parts.setdefault(t, []).append
                rrs = nsec if t == NSEC and use_nsec and kind != OCCLUDED else rrsets[t]
                ttl = rrs.ttl
                tn = tnames.get(t)
                if tn is None:
                    tn = tnames[t] = dns.rdatatype.to_text(t)
                head = f"{disp}\t{ttl}\tIN\t{tn}\t"
                rd = rrs.rd
                if type(rd) is tuple:
                    app(head + rd[1] + "\n")
                    rl = None
                else:
                    rl = sorted(rd.items())
                    app("".join([head + x + "\n" for _, x in rl]))
                if kind == OCCLUDED or (kind == DELEGATION and t != DS and t != NSEC):
                    continue
                # signed: the RRset in canonical form, then one RRSIG per key
                pre = owire + pack_tct(t, 1, ttl)
                if rl is None:
                    w = rd[0]
                    blob = pre + len(w).to_bytes(2, "big") + w
                else:
                    blob = b"".join([pre + len(w).to_bytes(2, "big") + w for w, _ in rl])
                exp = (end - rand(jitter + 1) if jitter else end) & 0xFFFFFFFF
                es = exps.get(exp)
                if es is None:
                    es = exps[exp] = _fmt_time(exp)
                nrrsets += 1
                if verbose >= 3:
                    print(f"{PROG}: {disp.rstrip('.') or '.'}/{tn}:", file=sys.stderr)
                sh = f"{disp}\t{ttl}\tIN\tRRSIG\t"
                mid = f" {labels} {ttl} {es} {incs} "
                sm = None
                if sampled:
                    sm = [disp, t, ttl, [x for _, x in rl] if rl is not None else [rd[1]], [], items]
                    samples.append(sm)
                for label, alg, tag, swire, ztext, ki in (keyset_meta if (t in KEYSET_TYPES and key == okey) else zone_meta):
                    j = len(items)
                    items.append((label, pack_hdr(t, alg, labels, ttl, exp, inception, tag) + swire + blob))
                    kid.append(ki)
                    rtext = f"{tn} {alg}{mid}{tag} {ztext} "
                    app((j, sh + rtext))
                    if sm is not None:
                        sm[4].append((j, rtext))
                    if verbose >= 3:
                        print(f"{PROG}:  signing with dnskey {keys[ki].name}", file=sys.stderr)
            if apex_parts is not None:
                app = tmpl.append
                for t in sorted(apex_parts, key=lambda t: (t != SOA, t)):
                    tmpl.extend(apex_parts[t])
            if len(items) >= BATCH:
                submit()
        if items or tmpl:
            submit()
        while inflight:
            finish()
        progress.update(nsigs, final=True)
        signer.shutdown()
        t_signed = time.monotonic()
        if fobj is not None:  # stays open, and so locked, until renamed into place
            fobj.flush()
            os.fsync(fobj.fileno())
            umask = os.umask(0o22)
            os.umask(umask)
            os.fchmod(fobj.fileno(), 0o666 & ~umask)
        verified = 0
        if verifier is not None:
            vcollect(0)
            verifier.shutdown()
            if bad:
                raise Fatal(f"post-sign verification failed: {len(bad)} signatures do not verify, first by dnskey '{bad_key[0].name}' (signature #{bad[0]})")
            verified = nsigs
            _check_sample(origin, dk, samples, inception)
            _report_keys(dk, keys, keyset_keys, zone_keys)
        if out == "-":
            sys.stdout.write(b"".join(stdout_parts).decode("latin-1"))
            sys.stdout.flush()
        else:
            os.replace(tmp, out)
            tmp = None
            try:
                dfd = os.open(os.path.dirname(os.path.abspath(out)), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass
            print(out)
    except BaseException:
        signer.shutdown(wait=True, cancel_futures=True)
        if verifier is not None:
            verifier.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if tmp is not None:  # removed while still locked, then closed
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if fobj is not None:
                with contextlib.suppress(OSError):
                    fobj.close()
        elif fobj is not None:
            fobj.close()
    t_end = time.monotonic()
    if args.stats:
        sign_t = max(t_signed - t_prep, 1e-9)
        print(f"RRsets signed:                    {nrrsets:10d}")
        print(f"{'NSEC3' if args.salt is not None else 'NSEC'} records:{'':{22 if args.salt is None else 21}}{nchain:10d}")
        print(f"Signatures generated:             {nsigs:10d}")
        print(f"Signatures retained:              {0:10d}")
        print(f"Signatures dropped:               {zone.dropped:10d}")
        print(f"Signatures successfully verified: {verified:10d}")
        print(f"Signatures unsuccessfully verified: {0:8d}")
        print(f"Signing time in seconds:          {sign_t:10.3f}")
        print(f"Signatures per second:            {nsigs / sign_t:10.3f}")
        print(f"Runtime in seconds:               {t_end - t0:10.3f}")
    return 0


_pubkeys: dict[tuple, object] = {}


def _verify_chunk(specs: list[tuple[int, int, bytes]], idx: bytes, datas: list[bytes], sigs: list[bytes]) -> list[int]:
    """Positions in the chunk whose signature does not verify; ``specs[idx[i]]`` is
    (algorithm, flags, public key) of the DNSKEY that made ``sigs[i]`` over ``datas[i]``.
    Runs in verifier processes (or threads for small zones)."""
    pubs = []
    for spec in specs:
        pub = _pubkeys.get(spec)
        if pub is None:
            alg, flags, key = spec
            dnskey = dns.rdata.from_wire(dns.rdataclass.IN, DNSKEY, struct.pack("!HBB", flags, 3, alg) + key, 0, 4 + len(key))
            pub = _pubkeys[spec] = zkeys.public_key(dnskey)
        pubs.append(pub.verify)
    bad = []
    for i, data in enumerate(datas):
        try:
            pubs[idx[i]](sigs[i], data)
        except (InvalidSignature, ValueError):
            bad.append(i)
    return bad


def _verifier_pool(nsigs_hint: int):
    """Processes for big zones (no GIL contention with signing), threads for small ones."""
    n = os.cpu_count() or 2
    if nsigs_hint < 20000:
        return ThreadPoolExecutor(n, thread_name_prefix="signzone-verify")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(n, mp_context=ctx)


def _check_sample(origin: dns.name.Name, dk: RRset, samples: list, inception: int) -> None:
    """Re-validate a sample of RRsets with dnspython from their presentation form.

    The fast verifier checks the token's signatures over the signing inputs this
    program built; this checks those inputs against an independent implementation
    of RFC 4034 canonical form: all apex RRsets, the first names and a random sample
    (``samples``: owner text, type, TTL, RDATA texts, RRSIG RDATA texts).
    """
    keyset = dns.rrset.from_text_list(origin, dk.ttl, "IN", "DNSKEY", [x for _, x in dk.items()])
    for disp, t, ttl, texts, rrsig_texts, _ in samples:
        name = dns.name.from_text(disp)
        rrset = dns.rrset.from_text_list(name, ttl, "IN", t, texts)
        rrsigs = dns.rrset.from_text_list(name, ttl, "IN", "RRSIG", rrsig_texts)
        for sig in rrsigs:
            try:
                dns.dnssec.validate_rrsig(rrset, sig, {origin: keyset}, now=inception + 1)
            except dns.dnssec.ValidationFailure as e:
                raise Fatal(
                    f"post-sign verification failed for {disp}/{dns.rdatatype.to_text(t)}: {e}"
                ) from None


def _report_keys(dk: RRset, keys, keyset_keys, zone_keys) -> None:
    algs = sorted({k.info.algorithm for k in keys})
    names = [dns.dnssec.algorithm_to_text(a) for a in algs]
    print(f"Verifying the zone using the following algorithms: {' '.join(names)}.", file=sys.stderr)
    print("Zone fully signed:", file=sys.stderr)
    present = [dns.rdata.from_wire(dns.rdataclass.IN, DNSKEY, w, 0, len(w)) for w, _ in dk.items()]
    for alg, name in zip(algs, names):
        active_k = {k.info.keytag for k in keyset_keys if k.info.algorithm == alg and k.info.flags & 1}
        active_z = {k.info.keytag for k in zone_keys if k.info.algorithm == alg and not k.info.flags & 1}
        sep = [r for r in present if r.algorithm == alg and r.flags & 1]
        zsk = [r for r in present if r.algorithm == alg and not r.flags & 1]
        rk = sum(1 for r in sep if r.flags & 0x80)
        rz = sum(1 for r in zsk if r.flags & 0x80)
        print(f"Algorithm: {name}: KSKs: {len(active_k)} active, {len(sep) - len(active_k) - rk} stand-by, {rk} revoked", file=sys.stderr)
        print(f"{'':{len(name) + 13}}ZSKs: {len(active_z)} active, {len(zsk) - len(active_z) - rz} stand-by, {rz} revoked", file=sys.stderr)
