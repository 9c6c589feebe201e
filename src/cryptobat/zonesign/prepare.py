"""The zone made ready to sign: read, new SOA serial, DNSKEY RRset, delegations, NSEC3 chain.

Everything here happens before the first signing input exists; what the walk needs
afterwards travels in one :class:`Prepared` record.
"""
from __future__ import annotations

import contextlib
import gc
import threading
import time
import weakref

import dns.name
import dns.rdata
import dns.rdataclass

from ..policy import serial_gt
from . import reader
from .chain import add_nsec3
from .keys import SignKey
from .reader import DELEGATION, DNAME, DNSKEY, NS, OCCLUDED, SOA, Node, RRset


class ChainSpec:
    """NSEC, or NSEC3 with its parameters (``salt`` None for NSEC).

    This and the other records of the signer are plain classes: a dataclass costs about a
    millisecond to make at import, and a small zone's whole run is a few tens of them."""

    __slots__ = ("salt", "iterations", "optout")

    def __init__(self, salt: bytes | None, iterations: int = 0, optout: bool = False) -> None:
        self.salt, self.iterations, self.optout = salt, iterations, optout

    @property
    def nsec(self) -> bool:
        return self.salt is None


class Prepared:
    """A zone ready for the signing walk."""

    __slots__ = ("zone", "order", "auth", "dnskeys", "neg_ttl", "nchain", "chain", "__weakref__")

    def __init__(self, zone: reader.Zone, order: list[tuple], auth: list[tuple], dnskeys: RRset, neg_ttl: int,
                 nchain: int, chain: ChainSpec) -> None:
        self.zone = zone
        self.order = order  # every name in canonical order (NSEC3 owners included)
        self.auth = auth  # the names that are signed (not occluded): the NSEC chain's names
        self.dnskeys = dnskeys  # the apex DNSKEY RRset, the signing keys added
        self.neg_ttl = neg_ttl  # NSEC/NSEC3 TTL (RFC 9077)
        self.nchain = nchain  # NSEC or NSEC3 records
        self.chain = chain


def new_serial(old: int, method: str, now: int) -> int:
    """The SOA serial for ``-N``: never equal to or behind ``old`` in serial arithmetic (except keep)."""
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
            if NS in node:
                node.kind = DELEGATION
                cut = key
            elif DNAME in node:
                cut = key


def _set_serial(zone: reader.Zone, method: str, now: int):
    """Apply ``-N`` to the SOA; return the SOA RDATA (dnspython), new serial in place."""
    soa_rrs = zone.apex[SOA]
    (_, soa_text), = soa_rrs.rdatas.items()
    origin = zone.origin
    soa = dns.rdata.from_text(dns.rdataclass.IN, SOA, soa_text, origin=origin, relativize=False)
    serial = new_serial(soa.serial, method, now)
    if serial != soa.serial:
        soa = soa.replace(serial=serial)
        soa_rrs.rdatas = {soa.to_digestable(origin): soa.to_text()}
    return soa


def _add_dnskeys(zone: reader.Zone, keys: list[SignKey], ttl: int) -> RRset:
    """The DNSKEY RRset: the zone's own plus every signing key (TTL ``ttl`` if the zone has none)."""
    apex = zone.apex
    dk = apex.get(DNSKEY)
    if dk is None:
        dk = apex.put(DNSKEY, RRset(ttl))
    for k in keys:
        rd = k.info.dnskey()
        dk.add(rd.to_digestable(), rd.to_text())
    return dk


def prepare(zonefile: str, origin: dns.name.Name, chain: ChainSpec, keys: list[SignKey],
            serial_method: str, now: int) -> Prepared:
    """Read ``zonefile`` and complete it with everything but the signatures and NSEC records.

    The zone is built without the cycle collector and then frozen until the Prepared record
    goes: it is a million small objects and not one reference cycle, and each full collection
    would walk all of them (30% of the read's CPU at 100k names, and again during the walk).
    Frozen objects are still freed by reference counting; unfreezing when the zone goes lets
    the collector see anything else frozen with it (a run of many zones).
    """
    with _no_cycle_collector():
        prep = _prepare(zonefile, origin, chain, keys, serial_method, now)
        gc.freeze()
    weakref.finalize(prep, gc.unfreeze)
    return prep


_gc_lock = threading.Lock()
_gc_users = 0  # zones being read now (a run of many zones reads several at once, in threads)
_gc_was_enabled = True


@contextlib.contextmanager
def _no_cycle_collector():
    """The collector off while any zone is being read, and back as it was when the last is done:
    it is one switch for the process, which the threads of a many-zones run share."""
    global _gc_users, _gc_was_enabled
    with _gc_lock:
        if _gc_users == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0 and _gc_was_enabled:
                gc.enable()


def _prepare(zonefile: str, origin: dns.name.Name, chain: ChainSpec, keys: list[SignKey],
             serial_method: str, now: int) -> Prepared:
    zone = reader.read_zone(zonefile, origin)
    soa = _set_serial(zone, serial_method, now)
    neg_ttl = min(zone.apex[SOA].ttl, soa.minimum)  # RFC 9077
    dk = _add_dnskeys(zone, keys, soa.minimum)
    nodes = zone.nodes
    order = sorted(nodes)
    classify(order, nodes, zone.origin_key)
    nchain = 0
    if not chain.nsec:
        nchain = add_nsec3(zone, order, neg_ttl, chain.salt, chain.iterations, chain.optout)
        order = sorted(nodes)
    auth = [k for k in order if nodes[k].kind != OCCLUDED]
    if chain.nsec:
        nchain = len(auth)
    return Prepared(zone, order, auth, dk, neg_ttl, nchain, chain)
