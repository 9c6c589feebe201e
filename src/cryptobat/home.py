"""Where a token lives, and opening it: the directory, its custody and store, the start-up checks.

Everything that touches the file system before a token can serve is here, so that
:class:`cryptobat.token.Token` only takes opened values (a store, a custody, the
state they hold, clock sources) and returns results.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Callable, Iterator

from . import audit as auditlog
from . import rollback
from .audit import Head
from .clock import _boottime
from .custody import Custody, RollbackCounter, open_custody, release, spec_from_env
from .errors import Conflict, IntegrityError, InvalidArgument, NotFound
from .state import TokenState
from .store import Store


def resolve_home(home: str | Path | None = None) -> Path:
    """``--home``, else ``$CRYPTOBAT_HOME``, else a per-user default."""
    if home:
        return Path(home).expanduser()
    env = os.environ.get("CRYPTOBAT_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "cryptobat"


def _private_home(home: Path, create: bool) -> None:
    """Home 0700 and every file in it 0600, whatever the umask or an existing directory's mode."""
    if create:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = home.stat()
    except FileNotFoundError:
        raise NotFound(f"no token at {home} (run: cryptobat init)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{home} is not a directory")
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(home, 0o700)


def _open_files(home: Path, custody_factory: Callable[..., Custody], create: bool) -> tuple[Custody, Store]:
    _private_home(home, create)
    old_umask = os.umask(0o077)
    try:
        custody = custody_factory(home, create=True) if create else custody_factory(home)
        try:
            return custody, Store(home, custody.mac_key(), create=create)
        except BaseException:
            release(custody, "discard" if create else "close", "close")
            raise
    finally:
        os.umask(old_umask)


def _counter(custody: Custody) -> RollbackCounter | None:
    """The custody's rollback counter, if it has one (the software custody has none)."""
    counter = getattr(custody, "counter", None)
    return counter() if counter is not None else None


def _check_rollback(counter: RollbackCounter, stored: int, hold: bool) -> tuple[str | None, str | None]:
    """The store's counter value against the device's: (held reason, repair note).

    A store one ahead (its last change committed, the increment lost) is repaired here; one
    behind or further ahead is refused, or with ``hold`` opened held for the officers' decision."""
    try:
        device = counter.read()
    except IntegrityError as e:  # no counter to compare with (undefined, replaced, TPM cleared)
        if not hold:
            raise
        return str(e), None
    verdict = rollback.decide(stored, device)
    if verdict.action == "repair":
        counter.increment()
        return None, verdict.message
    if verdict.action == "refuse":
        if not hold:
            raise IntegrityError(verdict.message)
        return verdict.message, None
    return None, None


def _verify_audit_since(store: Store, state: TokenState) -> TokenState:
    """Check the audit chain from the head verified at the last start up to the current head;
    the state to serve, with that head as the one verified (saved with the next change)."""
    checked = Head(state.audit_checked.seq, state.audit_checked.hash)
    n, problem = auditlog.verify(store.audit_rows(checked.seq), Head(state.audit.seq, state.audit.hash), checked)
    if problem:
        raise IntegrityError(f"audit log is broken ({problem}); not serving. "
                             f"Inspect it with: cryptobat audit verify")
    return state.replace(audit_checked=state.audit)


def open_token(home: Path | str, custody_factory: Callable[..., Custody] = open_custody, *,
               wall: Callable[[], float] = time.time, mono: Callable[[], float] = _boottime,
               check_audit: bool = True, accept_lost_changes: bool = False, rollback_hold: bool = False):
    """The token at ``home``: custody and store opened, the commit marker, audit chain and
    rollback counter checked.

    ``custody_factory(home)`` opens the custody (by default the kind HOME/custody.json
    records). ``rollback_hold``: a store the rollback counter refuses is opened held instead
    (signing refused; officers may log in and a quorum ``acceptrollback``)."""
    from .migration import resume
    from .token import Token
    home = Path(home)
    resumed = resume(home) if home.is_dir() else None  # a custody migration a crash interrupted
    custody, store = _open_files(home, custody_factory, create=False)
    try:
        state = store.load()
        if state is None:
            raise NotFound(f"no token at {home} (run: cryptobat init)")
        lost = store.check_marker(Head(state.audit.seq, state.audit.hash), accept_lost_changes)
        if check_audit:
            state = _verify_audit_since(store, state)
        counter = _counter(custody)
        held, repaired = _check_rollback(counter, state.rollback, rollback_hold) if counter else (None, None)
        token = Token(store, custody, state, wall=wall, mono=mono, counter=counter, held=held)
    except BaseException:
        store.close()
        release(custody, "close")
        raise
    if lost:
        token.audit("accepted-loss", acknowledged=lost[0], kept=lost[1],
                    why="state.db lost acknowledged changes; the operator accepted the loss")
    if repaired:
        token.audit("rollback-repaired", store=state.rollback, device=state.rollback - 1, why=repaired)
    if held:
        token.audit("rollback-held", why=held)
    if resumed:
        token.audit("custody-resumed", why=resumed)
    return token


