"""The signed zone's file, replaced atomically, or standard output.

The signed zone is written to ``.NAME.XXXXXXXX.tmp`` beside the output file NAME
(eight of [a-z0-9_]), fsynced and renamed over NAME.  Its writer holds an exclusive
flock on it from the moment it exists until it is renamed or removed; a run that was
killed leaves it unlocked, and the next run writing NAME removes it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import stat
import sys

from .fatal import Fatal


def _temp_name_re(out: str) -> re.Pattern:
    return re.compile(r"\." + re.escape(os.path.basename(out)) + r"\.[a-z0-9_]{8}\.tmp\Z")


def _remove_if_unlocked(path: str) -> bool:
    """Remove ``path`` if it is a regular file of this user that no writer has locked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a writer holds it
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
            return True
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


def clean_stale_temps(out: str) -> list[str]:
    """Remove the temporary files of runs writing ``out`` whose writer is gone; return their paths.

    Only files of the exact temporary name pattern, in the output's directory, regular,
    owned by this user and not locked: a writer locks its file before writing to it and
    checks afterwards that it was not removed in between (:func:`create_temp`), so a
    file that can be locked here without waiting has no writer.
    """
    d = os.path.dirname(os.path.abspath(out))
    match = _temp_name_re(out).match
    try:
        names = [n for n in os.listdir(d) if match(n)]
    except OSError:
        return []
    return [p for p in (os.path.join(d, n) for n in names) if _remove_if_unlocked(p)]


def create_temp(out: str) -> tuple[int, str]:
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


def _fsync_dir(path: str) -> None:
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


class Output:
    """Where the zone text goes: a locked temporary file renamed over ``path``, or stdout for ``-``.

    Nothing reaches ``path`` or stdout before :meth:`commit`; :meth:`close` removes an
    uncommitted temporary file while still holding its lock.
    """

    def __init__(self, path: str, clean: bool = True) -> None:
        """``clean`` False: the caller removed the stale temporary files (``--zones``: once per directory)."""
        self.path = path
        self._tmp: str | None = None
        self._f = None
        self._parts: list[bytes] = []
        if path == "-":
            self.write = self._parts.append
        else:
            if clean:
                clean_stale_temps(path)
            fd, self._tmp = create_temp(path)  # locked until renamed into place or removed
            self._f = os.fdopen(fd, "wb")
            self.write = self._f.write

    def sync(self) -> None:
        """Flush the temporary file to disk with the mode a new file would get."""
        f = self._f
        if f is not None:  # stays open, and so locked, until renamed into place
            f.flush()
            os.fsync(f.fileno())
            umask = os.umask(0o22)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)

    def commit(self) -> None:
        """Put the zone in place (or on stdout); a file's name is printed, as dnssec-signzone does."""
        if self._tmp is None:
            sys.stdout.write(b"".join(self._parts).decode("latin-1"))
            sys.stdout.flush()
            return
        os.replace(self._tmp, self.path)
        self._tmp = None
        _fsync_dir(self.path)
        print(self.path)

    def close(self) -> None:
        if self._tmp is not None:  # removed while still locked, then closed
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            if self._f is not None:
                with contextlib.suppress(OSError):
                    self._f.close()
        elif self._f is not None:
            self._f.close()
