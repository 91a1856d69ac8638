"""OS-level confinement primitives for sandbox workers (Linux): namespaces, mounts, Landlock,
seccomp, rlimits, uids.

Every function here either applies its barrier or reports that the kernel refused; callers decide
what to fall back to. Python 3.11 has no `os.unshare`/`os.setns`/`os.mount`, hence ctypes on libc.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import platform
import resource
import tempfile

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
# glibc has no pivot_root wrapper; the number differs between the two architectures we run on.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())

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


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = lambda v: v.encode() if v is not None else None  # noqa: E731
    ret = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, f"mount {target}")


def umount(target: str, flags: int = MNT_DETACH) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    if _SYS_PIVOT_ROOT is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), new_root.encode(), put_old.encode())
    _check(ret, "pivot_root")


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


def landlock_confine(writable_dirs: list[str], abi: int, readable_dirs: list[str] | None) -> None:
    """Deny, for this process and its future children: writes outside `writable_dirs`, reads
    outside them and `readable_dirs` (unless that is None: reads unrestricted), executing any file,
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
        for path in writable_dirs:
            _add_path_rule(ruleset_fd, path, write_rights | read_rights)
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
    """A session's limits. With a cgroup, memory, processes and CPU share are enforced across all
    of the session's processes; the rlimits below are per process and remain as backstops."""

    # Resident memory (cgroup) the session may add on top of the pre-warmed interpreter, whose
    # pages it shares; without a cgroup, address space (RLIMIT_AS) on top of the interpreter's.
    memory_mb: int
    cpu_s: int  # CPU seconds per process (a backstop; wall-clock kills come first)
    # Tasks (processes + threads) of the session: the cgroup's pids.max, and RLIMIT_NPROC of the
    # session's own uid (0 skips the rlimit: root ignores it, a shared uid counts everyone).
    max_processes: int
    max_file_mb: int  # largest file the program may write
    max_open_files: int
    disk_mb: int  # size of the session directory's tmpfs, and of its private /tmp and /dev/shm
    cpu_cores: float  # CPU bandwidth of the whole session (cgroup), in cores


def virtual_memory_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def apply_rlimits(limits: Limits, cap_address_space: bool) -> None:
    """Hard and soft limits are equal so the program cannot raise them back. `cap_address_space`
    only where no memory cgroup exists: allocators reserve far more address space than they use
    (pyarrow failed `pd.read_excel` under 1 GiB), so it is a poor stand-in for resident memory."""

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
    if cap_address_space:
        # Last: measured after everything above so the baseline includes the pre-warmed imports.
        set_limit(resource.RLIMIT_AS, virtual_memory_bytes() + limits.memory_mb * 2**20)


def drop_privileges(uid: int, gid: int) -> None:
    """Become an unprivileged, per-session user with no capabilities at all: none to leave the
    namespaces, to read files that are not world-readable (CAP_DAC_READ_SEARCH), or to signal and
    ptrace other users' processes. An interpreter installed where only root may look (pyenv under
    /root) stays importable because the worker's filesystem view binds it past /root."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


# --------------------------------------------------------------------------------------------------
# Seccomp: what namespaces and Landlock leave open.
# --------------------------------------------------------------------------------------------------

# Syscalls a sandboxed program never needs, refused with EPERM (an OSError in Python, not a kill:
# a program that probes gets a clear error and the session keeps serving).
_DENIED_SYSCALLS = (
    # Running other programs, including a static ELF in a memfd (fexecve is execveat).
    "execve",
    "execveat",
    # Channels that namespaces do not separate: watching other sessions' files, kernel keyrings.
    "inotify_init",
    "inotify_init1",
    "fanotify_init",
    "add_key",
    "request_key",
    "keyctl",
    # New pathname sockets or connections (pathname Unix sockets ignore the network namespace).
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "sendmsg",
    "sendmmsg",
    # Kernel attack surface and other processes' memory.
    "bpf",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "pidfd_getfd",
    "kcmp",
    "perf_event_open",
    "userfaultfd",
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_by_handle_at",
    "name_to_handle_at",
    "move_pages",
    "migrate_pages",
    "fsopen",
    "fsmount",
    "fspick",
    "open_tree",
    "move_mount",
    "mount_setattr",
    "quotactl",
    "syslog",
    "personality",
)
_AF_UNIX = 1


def seccomp_available() -> bool:
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError):  # the binding, or libseccomp.so.2 behind it, is missing
        return False
    return True


def seccomp_filter() -> bytes:
    """The worker's seccomp filter as a BPF program, compiled by libseccomp (through `pyseccomp`)
    once in the zygote; each worker installs it with `seccomp_load_bpf`. Letting libseccomp load
    it in every worker instead recompiles it each time, 0.6-2 ms of the session's start.

    Also: sockets other than AF_UNIX (socketpair stays usable, asyncio needs it); sendto with a
    destination address (the unconnected-datagram route around `connect`); clone with namespace
    flags; clone3 answers ENOSYS, because its flags sit in memory a filter cannot read and glibc
    falls back to clone.
    """
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)
    for name in _DENIED_SYSCALLS:
        with contextlib.suppress(RuntimeError, ValueError):  # not on this architecture
            f.add_rule(eperm, name)
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    namespaces = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID
    namespaces |= 0x04000000 | 0x02000000 | 0x00000080  # CLONE_NEWUTS, CLONE_NEWCGROUP, NEWTIME
    for bit in _bits(namespaces):
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    f.add_rule(eperm, "socket", sc.Arg(0, sc.NE, _AF_UNIX))
    f.add_rule(eperm, "sendto", sc.Arg(4, sc.NE, 0))
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_BPF_INSN_BYTES = 8


def seccomp_load_bpf(program: bytes) -> None:
    """Install a BPF program from `seccomp_filter` on this thread (and its future children).
    Needs no_new_privs."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // _BPF_INSN_BYTES, ctypes.cast(buf, ctypes.c_void_p))
    ret = _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)
    _check(ret, "prctl(PR_SET_SECCOMP)")


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]


