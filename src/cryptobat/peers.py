"""Who is on the other end of a daemon socket, and whether that peer may stay.

The kernel tells a Unix socket server the pid, uid and gid of the process that
connected (``SO_PEERCRED``, fixed at ``connect()``). The daemon's sockets admit:

- the console socket: the daemon's own user and root (officers on the token host);
- the signer sockets (native API, PKCS#11): those two, plus members of the signer
  group (``cryptobat serve --signer-group``), by primary or supplementary group.

Supplementary groups come from ``SO_PEERGROUPS`` (also fixed at ``connect()``),
else from ``Groups:`` in ``/proc/PID/status`` (checked to still belong to the
peer's uid), else from the group database's member list. The socket file modes
are the first gate; this check is the second, and it also holds when a socket's
directory or mode is looser than intended.
"""
from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
import sys
from dataclasses import dataclass
from typing import TextIO

SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
# SO_PEERGROUPS (Linux 4.13) is 59 on the architectures using asm-generic's numbering
_GENERIC = ("x86_64", "i686", "i386", "aarch64", "armv7l", "armv6l", "riscv64", "ppc64le", "ppc64", "s390x")
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59 if sys.platform.startswith("linux")
                        and os.uname().machine in _GENERIC else None)
_CRED = struct.Struct("3i")
_MAX_PEERGROUPS = 256  # getsockopt takes at most 1024 bytes; a peer in more groups falls back to /proc


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    """pid, uid and gid of the process that connected ``sock`` (a connected AF_UNIX socket)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, _CRED.size)
    return Peer(*_CRED.unpack(raw))


def _peer_groups(sock: socket.socket | None) -> set[int] | None:
    if sock is None or SO_PEERGROUPS is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_PEERGROUPS)
    except OSError:  # older kernel, or more groups than fit
        return None
    n = len(raw) // 4
    return set(struct.unpack(f"{n}I", raw[:4 * n]))


def _proc_groups(peer: Peer) -> set[int] | None:
    """Supplementary groups from /proc/PID/status, if that pid still runs as the peer's uid."""
    try:
        with open(f"/proc/{peer.pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    uids = groups = None
    for line in text.splitlines():
        if line.startswith("Uid:"):
            uids = {int(x) for x in line.split()[1:]}
        elif line.startswith("Groups:"):
            groups = {int(x) for x in line.split()[1:]}
    if uids is None or groups is None or uids != {peer.uid}:
        return None  # the pid exited (and may be reused) or changed identity since connect()
    return groups


def _listed_member(peer: Peer, gid: int) -> bool:
    try:
        name = pwd.getpwuid(peer.uid).pw_name
        return name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def in_group(peer: Peer, gid: int, sock: socket.socket | None = None) -> bool:
    """Whether the peer had ``gid`` as its primary or a supplementary group."""
    if peer.gid == gid:
        return True
    groups = _peer_groups(sock)
    if groups is None:
        groups = _proc_groups(peer)
    if groups is not None:
        return gid in groups
    return _listed_member(peer, gid)


def allowed(peer: Peer, *, own_uid: int | None = None, group: int | None = None,
            sock: socket.socket | None = None) -> bool:
    """The daemon's user and root always; members of ``group`` if one is given."""
    own = os.geteuid() if own_uid is None else own_uid
    if peer.uid in (own, 0):
        return True
    return group is not None and in_group(peer, group, sock)


class Gate:
    """The admission check of one socket: ``gate(sock)`` is True to serve, False to close."""

    def __init__(self, name: str, group: int | None = None, own_uid: int | None = None,
                 log: TextIO | None = None) -> None:
        self.name = name
        self.group = group
        self.own_uid = os.geteuid() if own_uid is None else own_uid
        self.log = log
        self.refused = 0

    def peer(self, sock: socket.socket) -> Peer | None:
        """The peer if it may stay, else None (and one line on stderr)."""
        try:
            peer = peer_credentials(sock)
        except OSError:
            peer = None
        if peer is not None and allowed(peer, own_uid=self.own_uid, group=self.group, sock=sock):
            return peer
        self.refused += 1
        who = f"uid {peer.uid}" if peer is not None else "an unknown peer"
        try:
            print(f"cryptobat serve: refused connection from {who} on {self.name}",
                  file=self.log or sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        return None

    def __call__(self, sock: socket.socket) -> bool:
        return self.peer(sock) is not None


def group_id(name: str) -> int:
    """A group name (or number) to its gid; KeyError if there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise
