"""Per-session cgroups, host side: memory, pids and CPU limits across all of a session's processes,
the list of those processes (to kill what a run left behind) and the session's OOM-kill count.

Each controller comes from cgroup v1 (a hierarchy per controller) or v2 (the unified hierarchy),
whichever mounts it. The pool's cgroups nest under the cgroup this process is already in, so a
container's own limits still apply above them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import secrets
import time

CONTROLLERS = ("memory", "pids", "cpu")
# A long period lets an idle session's quota be tiny: 1 ms per second while throttled.
_CPU_PERIOD_US = 1_000_000
_IDLE_QUOTA_US = 1_000


@dataclasses.dataclass(frozen=True)
class _Hierarchy:
    controller: str
    v2: bool
    base: str  # this process's cgroup directory in that hierarchy


def _hierarchies() -> dict[str, _Hierarchy]:
    own_v1, own_v2 = {}, None
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if names == "":
                own_v2 = path
            for name in names.split(","):
                own_v1[name] = path
    found: dict[str, _Hierarchy] = {}
    v2_mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mountpoint, fstype, options = fields[4], fields[sep + 1], fields[sep + 3]
            if fstype == "cgroup2":
                v2_mount = mountpoint
            elif fstype == "cgroup":
                for name in options.split(","):
                    if name in CONTROLLERS and name in own_v1:
                        found[name] = _Hierarchy(name, False, mountpoint + own_v1[name])
    if v2_mount is not None and own_v2 is not None:
        base = os.path.join(v2_mount, own_v2.lstrip("/"))
        with contextlib.suppress(OSError), open(os.path.join(base, "cgroup.controllers")) as f:
            for name in f.read().split():
                if name in CONTROLLERS and name not in found:
                    found[name] = _Hierarchy(name, True, base)
    return found


class Tree:
    """The pool's cgroups: one directory per hierarchy, a child per session."""

    def __init__(self, dirs: dict[str, _Hierarchy], names: dict[str, str]):
        self._hier = dirs
        self.dirs = names  # controller -> the pool's cgroup directory

    @classmethod
    def create(cls, prefix: str, num_tasks: int) -> tuple[Tree | None, list[str]]:
        """The pool's cgroup, and the controllers that could not be set up (all of them when the
        result is None). A cgroup without the memory controller is not worth having: None.

        The scheduler shares CPU between sibling cgroups by weight, and a new cgroup weighs as much
        as one process: the pool's cgroup gets the weight of `num_tasks` processes (the programs
        that may run at once), which is what its workers had when they were processes of their own.
        """
        try:
            hier = _hierarchies()
        except OSError:
            return None, list(CONTROLLERS)
        for h in hier.values():
            _remove_stale(h.base, prefix)
        name = f"{prefix}{os.getpid()}_{secrets.token_hex(4)}"
        dirs: dict[str, str] = {}
        made: list[str] = []
        for c, h in hier.items():
            path = os.path.join(h.base, name)
            try:
                if path not in made:
                    os.mkdir(path, 0o755)
                    made.append(path)
                if h.v2:
                    # Controllers reach a child only when enabled in every parent's subtree_control;
                    # the kernel refuses that (EBUSY) for a non-root cgroup that holds processes.
                    _write(os.path.join(h.base, "cgroup.subtree_control"), f"+{c}")
                    _write(os.path.join(path, "cgroup.subtree_control"), f"+{c}")
                if c == "cpu" and h.v2:
                    _write(os.path.join(path, "cpu.weight"), str(min(100 * num_tasks, 10_000)))
                elif c == "cpu":
                    _write(os.path.join(path, "cpu.shares"), str(min(1024 * num_tasks, 262_144)))
                dirs[c] = path
            except OSError:
                continue
        missing = [c for c in CONTROLLERS if c not in dirs]
        if "memory" in missing:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            return None, list(CONTROLLERS)
        return cls(hier, dirs), missing

    def session(self, sid: str, memory_mb: int, max_processes: int, cpu_cores: float) -> Session:
        dirs = {}
        try:
            for c, base in self.dirs.items():
                path = os.path.join(base, sid)
                if path not in dirs.values():
                    os.mkdir(path, 0o755)
                dirs[c] = path
            v2 = {c: self._hier[c].v2 for c in dirs}
            mem = dirs["memory"]
            limit = str(memory_mb * 2**20)
            if v2["memory"]:
                _write(os.path.join(mem, "memory.max"), limit)
                with contextlib.suppress(FileNotFoundError):  # no swap accounting: no swap file
                    _write(os.path.join(mem, "memory.swap.max"), "0")
            else:
                _write(os.path.join(mem, "memory.limit_in_bytes"), limit)
                with contextlib.suppress(FileNotFoundError):  # memsw: only with swap accounting
                    _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), limit)
            if "pids" in dirs:
                _write(os.path.join(dirs["pids"], "pids.max"), str(max_processes))
            if "cpu" in dirs:
                quota = max(int(cpu_cores * _CPU_PERIOD_US), 1000)
                if v2["cpu"]:
                    _write(os.path.join(dirs["cpu"], "cpu.max"), f"{quota} {_CPU_PERIOD_US}")
                else:
                    _write(os.path.join(dirs["cpu"], "cpu.cfs_period_us"), str(_CPU_PERIOD_US))
                    _write(os.path.join(dirs["cpu"], "cpu.cfs_quota_us"), str(quota))
            session = Session(dirs, v2)
            session._run_quota_us = quota if "cpu" in dirs else 0
            return session
        except BaseException:
            _remove_dirs(list(dirs.values()))
            raise

    def remove(self) -> None:
        _remove_dirs(list(self.dirs.values()))


