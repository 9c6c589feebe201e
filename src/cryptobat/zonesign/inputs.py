"""The signing walk: the zone in canonical order as batches of RFC 4034 §3.1.8.1 signing inputs.

Like dnspython's ``sign_zone`` (the walk) and ``_sign_zone_nsec`` (the chain), but the
RRSIGs are not made here: each RRset becomes its zone text plus, per key, the RRSIG
RDATA without its signature (packed with :mod:`struct`, the hot path) followed by the
RRs in canonical form and order.  NSEC records are made one name ahead as the walk goes.
"""
from __future__ import annotations

import random
import struct
import sys
import time
from collections.abc import Iterator
from operator import itemgetter
from typing import NamedTuple

import dns.rdatatype

from .batch import Batch, Sample
from .chain import DS, TypeMaps, chain_types, lower_text
from .fatal import PROG
from .keys import SignKey
from .prepare import Prepared
from .reader import DELEGATION, DNSKEY, NSEC, OCCLUDED, RRSIG, SOA, Node, RRset, key_wire

CDS, CDNSKEY = 59, 60
KEYSET_TYPES = frozenset((DNSKEY, CDS, CDNSKEY))  # signed by the KSKs and CSKs only
BATCH = 8192  # signing inputs per timed_sign call
_first = itemgetter(0)

_pack_hdr = struct.Struct("!HBBIIIH").pack  # RRSIG RDATA up to the signer's name
_pack_tct = struct.Struct("!HHI").pack  # type, class, TTL of an RR in the signing input


class Signer(NamedTuple):
    """A key as the walk uses it."""

    label: str  # token label
    algorithm: int
    keytag: int
    signer_wire: bytes
    zone_text: str  # the RRSIG signer's name field
    index: int  # in the run's key list
    name: str  # zone/ALG/tag, for messages


class Validity:
    """The signatures' validity (a plain class: a dataclass costs about a millisecond at import,
    a small zone's run a few tens of them)."""

    __slots__ = ("start", "end", "jitter")

    def __init__(self, start: int, end: int, jitter: int) -> None:
        self.start, self.end = start, end
        self.jitter = jitter  # expirations are drawn from (end - jitter, end]

    @property
    def inception(self) -> int:
        return self.start & 0xFFFFFFFF


class Plan:
    """Who signs what, when, and what else the walk does."""

    __slots__ = ("keyset", "others", "validity", "sample_keys", "verbose")

    def __init__(self, keyset: list[Signer], others: list[Signer], validity: Validity, sample_keys: set,
                 verbose: int) -> None:
        self.keyset = keyset  # signers of the apex DNSKEY, CDS and CDNSKEY
        self.others = others  # signers of everything else
        self.validity = validity
        self.sample_keys = sample_keys  # names whose RRsets are kept as samples
        self.verbose = verbose


def make_plan(keys: list[SignKey], roles: tuple, validity: Validity, sample_keys: set, verbose: int) -> Plan:
    """The plan for ``keys`` split by ``roles`` (keys of the key sets, keys of the rest)."""
    index = {id(k): i for i, k in enumerate(keys)}

    def signer(k: SignKey) -> Signer:
        i = k.info
        return Signer(i.label, i.algorithm, i.keytag, k.signer_wire, i.zone, index[id(k)], k.name)

    return Plan([signer(k) for k in roles[0]], [signer(k) for k in roles[1]], validity, sample_keys, verbose)


def signature_count(prep: Prepared, plan: Plan) -> int:
    """How many signatures the walk asks for (for the progress line)."""
    nodes = prep.zone.nodes
    okey = prep.zone.origin_key
    return len(prep.auth) * len(plan.others) + sum(
        len(plan.keyset if (t in KEYSET_TYPES and k == okey) else plan.others)
        for k in prep.auth for t in nodes[k].types()
        if nodes[k].kind != DELEGATION or t == DS)


def _fmt_time(t: int) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(t))


