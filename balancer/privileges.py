"""Dropping root for good after the listeners are bound (`server.user`, `server.group`).

Invariants:
* The order is fixed: supplementary groups cleared, then the gid, then the
  uid (after setuid the process could no longer change its groups).
* After a drop to a non-root user, `os.setuid(0)` must fail; if it does not,
  `PrivilegeError` is raised and the process must not serve.
* Without root, asking for the identity the process already has is a no-op;
  asking for another one is an error that names the setting.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from dataclasses import dataclass


class PrivilegeError(Exception):
    """The process cannot take (or could regain) the configured identity."""


@dataclass(frozen=True)
class Identity:
    """The uid and gid to run as, resolved from the settings."""

    uid: int
    gid: int
    name: str

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"


def resolve(user: str, group: str) -> Identity | None:
    """The identity `user`/`group` name, or None when neither is set.

    A user without a group runs with the user's primary group; a group
    without a user keeps the current uid. Names or numeric ids are accepted.
    """
    if not user and not group:
        return None
    uid, gid, name = os.getuid(), os.getgid(), str(os.getuid())
    if user:
        entry = _user_entry(user)
        if entry is None and not group:
            raise PrivilegeError(f"server.group: uid {user} has no passwd entry to take "
                                 f"a group from; set server.group too")
        uid, name = (entry.pw_uid, entry.pw_name) if entry else (int(user), user)
        gid = entry.pw_gid if entry and not group else gid
    if group:
        gid = _group_id(group)
    return Identity(uid, gid, name)


def _user_entry(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(int(user)) if user.isdecimal() else pwd.getpwnam(user)
    except KeyError:
        if user.isdecimal():
            return None  # a numeric uid without a passwd entry is allowed
        raise PrivilegeError(f"server.user: no user named {user!r}") from None


def _group_id(group: str) -> int:
    if group.isdecimal():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise PrivilegeError(f"server.group: no group named {group!r}") from None


def drop_privileges(identity: Identity | None) -> bool:
    """Become `identity` for good: groups cleared, setgid, setuid, then verified.

    Returns whether anything changed (False without an identity, or when a
    non-root process already runs as it)."""
    if identity is None:
        return False
    if os.geteuid() != 0:
        if (os.getuid(), os.getgid()) != (identity.uid, identity.gid):
            raise PrivilegeError(f"server.user/server.group: cannot switch to {identity}: "
                                 f"only root can (running as uid {os.getuid()})")
        return False
    try:
        os.setgroups([])
        os.setgid(identity.gid)
        os.setuid(identity.uid)
    except OSError as exc:
        raise PrivilegeError(f"server.user/server.group: cannot switch to {identity}: "
                             f"{exc.strerror or exc}") from None
    assert_dropped(identity)
    return True


def assert_dropped(identity: Identity | None) -> None:
    """Raise `PrivilegeError` unless the process runs as `identity` (real, effective and
    saved ids), has no other group, and cannot regain root."""
    if identity is None:
        return
    ids = os.getresuid() + os.getresgid()
    if ids != (identity.uid,) * 3 + (identity.gid,) * 3:
        raise PrivilegeError(f"expected to run as {identity}, running as uid/gid {ids}")
    if set(os.getgroups()) - {identity.gid}:
        raise PrivilegeError(f"supplementary groups {os.getgroups()} remain after the switch")
    if identity.uid != 0 and _can_become_root():
        raise PrivilegeError(f"root could be regained after switching to {identity}")


def _can_become_root() -> bool:
    with contextlib.suppress(OSError):
        os.setuid(0)
        return True
    return False
