"""Moving a software-custody token into a TPM 2.0 or an HSM: the file steps, crash-safe.

The quorum decision and the state change are :meth:`cryptobat.token.Token.custodymigrate`'s;
here are the steps around it, each one a function so the order is visible and a crash can
be tried between any two. A migration goes:

1. :func:`prepare_target`: the target custody's own files (``tpm2-master``, ``tpm2.json``,
   ``nvcounter.json`` / ``pkcs11.json``, ``pkcs11-pin``) written beside ``master.key``;
2. :func:`reseal`: every key imported into the target (same DNSKEY, same key tag, or nothing
   happens), every sealed value sealed again under it (in memory);
3. :func:`write_next`: ``custody.next.json`` names the target;
4. the state, re-sealed and MAC'd under the target's key, committed in one SQLite
   transaction (:meth:`cryptobat.store.Store.rekey`) — the point of no return;
5. :func:`finish`: ``custody.next.json`` renamed over ``custody.json``, then ``master.key``
   overwritten, fsynced and unlinked.

A kill at any instant leaves a token that opens: :func:`resume`, run before a token is
opened, sees ``custody.next.json`` and asks the store which key it is MAC'd under. Under the
software custody's: the migration never committed, the target's files are discarded. Under
the target's: steps 5 are finished. Never neither.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from . import keystore
from .audit import Head
from .custody import CONFIG_FILE, Custody, _construct, _custody_class, _read_kind, _write_kind, release
from .custody.envelope import fsync_dir
from .errors import Conflict, IntegrityError, InvalidArgument
from .state import TokenState, frozen
from .store import Store

NEXT_FILE = "custody.next.json"
MASTER = "master.key"
# the files each target custody writes in the home (see their modules); a migration that died
# before custody.next.json existed leaves some of them, removed before the next try
TARGET_FILES = {"tpm2": ("tpm2-master", "tpm2.json", "nvcounter.json"),
                "pkcs11": ("pkcs11.json", "pkcs11-pin")}
PEPPER_AAD = b"cryptobat passphrase pepper"


def check_direction(current: str, target: str) -> None:
    """Only out of software: a TPM's or an HSM's keys are non-exportable, so they cannot move on."""
    if current != "software":
        raise Conflict(f"this token's keys are in {current} custody and cannot leave it; "
                       f"only a software-custody token can be migrated")
    if target not in TARGET_FILES:
        raise InvalidArgument(f"a software token migrates to tpm2 or pkcs11 custody, not {target!r}")


def discard(home: Path, kind: str) -> None:
    """Remove a migration that did not commit: the target's files, then ``custody.next.json``.

    Objects the target made in its device (a TPM NV counter index, HSM key objects) are removed
    by the target's ``discard`` when the migration fails in this process; after a crash they stay
    there, and nothing refers to them any more."""
    for name in TARGET_FILES.get(kind, ()):
        (home / name).unlink(missing_ok=True)
    (home / NEXT_FILE).unlink(missing_ok=True)
    fsync_dir(home)


def prepare_target(home: Path, kind: str, config: dict) -> Custody:
    """Step 1: the target custody made in ``home`` (its files fsynced); leftovers of an earlier
    try that died before step 3 are removed first, as a new custody must not adopt them."""
    discard(home, kind)
    target = _construct(_custody_class(kind), kind, home, True, config)
    fsync_dir(home)
    return target


def _moved_key(rec, source: Custody, target: Custody):
    """One key record imported into ``target``: the record with its new blob. The DNSKEY (and so
    the key tag) must come out identical, or the zone's published chain would break."""
    info = rec.info
    aad = info.label.encode()
    der = source.unseal(bytes.fromhex(rec.blob), aad)
    private = serialization.load_der_private_key(der, password=None)
    public, blob = target.import_key(info.algorithm, private, aad)
    moved = keystore.make_info(info.label, info.zone, info.algorithm, info.role, public, info.compat, info.p11_id)
    if public != info.public_key or moved.keytag != info.keytag:
        raise IntegrityError(f"key {info.label!r} came out of {target.name} custody with another DNSKEY "
                             f"(tag {moved.keytag}, was {info.keytag}); migration aborted, nothing changed")
    return dataclasses.replace(rec, blob=blob.hex())