class SigningInputs:
    """Iterate for the batches; afterwards ``nrrsets`` and ``samples`` describe the run.

    The walk keeps the name being walked in attributes (its wire form, RRSIG labels
    field, whether it is the apex or sampled) rather than passing a record per RRset:
    this is the hot path, once per RRset of the zone.
    """

    def __init__(self, prep: Prepared, plan: Plan) -> None:
        self._prep, self._plan = prep, plan
        self._nodes = prep.zone.nodes
        self._okey = prep.zone.origin_key
        self._nsec = prep.chain.nsec
        self._next = 0  # position in prep.auth of the name whose NSEC comes next
        self._carry: tuple = (None, b"")  # (name key, wire) of the last NSEC's next name
        self._maps = TypeMaps()
        self._tnames: dict[int, str] = {}
        self._exps: dict[int, str] = {}
        v = plan.validity
        self._inception, self._incs = v.inception, _fmt_time(v.inception)
        self._fixed_exp = None if v.jitter else (v.end & 0xFFFFFFFF, _fmt_time(v.end & 0xFFFFFFFF))
        self._rand = random.SystemRandom().randrange
        self._keyset, self._others, self._verbose = plan.keyset, plan.others, plan.verbose
        # the name being walked
        self._wire, self._disp, self._labels, self._apex, self._sampled = b"", "", 0, False, False
        self.nrrsets = 0
        self.samples: list[Sample] = []

    def __iter__(self) -> Iterator[Batch]:
        batch = Batch(0)
        for key in self._prep.order:
            self._node(batch, key)
            if len(batch.items) >= BATCH:
                yield batch
                batch = Batch(batch.first + len(batch.items))
        if batch.items or batch.text:
            yield batch

    def _node(self, batch: Batch, key: tuple) -> None:
        node = self._nodes[key]
        pairs = node.by_type()
        if node.kind == OCCLUDED:
            self._wire = b""
        else:
            carry_key, carry_wire = self._carry
            self._wire = carry_wire if key == carry_key else key_wire(key)
            if self._nsec:
                pairs.append((NSEC, self._make_nsec(node)))
                pairs.sort(key=_first)
        self._disp = node.disp
        self._labels = len(key) - (1 if key and key[-1] == "*" else 0)
        self._sampled = key in self._plan.sample_keys
        apex = self._apex = key == self._okey
        if not apex:
            app = batch.text.append
            for t, rrs in pairs:
                self._rrset(batch, app, node, t, rrs)
            return
        # the key RRsets are signed first, as dnssec-signzone does; SOA is written first
        parts: dict[int, list] = {}
        for t, rrs in sorted(pairs, key=lambda p: (p[0] not in KEYSET_TYPES, p[0])):
            self._rrset(batch, parts.setdefault(t, []).append, node, t, rrs)
        for t in sorted(parts, key=lambda t: (t != SOA, t)):
            batch.text.extend(parts[t])

    def _make_nsec(self, node: Node) -> RRset:
        """The NSEC of ``node``, pointing at the next signed name (the apex after the last)."""
        auth = self._prep.auth
        self._next += 1
        nkey = auth[self._next] if self._next < len(auth) else auth[0]
        nwire = key_wire(nkey)
        self._carry = (nkey, nwire)
        bw, bt = self._maps.get(chain_types(node) + [RRSIG, NSEC])
        nsec = RRset(self._prep.neg_ttl)
        nsec.add(nwire + bw, f"{lower_text(self._nodes[nkey])} {bt}")
        return nsec

    def _type_name(self, t: int) -> str:
        tn = self._tnames[t] = dns.rdatatype.to_text(t)
        return tn

    def _expiration(self) -> tuple[int, str]:
        v = self._plan.validity
        exp = (v.end - self._rand(v.jitter + 1)) & 0xFFFFFFFF
        es = self._exps.get(exp)
        if es is None:
            es = self._exps[exp] = _fmt_time(exp)
        return exp, es

    def _rrset(self, batch: Batch, app, node: Node, t: int, rrs: RRset) -> None:
        """Write the RRset's text; unless occluded or unsigned delegation data, add its signing inputs."""
        ttl = rrs.ttl
        tn = self._tnames.get(t) or self._type_name(t)
        disp = self._disp
        head = f"{disp}\t{ttl}\tIN\t{tn}\t"
        rd = rrs.rd
        if type(rd) is bytes:
            app(head + rrs.text + "\n")
            rl = None
        else:
            rl = sorted(rd.items())
            app("".join([head + x + "\n" for _, x in rl]))
        kind = node.kind
        if kind == OCCLUDED or (kind == DELEGATION and t != DS and t != NSEC):
            return
        pre = self._wire + _pack_tct(t, 1, ttl)
        if rl is None:
            blob = pre + len(rd).to_bytes(2, "big") + rd
        else:
            blob = b"".join([pre + len(w).to_bytes(2, "big") + w for w, _ in rl])
        exp, es = self._fixed_exp or self._expiration()
        self.nrrsets += 1
        verbose = self._verbose
        if verbose >= 3:
            print(f"{PROG}: {disp.rstrip('.') or '.'}/{tn}:", file=sys.stderr)
        sm = None
        if self._sampled:
            sm = Sample(disp, t, ttl, [x for _, x in rl] if rl is not None else [rrs.text])
            batch.samples.append(sm)
            self.samples.append(sm)
        inception, labels = self._inception, self._labels
        sh = f"{disp}\t{ttl}\tIN\tRRSIG\t"
        mid = f" {labels} {ttl} {es} {self._incs} "
        items, kid = batch.items, batch.key_index
        for label, alg, tag, swire, ztext, ki, name in (self._keyset if (t in KEYSET_TYPES and self._apex) else self._others):
            j = len(items)
            items.append((label, _pack_hdr(t, alg, labels, ttl, exp, inception, tag) + swire + blob))
            kid.append(ki)
            rtext = f"{tn} {alg}{mid}{tag} {ztext} "
            app((j, sh + rtext))
            if sm is not None:
                sm.rrsig_parts.append((j, rtext))
            if verbose >= 3:
                print(f"{PROG}:  signing with dnskey {name}", file=sys.stderr)
