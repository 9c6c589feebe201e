"""``cryptobat signzone``: dnssec-signzone's command line, signing through the token.

The run is a sequence of steps, each in :mod:`cryptobat.zonesign`, as dnspython's
``sign_zone`` and Knot's ``zone-sign.c`` separate the zone walk, the chain and the
signer:

1. :mod:`~.zonesign.prepare` reads the zone and completes it with the new SOA serial,
   the DNSKEY RRset and (NSEC3) the chain;
2. :mod:`~.zonesign.inputs` walks it in canonical order, making the NSEC chain and,
   per RRset and key, one RFC 4034 §3.1.8.1 signing input: the RRSIG RDATA without its
   signature, then the RRs in canonical form and order;
3. :mod:`~.zonesign.pipeline` sends those to the token in large batches
   (``Client.timed_sign``) from a worker thread while the walk goes on; the token
   checks each against its policy and a refusal ends the run with BIND's message and
   no output file;
4. as each batch comes back its text goes to :mod:`~.zonesign.output` (a locked
   temporary file, fsynced and renamed into place) and, unless ``-P``, its signatures to
   :mod:`~.zonesign.verify` (a pool overlapping signing; a sample of RRsets is then
   re-validated by dnspython from the presentation form);
5. :mod:`~.zonesign.stats` prints the progress line and ``-t`` statistics.

:func:`sign_zone` is one zone's run on a client already open; ``--zones``
(:mod:`~.zonesign.fleet`) makes one such run per zone of a list with the token opened once.

What a key signs follows its role in the token, as the policy demands
(:func:`~.zonesign.roles.key_roles`): the apex DNSKEY, CDS and CDNSKEY only KSKs and
CSKs, as with ``dnssec-signzone -x``; everything else the ZSKs, or CSKs where there is none.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import dns.exception
import dns.name

from .api import KeyInfo
from .errors import CryptobatError
from .policy import SKEW
from .signing import PARALLEL_MIN
from .timespec import parse_time
from .zonesign import inputs
from .zonesign.batch import Batch, complete_samples, render
from .zonesign.chain import nsec3_hasher  # noqa: F401  (re-exported: signzone's interface before the split)
from .zonesign.fatal import PROG, Fatal
from .zonesign.keys import SignKey
from .zonesign.output import Output
from .zonesign.pipeline import Pipeline
from .zonesign.prepare import ChainSpec, Prepared, new_serial, prepare  # noqa: F401  (new_serial re-exported)
from .zonesign.reader import ZoneError
from .zonesign.roles import key_roles, select_keys
from .zonesign.stats import Progress, Stats, print_stats

if TYPE_CHECKING:  # a run with -P never verifies: concurrent.futures and the verifier are imported when used
    from concurrent.futures import Executor
    from .zonesign import verify


def _parser(cls: type[argparse.ArgumentParser] = argparse.ArgumentParser, zones: bool = False) -> argparse.ArgumentParser:
    """dnssec-signzone's command line; ``cls`` lets ``--zones`` parse its list file's lines with it.

    With ``zones`` it is the command line of a run over many zones: ``--zones`` and
    ``--outdir`` instead of a zone file and its keys, and ``-v`` without a level."""
    p = cls(prog=PROG, description="Sign a zone with keys held by the Cryptobat token.")
    if zones:
        p.add_argument("--zones", required=True, metavar="LIST",
                       help="sign many zones: a directory of zone files, or a list file of zones and their options")
        p.add_argument("--outdir", metavar="DIR", help="write each ZONEFILE.signed here (default: beside it)")
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
    if zones:
        p.add_argument("-v", dest="verbose", type=int, nargs="?", const=1, default=0, help="one line per zone")
    else:
        p.add_argument("-v", dest="verbose", type=int, default=0, help="verbosity level")
    p.add_argument("-t", dest="stats", action="store_true", help="print statistics")
    p.add_argument("-n", dest="nthreads", type=int, help="ignored: the token parallelises signing itself")
    p.add_argument("-a", dest="verify_all", action="store_true", help="ignored: signatures are always verified unless -P")
    p.add_argument("--hsm", help="token to use, e.g. unix:/path/native.sock (default $CRYPTOBAT_HSM or the embedded token)")
    p.add_argument("--pin-file", metavar="FILE",
                   help="signer PIN for --hsm, first line of FILE (default $CRYPTOBAT_PIN)")
    p.add_argument("--home", help="home directory of the embedded token")
    if not zones:
        p.add_argument("zonefile")
        p.add_argument("zsk", nargs="*", help="zone signing key files")
    return p


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


def main(argv: list[str] | None = None, client=None) -> int:
    """Run the signer; ``client`` is the token to use (default: ``cryptobat.client.connect``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--zones" or a.startswith("--zones=") for a in argv):
        from .zonesign import fleet

        return fleet.main(argv, client)
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


class _Job:
    """What the command line and the token decided before the zone is read (a plain class, as
    the records of :mod:`.zonesign` are: a dataclass costs about a millisecond at import)."""

    __slots__ = ("origin", "chain", "keys", "roles", "now", "validity", "verifier", "warmer", "stats", "quiet")

    def __init__(self, origin: dns.name.Name, chain: ChainSpec, keys: list[SignKey], roles: tuple, now: int,
                 validity: inputs.Validity, verifier: Executor | None, warmer: threading.Thread | None,
                 stats: Stats, quiet: bool) -> None:
        self.origin, self.chain, self.keys = origin, chain, keys
        self.roles = roles  # (keys signing the key sets, keys signing the rest)
        self.now, self.validity = now, validity
        self.verifier = verifier  # None with -P
        self.warmer = warmer  # None for one of many zones
        self.stats = stats
        self.quiet = quiet  # one of many zones: no progress line, no key report


def _origin(args) -> dns.name.Name:
    try:
        return dns.name.from_text(args.origin or os.path.basename(args.zonefile))
    except dns.exception.DNSException as e:
        raise Fatal(f"bad origin: {e}") from None


def _chain(args) -> ChainSpec:
    if args.salt is None:
        if args.optout:
            raise Fatal("-A requires -3")
        return ChainSpec(None)
    try:
        salt = b"" if args.salt == "-" else bytes.fromhex(args.salt)
    except ValueError:
        raise Fatal(f"bad NSEC3 salt {args.salt!r}") from None
    if len(salt) > 255 or not 0 <= args.iterations <= 65535:
        raise Fatal("bad NSEC3 salt or iterations")
    return ChainSpec(salt, args.iterations, args.optout)


def _validity(args, now: int) -> inputs.Validity:
    try:
        start = parse_time(args.start, now, now) if args.start else now - 3600
        end = parse_time(args.end, start, now) if args.end else start + 30 * 86400
    except CryptobatError as e:  # the zone's options, not the token: Fatal (one zone's failure with --zones)
        raise Fatal(str(e)) from None
    if end <= start:
        raise Fatal("start time is not before end time")
    if args.jitter < 0 or args.jitter >= end - start:
        raise Fatal("jitter must be between 0 and the validity period")
    return inputs.Validity(start, end, args.jitter)


def _run(args, client) -> int:
    stats = sign_zone(args, client)
    if args.stats:
        print_stats(stats)
    return 0


class Shared:
    """What a run over many zones (``--zones``) does once for all of them instead of per zone."""

    __slots__ = ("keys_of", "verifier")

    def __init__(self, keys_of: Callable[[str], list[KeyInfo]], verifier: Executor | None) -> None:
        self.keys_of = keys_of  # the token's keys of a zone (lower-case origin), read once
        self.verifier = verifier  # the verification pool every small zone uses (never shut down by one)


def sign_zone(args, client, shared: Shared | None = None) -> Stats:
    """Sign the zone ``args`` (dnssec-signzone's options, parsed) names with the open ``client``.

    Alone (``shared`` None) the run starts the token's workers and a verifier pool of its
    own and reports the keys as dnssec-signzone does; one of many takes them from
    ``shared`` and reports nothing but its output file's name."""
    stats = Stats(time.monotonic())
    origin = _origin(args)
    chain = _chain(args)
    token_keys = client.keys() if shared is None else shared.keys_of(origin.to_text().lower())
    now = int(client.time())
    keys = select_keys(args, token_keys, origin.to_text().lower())
    roles = key_roles(keys)
    validity = _validity(args, now)

    warmer = None
    if shared is not None:
        verifier = None if args.noverify else shared.verifier
    else:
        # start the token's signing workers and the verifier processes while the zone is read
        try:
            size_hint = os.path.getsize(args.zonefile) // 12
        except OSError:
            size_hint = 0
        verifier = None
        if not args.noverify:
            from .zonesign import verify

            verifier = verify.verifier_pool(size_hint)
        if size_hint >= PARALLEL_MIN:  # a smaller zone starts nothing: it signs and verifies in place
            warmer = threading.Thread(target=_warm, args=(client, verifier, size_hint), daemon=True)
            warmer.start()
    job = _Job(origin, chain, keys, roles, now, validity, verifier, warmer, stats, shared is not None)
    try:
        return _sign(args, client, job)
    except BaseException:
        if warmer is not None:
            warmer.join()
        if verifier is not None and shared is None:
            verifier.shutdown(wait=True, cancel_futures=True)
        raise


def _warm(client, verifier: Executor | None, size_hint: int) -> None:
    """Start the token's workers (if the client can, and the zone is large enough to use them)
    and the verifier pool ahead of the first batch."""
    warm = getattr(client, "warm", None)
    if warm:
        warm(size_hint)
    if verifier is not None:
        from .zonesign import verify

        verify.warm_pool(verifier)


class _Delivery:
    """Where a signed batch goes: its text to the output, its signatures to the verifier."""

    def __init__(self, output: Output, verifier: verify.Verifier | None, progress: Progress) -> None:
        self.output, self.verifier, self.progress = output, verifier, progress
        self.nsigs = 0

    def __call__(self, batch: Batch, sigs: list[bytes]) -> None:
        self.output.write(render(batch, sigs))
        complete_samples(batch, sigs)
        if self.verifier is not None:
            self.verifier.submit(batch, sigs)
        self.nsigs += len(sigs)
        self.progress.update(self.nsigs)


def _progress(prep: Prepared, plan: inputs.Plan, quiet: bool) -> Progress:
    if not quiet and sys.stderr.isatty() and len(prep.auth) >= 10000:
        return Progress(inputs.signature_count(prep, plan), True)
    return Progress(0, False)


FLEET_SAMPLE = 4  # names per zone re-validated by dnspython in a run over many zones


def _sample_names(auth: list[tuple], many: bool) -> set:
    from .zonesign import verify

    """The names whose RRsets dnspython re-validates. One zone of many gets its apex and a few
    random names: every signature is still verified, and the run as a whole samples thousands
    of RRsets, where a zone's full sample would cost more than signing it (a 50-name zone: 32 names)."""
    if not many or not auth:
        return verify.sample_names(auth)
    return {auth[0], *random.sample(auth, min(FLEET_SAMPLE - 1, len(auth)))}


def _sign(args, client, job: _Job) -> Stats:
    prep = prepare(args.zonefile, job.origin, job.chain, job.keys, args.serial, job.now)
    stats = job.stats
    stats.t_prep = time.monotonic()
    samples = set() if args.noverify else _sample_names(prep.auth, job.quiet)
    plan = inputs.make_plan(job.keys, job.roles, job.validity, samples, args.verbose)
    if job.warmer is not None:
        job.warmer.join()  # the worker pool exists before the first batch (no second pool from a race)
    output = Output(args.output or args.zonefile + ".signed", clean=not job.quiet)
    checker = None
    if job.verifier is not None:
        from .zonesign import verify

        checker = verify.Verifier(job.verifier, job.keys)
    delivery = _Delivery(output, checker, _progress(prep, plan, job.quiet))
    # a zone that fits in a batch or two is signed in this thread: a signing thread (and
    # concurrent.futures) would cost more than the overlap it buys
    pipeline = Pipeline(client, job.keys, delivery, threaded=len(prep.order) > inputs.BATCH // 4)
    walk = inputs.SigningInputs(prep, plan)
    try:
        for batch in walk:
            pipeline.submit(batch)
        pipeline.drain()
        delivery.progress.update(delivery.nsigs, final=True)
        stats.t_signed = time.monotonic()
        output.sync()
        if checker is not None:
            checker.finish()
            stats.verified = delivery.nsigs
            verify.check_sample(job.origin, prep.dnskeys, walk.samples, job.validity.inception)
            if not job.quiet:
                verify.report_keys(prep.dnskeys, job.keys, *job.roles)
        output.commit()
    except BaseException:
        pipeline.abort()
        if checker is not None:
            checker.abort()
        raise
    finally:
        output.close()
    stats.t_end = time.monotonic()
    stats.nrrsets, stats.nchain, stats.nsigs = walk.nrrsets, prep.nchain, delivery.nsigs
    stats.nsec3, stats.dropped = not prep.chain.nsec, prep.zone.dropped
    return stats