# --------------------------------------------------------------------------------------------------
# The filesystem a worker sees: a read-only root holding only what Python needs.
# --------------------------------------------------------------------------------------------------

# Mount points inside the view, created once in the template; each worker mounts its own
# filesystems on them in its private mount namespace.
_VIEW_MOUNTPOINTS = ("proc", "tmp", "dev/shm")
# Where the session directory appears: the first of these that no bound path lives under (the
# interpreter or this package may sit in a host /work, which the session tmpfs would hide).
_VIEW_WORKDIRS = ("/work", "/session", "/sandbox_session")
_VIEW_DEVICES = ("null", "zero", "full", "random", "urandom")


def private_mounts() -> None:
    """A mount namespace of our own, whose mounts neither propagate to the host nor from it."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def build_view(root: str, dirs: list[str], files: list[str]) -> str:
    """Make `root` (an empty directory) the template of the workers' filesystem: a small tmpfs with
    read-only bind mounts of `dirs` and `files` at their own paths, a few device nodes and empty
    mount points; then the template itself becomes read-only. Returns where the session directory
    will appear.

    Paths are bound at their real location and symlinks are recreated, so `/bin -> usr/bin` and an
    interpreter under `/root/.pyenv` resolve as on the host, while the rest of `/root` (and `/home`,
    `/etc`, the checkout, other sessions) simply does not exist in the view. Call this in the
    zygote's private mount namespace (`private_mounts`).
    """
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1m,mode=0755")
    bound: list[str] = []
    # Real directories first, shortest first, so that a symlink (/bin -> usr/bin) or a nested path
    # finds its target already visible instead of binding it twice.
    paths = {os.path.abspath(p) for p in dirs + files}
    for path in sorted(paths, key=lambda p: (os.path.islink(p), len(p), p)):
        if not os.path.lexists(path) or any(_is_under(path, b) for b in bound):
            continue
        real = os.path.realpath(path)
        if real != path:
            _ensure_symlink(root, path, real)
            if any(_is_under(real, b) for b in bound) or not os.path.exists(real):
                continue
            path = real
        _bind_read_only(path, root + path, os.path.isdir(path))
        bound.append(path)
    seen = paths | {os.path.realpath(p) for p in paths}
    workdir = next(w for w in _VIEW_WORKDIRS if not any(_is_under(p, w) for p in seen))
    for name in (*_VIEW_MOUNTPOINTS, workdir.lstrip("/")):
        os.makedirs(os.path.join(root, name), 0o755, exist_ok=True)
    for name in _VIEW_DEVICES:
        target = os.path.join(root, "dev", name)
        open(target, "w").close()  # noqa: SIM115
        # Device nodes keep their (writable) mount: writing to /dev/null must work.
        mount(f"/dev/{name}", target, None, MS_BIND)
    mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return workdir


def _is_under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _ensure_symlink(root: str, path: str, real: str) -> None:
    link = root + path
    if os.path.lexists(link):
        return
    os.makedirs(os.path.dirname(link), 0o755, exist_ok=True)
    os.symlink(real, link)


def _bind_read_only(source: str, target: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(target, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        open(target, "w").close()  # noqa: SIM115
    mount(source, target, None, MS_BIND)
    # A bind mount takes its flags from the source; read-only needs a remount of the new mount.
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def mount_session_dir(path: str, size_mb: int, uid: int, max_inodes: int) -> None:
    """The session's working directory as its own tmpfs: the size is the session's disk quota,
    and unmounting it removes everything inside at once, however deep or oddly permissioned."""
    opts = f"size={size_mb}m,nr_inodes={max_inodes},mode=0700,uid={uid},gid={uid}"
    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)


def enter_view(root: str, session_dir: str, workdir: str, tmp_mb: int, max_inodes: int) -> None:
    """In a fresh mount namespace (and pid namespace, for /proc): private /tmp and /dev/shm with a
    size cap, `session_dir` at `workdir` (from build_view), then `root` becomes `/` and the host's
    filesystem is detached. Needs CAP_SYS_ADMIN; call before dropping privileges."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    shm = f"size={tmp_mb}m,nr_inodes={max_inodes},mode=1777"
    mount("tmpfs", root + "/tmp", "tmpfs", flags, shm)
    mount("tmpfs", root + "/dev/shm", "tmpfs", flags, shm)
    target = root + workdir
    mount(session_dir, target, None, MS_BIND)
    mount(None, target, None, MS_REMOUNT | MS_BIND | flags)
    mount("proc", root + "/proc", "proc", flags)
    os.chdir(root)
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves no path back.
    pivot_root(".", ".")
    umount(".", MNT_DETACH)
    os.chdir(workdir)