def _remove_new(home: Path, existed: bool, before: set[str]) -> None:
    """Undo a failed init: the files it made in ``home`` (and ``home`` itself if it made that)."""
    try:
        for p in home.iterdir():
            if p.name not in before and (p.is_file() or p.is_symlink()):
                p.unlink(missing_ok=True)
        if not existed:
            home.rmdir()
    except OSError:
        pass  # what is left is named by the next init's "a token already exists" or its own error


def init_token(home: Path | str, quorum: int = 2, custody_factory: Callable[..., Custody] | None = None, *,
               wall: Callable[[], float] = time.time, mono: Callable[[], float] = _boottime,
               kind: str | None = None, config: dict | None = None):
    """A new token at ``home`` (created 0700) with an M-of-N ``quorum``.

    Its custody is made by ``custody_factory(home, create=True)``, by default
    :func:`cryptobat.custody.open_custody` of ``kind`` with ``config`` (when not given, the
    environment's default: :func:`cryptobat.custody.spec_from_env`, software when unset)
    (see :func:`cryptobat.custody.parse_spec`). A failure leaves nothing of the token behind in
    ``home`` (objects a device made before it failed are the custody's to undo)."""
    from .token import MAX_QUORUM
    if not 1 <= quorum <= MAX_QUORUM:
        raise InvalidArgument(f"quorum must be between 1 and {MAX_QUORUM}")
    home = Path(home)
    if (home / "state.db").exists():
        raise Conflict(f"a token already exists at {home}")
    if custody_factory is None:
        if kind is None:
            kind, config = spec_from_env()

        def custody_factory(h: Path, create: bool = False) -> Custody:
            return open_custody(h, create=create, kind=kind, config=config)
    existed = home.exists()
    before = {p.name for p in home.iterdir()} if existed and home.is_dir() else set()
    _private_home(home, create=True)
    with _init_lock(home):
        if (home / "state.db").exists():  # made by an init that held the lock before this one
            raise Conflict(f"a token already exists at {home}")
        return _init_locked(home, quorum, custody_factory, existed, before, wall, mono)


@contextlib.contextmanager
def _init_lock(home: Path) -> Iterator[None]:
    """Held for a whole init: a second ``cryptobat init`` of the same home meanwhile would write
    its custody's files over the first's (its counter's index over the first's ``nvcounter.json``)
    and, failing, remove them; it is refused at once instead."""
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"another cryptobat init is running in {home}") from None
        yield
    finally:
        os.close(fd)


def _init_locked(home: Path, quorum: int, custody_factory: Callable[..., Custody], existed: bool,
                 before: set[str], wall: Callable[[], float], mono: Callable[[], float]):
    from .token import Token, new_state
    try:
        custody, store = _open_files(home, custody_factory, create=True)
    except BaseException:
        _remove_new(home, existed, before)
        raise
    try:
        if store.load() is not None:
            raise Conflict(f"a token already exists at {home}")
        counter = _counter(custody)
        state = new_state(quorum, int(wall()))
        if counter is not None:  # a new counter reads what the TPM's history made it, not 0
            state = state.replace(rollback=counter.read())
        token = Token(store, custody, state, wall=wall, mono=mono, counter=counter)
        token.audit("init", quorum=quorum, custody=custody.name)
        release(custody, "kept")  # the committed state refers to what it made: never discarded now
    except BaseException as e:
        store.close()
        release(custody, "close" if isinstance(e, Conflict) else "discard", "close")
        if not isinstance(e, Conflict):  # (a token that appeared meanwhile is not ours to remove)
            _remove_new(home, existed, before)
        raise
    return token


def open_engine(token, workers: int | None = None, custody_factory: Callable[..., Custody] | None = None):
    """Signing worker processes for ``token``'s large batches; the caller closes them.

    Each worker opens the token's custody again (by default the same kind the token has); a
    custody that cannot be shared across processes (``parallel`` false: one TPM or HSM session)
    gets no workers: the token signs in its own process."""
    from .workers import Engine
    return Engine(token.custody, custody_factory or type(token.custody), token.home, workers, cache=token.cache,
                  parallel=getattr(token.custody, "parallel", True))


def close_token(token, engine=None) -> None:
    """Stop ``engine``'s worker processes (they hold unsealed keys), then close the token,
    whose store lock is free after this; the token is closed even if stopping fails."""
    try:
        if engine is not None:
            engine.close()
    finally:
        token.close()
