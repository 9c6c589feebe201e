"""Where a token lives, and opening it: the directory, its custody and store, the start-up checks.

Everything that touches the file system before a token can serve is here, so that
:class:`cryptobat.token.Token` only takes opened values (a store, a custody, the
state they hold, clock sources) and returns results.
"""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Callable

from . import audit as auditlog
from .audit import Head
from .clock import _boottime
from .custody import Custody, SoftwareCustody
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
        return custody, Store(home, custody.mac_key(), create=create)
    finally:
        os.umask(old_umask)


def _verify_audit_since(store: Store, state: TokenState) -> TokenState:
    """Check the audit chain from the head verified at the last start up to the current head;
    the state to serve, with that head as the one verified (saved with the next change)."""
    checked = Head(state.audit_checked.seq, state.audit_checked.hash)
    n, problem = auditlog.verify(store.audit_rows(checked.seq), Head(state.audit.seq, state.audit.hash), checked)
    if problem:
        raise IntegrityError(f"audit log is broken ({problem}); not serving. "
                             f"Inspect it with: cryptobat audit verify")
    return state.replace(audit_checked=state.audit)


def open_token(home: Path | str, custody_factory: Callable[..., Custody] = SoftwareCustody, *,
               wall: Callable[[], float] = time.time, mono: Callable[[], float] = _boottime,
               check_audit: bool = True, accept_lost_changes: bool = False):
    """The token at ``home``: custody and store opened, the commit marker and audit chain checked."""
    from .token import Token
    home = Path(home)
    custody, store = _open_files(home, custody_factory, create=False)
    try:
        state = store.load()
        if state is None:
            raise NotFound(f"no token at {home} (run: cryptobat init)")
        lost = store.check_marker(Head(state.audit.seq, state.audit.hash), accept_lost_changes)
        if check_audit:
            state = _verify_audit_since(store, state)
        token = Token(store, custody, state, wall=wall, mono=mono)
    except BaseException:
        store.close()
        raise
    if lost:
        token.audit("accepted-loss", acknowledged=lost[0], kept=lost[1],
                    why="state.db lost acknowledged changes; the operator accepted the loss")
    return token


def init_token(home: Path | str, quorum: int = 2, custody_factory: Callable[..., Custody] = SoftwareCustody, *,
               wall: Callable[[], float] = time.time, mono: Callable[[], float] = _boottime):
    """A new token at ``home`` (created 0700) with an M-of-N ``quorum``."""
    from .token import MAX_QUORUM, Token, new_state
    if not 1 <= quorum <= MAX_QUORUM:
        raise InvalidArgument(f"quorum must be between 1 and {MAX_QUORUM}")
    home = Path(home)
    if (home / "state.db").exists():
        raise Conflict(f"a token already exists at {home}")
    custody, store = _open_files(home, custody_factory, create=True)
    try:
        if store.load() is not None:
            raise Conflict(f"a token already exists at {home}")
        token = Token(store, custody, new_state(quorum, int(wall())), wall=wall, mono=mono)
        token.audit("init", quorum=quorum)
    except BaseException:
        store.close()
        raise
    return token


def open_engine(token, workers: int | None = None, custody_factory: Callable[..., Custody] | None = None):
    """Signing worker processes for ``token``'s large batches; the caller closes them.

    Each worker opens the token's custody again (by default the same kind the token has)."""
    from .workers import Engine
    if not getattr(token.custody, "parallel", True):  # a device custody (TPM) signs in the token's process
        workers = 1
    return Engine(token.custody, custody_factory or type(token.custody), token.home, workers, cache=token.cache)


def close_token(token, engine=None) -> None:
    """Stop ``engine``'s worker processes (they hold unsealed keys), then close the token,
    whose store lock is free after this; the token is closed even if stopping fails."""
    try:
        if engine is not None:
            engine.close()
    finally:
        token.close()