class Session:
    """One session's cgroup in each hierarchy. The worker joins it itself (as its first act after
    the fork), so every process it ever starts is counted, limited and listed here."""

    def __init__(self, dirs: dict[str, str], v2: dict[str, bool]):
        self.dirs = dirs
        self.procs_files = sorted({os.path.join(d, "cgroup.procs") for d in dirs.values()})
        mem = dirs["memory"]
        self._events = os.path.join(mem, "memory.events" if v2["memory"] else "memory.oom_control")
        self._procs = os.path.join(dirs.get("pids", mem), "cgroup.procs")
        self._peak = os.path.join(
            mem, "memory.peak" if v2["memory"] else "memory.max_usage_in_bytes"
        )
        # Kept open: used around every run, and pread/pwrite on them cost a microsecond or two.
        self._tasks_fd = self._quota_fd = -1
        if "pids" in dirs:
            self._tasks_fd = os.open(os.path.join(dirs["pids"], "pids.current"), os.O_RDONLY)
        if "cpu" in dirs:
            name = "cpu.max" if v2["cpu"] else "cpu.cfs_quota_us"
            self._quota_fd = os.open(os.path.join(dirs["cpu"], name), os.O_WRONLY)
            self._v2_cpu = v2["cpu"]
        self._run_quota_us = 0

    @property
    def can_throttle(self) -> bool:
        return self._quota_fd >= 0

    def throttle(self) -> None:
        """Between runs: the session's CPU bandwidth drops to 0.1% of a core. Unlike SIGSTOP this
        wakes nobody, so it costs the host two writes per run instead of two context switches."""
        self._set_quota(_IDLE_QUOTA_US)

    def unthrottle(self) -> None:
        # The kernel refills and unthrottles at once when the quota changes.
        self._set_quota(self._run_quota_us)

    def _set_quota(self, quota_us: int) -> None:
        value = f"{quota_us} {_CPU_PERIOD_US}" if self._v2_cpu else str(quota_us)
        os.pwrite(self._quota_fd, value.encode(), 0)

    def pids(self) -> list[int]:
        """Host pids of the session's processes (thread-group ids), zombies included. Opened anew
        each time: cgroup v1 keeps the list it built for an open file, however stale."""
        with open(self._procs, "rb") as f:
            return [int(p) for p in f.read().split()]

    def num_tasks(self) -> int | None:
        """Threads and processes (zombies included) of the session; None without pids control."""
        if self._tasks_fd < 0:
            return None
        return int(os.pread(self._tasks_fd, 32, 0))

    def peak_memory_bytes(self) -> int:
        """The most memory the session's processes (and its tmpfs files) ever held together."""
        with open(self._peak) as f:
            return int(f.read())

    def oom_kills(self) -> int:
        try:
            with open(self._events) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            pass
        return 0

    def remove(self) -> None:
        for fd in (self._tasks_fd, self._quota_fd):
            if fd >= 0:
                os.close(fd)
        self._tasks_fd = self._quota_fd = -1
        _remove_dirs(list(self.dirs.values()))


def _remove_stale(base: str, prefix: str) -> None:
    """Pool cgroups whose creator died without closing its pool (SIGKILL, a crash): the kernel
    keeps empty cgroups forever. Only empty ones go (rmdir refuses the rest), and only those of
    pids that no longer exist here."""
    try:
        names = [n for n in os.listdir(base) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix) :].partition("_")[0]
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        path = os.path.join(base, name)
        with contextlib.suppress(OSError):
            for child in os.listdir(path):
                if os.path.isdir(os.path.join(path, child)):
                    os.rmdir(os.path.join(path, child))
            os.rmdir(path)


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _remove_dirs(paths: list[str], timeout_s: float = 5.0) -> None:
    """rmdir each cgroup; one whose last process is still exiting answers EBUSY for a moment."""
    deadline = time.monotonic() + timeout_s
    for path in dict.fromkeys(paths):
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
