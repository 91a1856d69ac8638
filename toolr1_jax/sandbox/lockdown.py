"""OS-level confinement primitives for sandbox workers (Linux): namespaces, Landlock, rlimits, uids.

Every function here either applies its barrier or reports that the kernel refused; callers decide
what to fall back to. Python 3.11 has no `os.unshare`/`os.setns`, hence ctypes on libc.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import resource

CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000

_PR_SET_KEEPCAPS = 8
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38

# Landlock syscall numbers are the same on x86_64 and aarch64 (allocated after the table merge).
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SOCK = 1 << 9
_FS_MAKE_FIFO = 1 << 10
_FS_MAKE_BLOCK = 1 << 11
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1  # ABI 6

_libc = ctypes.CDLL(None, use_errno=True)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def set_child_subreaper() -> None:
    """Orphaned descendants are re-parented to this process (so it can reap and kill them)."""
    _check(_libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def set_no_new_privs() -> None:
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable or disabled."""
    ret = _libc.syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(ret), 0)


def landlock_confine(writable_dir: str, abi: int, readable_dirs: list[str] | None) -> None:
    """Deny, for this process and its future children: writes outside `writable_dir`, reads
    outside it and `readable_dirs` (unless that is None: reads unrestricted), executing any file,
    TCP bind/connect (ABI >= 4), and signals or abstract sockets that leave the domain (ABI >= 6).

    The caller must have set no_new_privs (or hold CAP_SYS_ADMIN).
    """
    if abi < 1:
        raise OSError(errno.ENOSYS, "Landlock is not available")
    write_rights = (
        _FS_WRITE_FILE
        | _FS_REMOVE_DIR
        | _FS_REMOVE_FILE
        | _FS_MAKE_CHAR
        | _FS_MAKE_DIR
        | _FS_MAKE_REG
        | _FS_MAKE_SOCK
        | _FS_MAKE_FIFO
        | _FS_MAKE_BLOCK
        | _FS_MAKE_SYM
    )
    if abi >= 2:
        write_rights |= _FS_REFER
    if abi >= 3:
        write_rights |= _FS_TRUNCATE
    read_rights = _FS_READ_FILE | _FS_READ_DIR if readable_dirs is not None else 0
    attr = _RulesetAttr(handled_access_fs=write_rights | read_rights | _FS_EXECUTE)
    size = 8
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    ruleset_fd = _libc.syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
        ctypes.byref(attr),
        ctypes.c_size_t(size),
        ctypes.c_uint32(0),
    )
    _check(ruleset_fd, "landlock_create_ruleset")
    try:
        _add_path_rule(ruleset_fd, writable_dir, write_rights | read_rights)
        for path in readable_dirs or ():
            # A plain file gets file rights only (the kernel rejects directory rights on files).
            rights = read_rights if os.path.isdir(path) else _FS_READ_FILE
            with contextlib.suppress(FileNotFoundError):
                _add_path_rule(ruleset_fd, path, rights)
        _check(
            _libc.syscall(
                ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF),
                ctypes.c_int(ruleset_fd),
                ctypes.c_uint32(0),
            ),
            "landlock_restrict_self",
        )
    finally:
        os.close(ruleset_fd)


def _add_path_rule(ruleset_fd: int, path: str, rights: int) -> None:
    dir_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=dir_fd)
        _check(
            _libc.syscall(
                ctypes.c_long(_SYS_LANDLOCK_ADD_RULE),
                ctypes.c_int(ruleset_fd),
                ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            ),
            "landlock_add_rule",
        )
    finally:
        os.close(dir_fd)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits applied to one worker process (and inherited by anything it forks)."""

    memory_mb: int  # address space allowed on top of the pre-warmed interpreter
    cpu_s: int  # CPU seconds for the whole session (a backstop; wall-clock kills come first)
    # Tasks (processes + threads) of the session's uid; 0 skips the limit, which only means
    # something for a uid of its own (root ignores it; a shared uid counts all its processes).
    max_processes: int
    max_file_mb: int  # largest file the program may write
    max_open_files: int


def virtual_memory_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def apply_rlimits(limits: Limits) -> None:
    """Hard and soft limits are equal so the program cannot raise them back."""

    def set_limit(which: int, value: int) -> None:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    set_limit(resource.RLIMIT_CORE, 0)
    set_limit(resource.RLIMIT_NOFILE, limits.max_open_files)
    set_limit(resource.RLIMIT_FSIZE, limits.max_file_mb * 2**20)
    if limits.max_processes > 0:
        set_limit(resource.RLIMIT_NPROC, limits.max_processes)
    set_limit(resource.RLIMIT_CPU, limits.cpu_s)
    # Last: measured after everything above so the baseline includes the pre-warmed imports.
    set_limit(resource.RLIMIT_AS, virtual_memory_bytes() + limits.memory_mb * 2**20)


_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_privileges(uid: int, gid: int, keep_read_search: bool) -> None:
    """Become an unprivileged, per-session user: no capability to leave the namespaces, no
    signalling or ptracing other users' processes (so no reading their /proc/<pid>/environ).

    `keep_read_search` keeps CAP_DAC_READ_SEARCH alone, for interpreters installed where only root
    may read (e.g. pyenv under /root); Landlock's read allowlist then bounds what it reaches.
    """
    if keep_read_search:
        _check(_libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep_read_search:
        header = _CapHeader(version=_LINUX_CAPABILITY_VERSION_3, pid=0)
        data = (_CapData * 2)()
        data[0].effective = data[0].permitted = 1 << _CAP_DAC_READ_SEARCH
        _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