def reseal(state: TokenState, source: Custody, target: Custody,
           pepper: bytes) -> tuple[TokenState, list[dict]]:
    """Step 2: ``state`` with every key and sealed value under ``target``; the keys moved (label, tag).

    The pepper is kept (sealed in the state), not re-derived from the target's MAC key: the
    officers' passphrases and the signer PIN are hashed with it and must still check."""
    keys, moved = {}, []
    for label, rec in state.keys.items():
        keys[label] = _moved_key(rec, source, target)
        moved.append({"label": label, "keytag": rec.info.keytag})
    officers = {}
    for name, o in state.officers.items():
        aad = b"officer:" + name.encode()
        secret = target.seal(source.unseal(bytes.fromhex(o.secret), aad), aad)
        officers[name] = dataclasses.replace(o, secret=secret.hex())
    new = state.replace(keys=frozen(keys), officers=frozen(officers),
                        pepper=target.seal(pepper, PEPPER_AAD).hex())
    return new, moved


def write_next(home: Path, kind: str) -> None:
    """Step 3: ``custody.next.json`` (whole, fsynced): from here an open checks which custody
    the store is under."""
    _write_kind(home, kind, NEXT_FILE)


def destroy_master(home: Path) -> None:
    """The software master key overwritten, fsynced and unlinked: the software copies of the
    keys (still in old WAL frames or backups) are unreadable without it."""
    path = home / MASTER
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        os.pwrite(fd, b"\0" * max(os.fstat(fd).st_size, 32), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)
    fsync_dir(home)


def finish(home: Path) -> None:
    """Step 5: the target becomes the custody of record, then the software master key goes."""
    if (home / NEXT_FILE).exists():
        os.replace(home / NEXT_FILE, home / CONFIG_FILE)
        fsync_dir(home)
    destroy_master(home)


def _next_kind(home: Path) -> str:
    try:
        kind = json.loads((home / NEXT_FILE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError) as e:
        raise IntegrityError(f"cannot read {home / NEXT_FILE}: {e}") from None
    if kind not in TARGET_FILES:
        raise IntegrityError(f"{home / NEXT_FILE} names no custody a token migrates to ({kind!r})")
    return kind


def _store_under(home: Path, custody: Custody, old_mac: bytes | None = None) -> bool:
    """Whether the store is MAC'd under ``custody``'s key (its key check value, then the MAC).

    With ``old_mac`` (the software custody's, its master.key still there) the commit marker the
    software custody wrote is moved to the store's head under the new key, provided it is not
    ahead of that head: a marker that says changes were lost, or one not written by that key (a
    ``custody.next.json`` planted on a token migrated long ago), is left for the lost-commit
    check at open to refuse."""
    try:
        store = Store(home, custody.mac_key())
    except IntegrityError:
        return False  # the key check value is another key's
    try:
        state = store.load()
        if state is not None and old_mac is not None:
            head = Head(state.audit.seq, state.audit.hash)
            before = store.marker_under(old_mac)
            if before is not None and before.seq <= head.seq:
                store.mark(head)
        return state is not None
    except IntegrityError:
        return False
    finally:
        store.close()


def resume(home: Path) -> str | None:
    """Finish or undo a migration a crash interrupted; what was done (None: there was none).

    Run before a token is opened (the store's lock is taken and released here)."""
    home = Path(home)
    if not (home / NEXT_FILE).exists():
        if (home / MASTER).exists() and (home / CONFIG_FILE).exists() and _read_kind(home) != "software":
            destroy_master(home)  # killed between the rename and the destruction
            return "an interrupted migration had not destroyed master.key: destroyed"
        return None
    kind = _next_kind(home)
    old_mac = None
    if _read_kind(home) == "software" and (home / MASTER).exists():
        source = _construct(_custody_class("software"), "software", home, False, None)
        if _store_under(home, source):
            discard(home, kind)
            return f"an interrupted migration to {kind} custody had not committed: discarded"
        old_mac = source.mac_key()
    target = _construct(_custody_class(kind), kind, home, False, None)
    try:
        if not _store_under(home, target, old_mac):
            raise IntegrityError(f"state.db verifies under neither the software custody nor the {kind} custody "
                                 f"{NEXT_FILE} names; restore the token's files")
    finally:
        release(target, "close")
    finish(home)
    return f"an interrupted migration to {kind} custody had committed: finished"


__all__ = ["NEXT_FILE", "check_direction", "destroy_master", "discard", "finish", "prepare_target",
           "reseal", "resume", "write_next"]

