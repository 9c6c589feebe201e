"""Which token keys sign, and what each signs, from the key files named and the keys' token roles."""
from __future__ import annotations

import dns.exception

from .. import algorithms
from ..api import KeyInfo
from . import keys as zkeys
from .fatal import Fatal

SEP_ROLES = ("ksk", "csk")  # token roles whose keys sign DNSKEY, CDS and CDNSKEY


def select_keys(args, token_keys: list[KeyInfo], origin: str) -> list[zkeys.SignKey]:
    """The keys of ``-k`` and the ZSK files, then (``-S`` or none named) the zone's keys in the token."""
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


def key_roles(keys: list[zkeys.SignKey]) -> tuple[tuple[zkeys.SignKey, ...], tuple[zkeys.SignKey, ...]]:
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
    row = algorithms.TABLE.get(alg)
    return f"{row.mnemonic} ({alg})" if row else str(alg)
