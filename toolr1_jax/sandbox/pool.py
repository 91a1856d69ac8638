"""Async sandbox pool: sessions (one confined process each), limits, timeouts and cleanup.

Concurrency: `num_workers` bounds how many programs execute at once (extra `run`s wait their turn,
and the wait does not count against the timeout); any number of sessions may stay open between
runs, each an idle process. Nothing here blocks the event loop: the pre-warmed parent and the
workers are driven through asyncio pipes and sockets, and host tools run in the loop's executor
(or are awaited, for async tools).

Timeouts: at `timeout_s` the worker interrupts the program (SIGALRM; variables survive); if the
program is still running `kill_grace_s` later (stuck in C code, or ignoring the interrupt) the
host kills the worker's whole pid namespace, the session's variables are lost, and the next run
starts a fresh interpreter and says so in `ExecResult.notice`.

Between runs a session (almost) does not run: after each result the host kills every process in
the session's cgroup but the interpreter. An interpreter left with threads is stopped (SIGSTOP,
all its threads) until the next run. A lone interpreter thread, the usual case, has its session's
CPU quota cut to 0.1% of a core once it has been idle for _THROTTLE_DELAY_S (its run loop is all
that runs there, unless the program patched it): no context switches, and a session that is run
again sooner, as in a throughput benchmark, pays nothing.

Every frame from a worker is hostile input: bounded in size and depth, checked for types; a
malformed one ends that session with a `crashed` result, never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import pathlib
import pickle
import secrets
import signal
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping

from toolr1_jax.sandbox import cgroup, lockdown, protocol, worker
from toolr1_jax.sandbox.result import ExecResult
from toolr1_jax.tools import registry

_LOST_NOTICE = (
    "The previous program was killed, so this ran in a fresh interpreter: variables, imports and "
    "functions from earlier steps are lost (files in the working directory remain)."
)
# Session uids are drawn from a range that no distribution assigns to real users.
_UID_BASE = 1_000_000_000
_UID_SPAN = 2_000_000_000
_STRING_SLACK = 200  # the worker's truncation markers on top of max_output_chars
# Room for a host-tool call's arguments in one frame; results are bounded by max_output_chars.
_CALL_BYTES = 256 * 2**10
_ESCAPED_CHAR_BYTES = 12  # ensure_ascii: a character outside the BMP is two \uXXXX escapes
# Attachments up to this size are written on the loop: a few small writes cost less than the
# executor's thread hand-off, which a loaded machine stretches to milliseconds of session start.
_INLINE_FILES_BYTES = 256 * 2**10
_SWEEP_ROUNDS = 100  # rounds of killing a run's leftover processes before killing the session
# Changing a CPU quota costs the host little but the kernel a bandwidth-timer restart; measured, a
# throttle/unthrottle pair after every run cut programs/s by a fifth in bench_sandbox.
_THROTTLE_DELAY_S = 0.05


class SandboxError(RuntimeError):
    """The sandbox failed (not the program it ran): the parent died, a worker never started."""


class _Malformed(Exception):
    """A worker sent a frame that breaks the protocol: proof that the program owns its channel."""


@dataclasses.dataclass
class _Worker:
    pid: int
    pidfd: int  # signals reach this process even if its pid is reused after it dies
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    exited: asyncio.Future
    isolation: dict


class Session:
    """One episode's interpreter: persistent variables, a private working directory."""

    def __init__(
        self, pool: SandboxPool, sid: str, wd: pathlib.Path, uid: int | None, cg: cgroup.Session
    ):
        self._pool = pool
        self.id = sid
        # On the host; with a mount namespace, an empty mount point: the directory itself is a tmpfs
        # in the zygote's namespace (SandboxPool.open writes the attachments there).
        self.wd = wd
        self._uid = uid
        self._cgroup = cg
        self._oom_kills = 0
        self._worker: _Worker | None = None
        self._stopped = False  # the worker is SIGSTOPped until the next run
        self._throttled = False  # the session's CPU quota is cut until the next run
        self._throttle_timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self._run_id = 0
        self._closed = False
        self._released = False
        self._dir_mounted = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """Host pid of the worker process (None between a kill and the next run)."""
        return self._worker.pid if self._worker else None

    @property
    def isolation(self) -> dict:
        """Which barriers the worker reported in force (namespaces, cgroup, Landlock, seccomp, uid,
        audit hooks)."""
        return dict(self._worker.isolation) if self._worker else {}

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, code: str) -> ExecResult:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if self._closed:
            raise RuntimeError(f"session {self.id} is closed")
        async with self._lock, self._pool._slots:
            if self._closed:  # ended by a malformed frame while this run waited
                raise RuntimeError(f"session {self.id} is closed")
            notice = ""
            if self._worker is None:
                await self._start_worker()
                self.restarts += 1
                notice = _LOST_NOTICE
            result = await self._run_once(code)
            if notice:
                result = dataclasses.replace(result, notice=notice)
            return result

    async def close(self) -> None:
        if self._released:
            return
        self._closed = True
        async with self._lock:
            if not self._released:
                await self._release()

    async def _release(self) -> None:
        """Everything the session holds, in order: its processes (the pid namespace dies with the
        worker), its directory (unmounted, then the empty mount point), its cgroup."""
        self._released = True
        try:
            await self._kill_worker()
        finally:
            pool = self._pool
            if self._dir_mounted:
                self._dir_mounted = False
                with contextlib.suppress(SandboxError, ConnectionError):
                    pool._send_zygote({"op": "release", "wd": str(self.wd)})
            loop = asyncio.get_running_loop()
            cg, self._cgroup = self._cgroup, None
            await loop.run_in_executor(None, _remove_session, self.wd, cg)
            pool._release(self)

    async def _start_worker(self) -> None:
        mount_dir = self._pool.capabilities.get("mount_namespace", False) and not self._dir_mounted
        # Set first: the zygote mounts before it forks, so a failed spawn may still leave a mount
        # for _release to undo (unmounting what is not mounted is harmless there).
        self._dir_mounted = self._dir_mounted or mount_dir
        self._worker = await self._pool._spawn(self, mount_dir)

    async def _kill_worker(self) -> dict:
        w, self._worker = self._worker, None
        if w is None:
            return {}
        self._stopped = False
        if self._throttle_timer is not None:
            self._throttle_timer.cancel()
            self._throttle_timer = None
        if self._throttled:  # the next worker joins the same cgroup
            self._cgroup.unthrottle()
            self._throttled = False
        with contextlib.suppress(SandboxError):  # the parent is gone, and its workers with it
            self._pool._send_zygote({"op": "kill", "pid": w.pid})
        w.writer.close()
        try:
            return await asyncio.wait_for(asyncio.shield(w.exited), 10.0)
        except asyncio.TimeoutError:
            raise SandboxError(f"worker {w.pid} did not die after SIGKILL") from None
        finally:
            os.close(w.pidfd)

    async def _run_once(self, code: str) -> ExecResult:
        pool = self._pool
        w = self._worker
        self._run_id += 1
        start = time.perf_counter()
        if self._throttle_timer is not None:
            self._throttle_timer.cancel()
            self._throttle_timer = None
        if self._throttled:
            self._cgroup.unthrottle()
            self._throttled = False
        if self._stopped:
            _signal(w, signal.SIGCONT)
            self._stopped = False
        protocol.write(w.writer, {"op": "run", "id": self._run_id, "code": code,
                                  "timeout_s": pool.timeout_s})  # fmt: skip
        try:
            msg = await asyncio.wait_for(
                self._serve(w, self._run_id), pool.timeout_s + pool.kill_grace_s
            )
            result = _result_from_frame(msg, pool.max_output_chars + _STRING_SLACK)
        except asyncio.TimeoutError:
            await self._kill_worker()
            return ExecResult(
                status="timeout",
                error=(
                    f"TimeoutError: the program was still running {pool.timeout_s:g} s after it "
                    "started and did not stop when interrupted; its interpreter was killed and all "
                    "variables were lost."
                ),
                duration_s=time.perf_counter() - start,
            )
        except (EOFError, ConnectionError) as e:
            return await self._crashed(w, e, start)
        except _Malformed as e:
            return await self._malformed(e, start)
        result = dataclasses.replace(result, duration_s=time.perf_counter() - start)
        tasks = self._cgroup.num_tasks() if self._cgroup is not None else None
        if tasks == 1 and self._cgroup.can_throttle:
            loop = asyncio.get_running_loop()
            self._throttle_timer = loop.call_later(_THROTTLE_DELAY_S, self._throttle, w)
            extra = ""
        elif self._cgroup is not None:
            extra = await self._sweep(w)
        elif msg.get("children_alive"):
            # No cgroup to list them: the pid namespace is the only handle on what is left.
            await self._kill_worker()
            extra = (
                "The program left child processes running, so its interpreter was killed and all "
                "variables were lost."
            )
        else:
            extra = ""
        if extra:
            error = f"{result.error}\n{extra}" if result.error else extra
            status = result.status if result.status != "ok" else "error"
            result = dataclasses.replace(result, status=status, error=error)
        return result

    def _throttle(self, w: _Worker) -> None:
        self._throttle_timer = None
        if self._worker is w and self._cgroup is not None:
            self._cgroup.throttle()
            self._throttled = True

    async def _sweep(self, w: _Worker) -> str:
        """After a run that left more than the interpreter's thread: stop the interpreter (its
        threads included) until the next run, and kill every other process of the session, forked
        or cloned, whatever its exit signal."""
        _signal(w, signal.SIGSTOP)
        self._stopped = True
        killed: set[int] = set()
        for _ in range(_SWEEP_ROUNDS):
            strays = [p for p in self._cgroup.pids() if p != w.pid and not _is_zombie(p)]
            if not strays:
                break
            for pid in strays:
                if _kill_member(pid, self._cgroup):
                    killed.add(pid)
            await asyncio.sleep(0.002)  # SIGKILLed processes leave the cgroup as they exit
        else:
            await self._kill_worker()
            return (
                "The program's processes kept multiplying after it ended, so the session's "
                "interpreter was killed and all variables were lost."
            )
        if not killed:
            return ""
        return (
            f"The program left {len(killed)} process(es) running after it ended; they were "
            "killed (the interpreter and its variables are kept)."
        )

    async def _crashed(self, w: _Worker, cause: Exception, start: float) -> ExecResult:
        # The channel broke: the process died, or the program closed its end. The zygote reports
        # the exit; on a loaded machine, with many sessions starting and ending, that took longer
        # than 0.5 s once (and the error then said "broke its channel" instead of the exit code).
        try:
            info = await asyncio.wait_for(asyncio.shield(w.exited), 2.0)
        except asyncio.TimeoutError:
            info = None
        await self._kill_worker()
        oom = False
        if self._cgroup is not None:
            kills = self._cgroup.oom_kills()
            oom, self._oom_kills = kills > self._oom_kills, kills
        if oom:
            return ExecResult(
                status="memory",
                error=(
                    f"MemoryError: the session's processes used more than their "
                    f"{self._pool.limits.memory_mb} MiB of memory (files in the working "
                    "directory, /tmp and /dev/shm count too), so the interpreter was killed and "
                    "all variables were lost."
                ),
                duration_s=time.perf_counter() - start,
            )
        if info is None:
            how = f"broke its channel to the host ({cause})"
        elif "signal" in info:
            how = f"was killed by {_signal_name(info['signal'])}"
        else:
            how = f"exited with code {info['code']}"
        status = "crashed"
        if info is not None and info.get("signal") == signal.SIGXCPU:
            status, how = "timeout", "used up the session's CPU-time budget"
        return ExecResult(
            status=status,
            error=f"The interpreter process {how}; all variables were lost.",
            duration_s=time.perf_counter() - start,
        )

    async def _malformed(self, cause: Exception, start: float) -> ExecResult:
        """The program forged or garbled a frame: it owns its end of the channel, so the session
        ends here (like the rollout's `sandbox_error`) and later runs on it raise as closed."""
        self._closed = True
        await self._release()
        return ExecResult(
            status="crashed",
            error=(
                f"sandbox_error: the interpreter sent the host a malformed message ({cause}); the "
                "session was ended."
            ),
            duration_s=time.perf_counter() - start,
        )

    async def _serve(self, w: _Worker, run_id: int) -> dict:
        """Answer host-tool calls until the run's result arrives."""
        pool = self._pool
        while True:
            try:
                msg = await protocol.read(w.reader, pool._max_frame_bytes)
            except protocol.ProtocolError as e:
                raise _Malformed(str(e)) from None
            op = msg["op"]
            if op == "result" and msg.get("id") == run_id:
                return msg
            if op != "call":
                raise _Malformed(f"unexpected frame {op[:40]!r} during a run")
            reply = await pool._call_host_tool(_check_call(msg))
            protocol.write(w.writer, reply)
            await w.writer.drain()


def _signal(w: _Worker, sig: int) -> None:
    # SIGSTOP/SIGCONT reach a pid namespace's init from outside it; a dead worker is fine here.
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(w.pidfd, sig)


def _is_zombie(pid: int) -> bool:
    # Dead children the stopped interpreter has not reaped yet (it does at its next run): nothing
    # left to kill, though they stay listed in the cgroup.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # gone already


def _kill_member(pid: int, cg: cgroup.Session) -> bool:
    """SIGKILL `pid` if it is (still) in the session's cgroup. The pidfd pins the process before
    the membership check, so a pid that died and was reused by another process is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        if pid not in cg.pids():
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def _check_call(msg: dict) -> dict:
    """A host-tool call's types, before anything uses them as keys or arguments."""
    call_id, tool = msg.get("id"), msg.get("tool")
    if not isinstance(call_id, str) or not isinstance(tool, str):
        raise _Malformed("a tool call's id and tool name must be strings")
    if not isinstance(msg.get("args"), list) or not isinstance(msg.get("kwargs"), dict):
        raise _Malformed("a tool call's args must be a list and its kwargs an object")
    return msg


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _result_from_frame(msg: dict, max_chars: int) -> ExecResult:
    """Validate what a (possibly hostile) worker claims before it becomes an ExecResult."""
    status = msg.get("status")
    if not isinstance(status, str) or status not in ("ok", "error", "timeout", "memory"):
        raise _Malformed(f"invalid status {str(status)[:40]!r}")

    def text(key: str, optional: bool) -> str | None:
        v = msg.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise _Malformed(f"field {key!r} is not a string")
        v = v.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
        return v[:max_chars]

    return ExecResult(
        status=status,
        stdout=text("stdout", optional=False),
        value=text("value", optional=True),
        error=text("error", optional=True),
        final_answer=text("final_answer", optional=True),
    )


def _remove_session(wd: pathlib.Path, cg: cgroup.Session | None) -> None:
    try:
        _remove_tree(wd)
    finally:
        if cg is not None:
            cg.remove()


def _remove_tree(path: pathlib.Path) -> None:
    """Remove `path` and everything under it, whatever a program left there: a tree thousands of
    levels deep (no recursion, one directory fd open at a time), directories with their
    permissions taken away (made 0700 first), symlinks (removed, never followed: every step is
    relative to a directory fd opened with O_NOFOLLOW). Call it once the session's processes are
    dead, so that nothing moves directories meanwhile and `..` leads back where it came from."""
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    os.chmod(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    names: list[str] = []  # the way down from `path` to fd's directory
    try:
        while True:
            sub = None
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        sub = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if sub is not None:
                os.chmod(sub, 0o700, dir_fd=fd)  # a directory (lstat above), not a symlink
                child = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = child
                names.append(sub)
                continue
            if not names:
                break
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def _safe_name(name: str) -> pathlib.PurePosixPath:
    p = pathlib.PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\x00" in name or name.endswith("/"):
        raise ValueError(f"attachment name {name!r} must be a relative path without '..'")
    return p


class SandboxPool:
    """Sandboxed, persistent Python sessions forked from one pre-warmed parent.

    Args:
      num_workers: programs that may execute at the same time.
      timeout_s: wall-clock limit of one `run`.
      memory_mb: memory a session's processes may use together on top of the pre-warmed
        interpreter's shared pages (a cgroup; files in its tmpfs directories count too). Without a
        cgroup: address space per process (RLIMIT_AS), with a warning at start.
      tools: `registry.Tool`s available in every session (besides `final_answer`).
      authorized_imports: top-level modules the program may import (None: the defaults, "*": all).
      max_output_chars: bound on captured stdout, the last value's repr and the final answer.
      max_processes: tasks (processes and threads) per session.
      max_file_mb, max_open_files: per-process rlimits.
      disk_mb: the session directory's size (a tmpfs of its own), and that of its private /tmp
        and /dev/shm.
      cpu_cores: CPU bandwidth of a session's processes together.
      session_cpu_s: CPU seconds a process may use over its life (a backstop to the wall clock).
      kill_grace_s: time between the in-process interrupt and the kill.
      preload: modules the parent imports once so that sessions start warm.
      root_dir: where session directories go (default: the system temp dir).
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        memory_mb: int,
        *,
        tools: Iterable[registry.Tool] = (),
        authorized_imports: Iterable[str] | None = None,
        max_output_chars: int = 10_000,
        max_processes: int = 64,
        max_file_mb: int = 64,
        max_open_files: int = 256,
        disk_mb: int = 256,
        cpu_cores: float = 1.0,
        session_cpu_s: int = 3600,
        kill_grace_s: float = 1.0,
        preload: Iterable[str] = ("numpy", "pandas"),
        root_dir: str | None = None,
        start_timeout_s: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0 or kill_grace_s <= 0:
            raise ValueError(
                f"timeout_s and kill_grace_s must be > 0, got {timeout_s}, {kill_grace_s}"
            )
        if memory_mb < 16:
            raise ValueError(f"memory_mb must be >= 16, got {memory_mb}")
        if max_output_chars < 100:
            raise ValueError(f"max_output_chars must be >= 100, got {max_output_chars}")
        if disk_mb < 1 or cpu_cores <= 0:
            raise ValueError(f"disk_mb must be >= 1 and cpu_cores > 0, got {disk_mb}, {cpu_cores}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.max_output_chars = max_output_chars
        self.tools = registry.check_unique(tools)
        if authorized_imports is None:
            authorized_imports = worker.DEFAULT_AUTHORIZED_IMPORTS
        elif isinstance(authorized_imports, str):
            raise TypeError("authorized_imports must be a sequence of module names, not a str")
        self.authorized_imports = tuple(authorized_imports)
        self.limits = lockdown.Limits(
            memory_mb=int(memory_mb),
            cpu_s=int(session_cpu_s),
            max_processes=int(max_processes),
            max_file_mb=int(max_file_mb),
            max_open_files=int(max_open_files),
            disk_mb=int(disk_mb),
            cpu_cores=float(cpu_cores),
        )
        # A result holds at most four strings of max_output_chars; anything larger is forged.
        result_bytes = 4 * _ESCAPED_CHAR_BYTES * (max_output_chars + _STRING_SLACK)
        self._max_frame_bytes = result_bytes + _CALL_BYTES
        self.preload = tuple(preload)
        self._root_dir = root_dir
        self._start_timeout_s = start_timeout_s
        self._host_tools = {t.name: t for t in self.tools if t.host}
        self._slots = asyncio.Semaphore(num_workers)
        self._sessions: set[Session] = set()
        self._uids: set[int] = set()
        self._hellos: dict[str, asyncio.Future] = {}
        self._spawns: dict[str, asyncio.Future] = {}
        self._exits: dict[int, asyncio.Future] = {}
        self._next_sid = 0
        self._zygote: asyncio.subprocess.Process | None = None
        self._cgroups: cgroup.Tree | None = None
        self._spare: asyncio.Future | None = None
        self._server: asyncio.AbstractServer | None = None
        self._reader_task: asyncio.Task | None = None
        self.root: pathlib.Path | None = None
        self.capabilities: dict = {}
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> SandboxPool:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        if self._zygote is not None:
            raise RuntimeError("pool already started")
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="toolr1_sbx_", dir=self._root_dir))
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        os.chmod(self.root, 0o711)  # workers may pass through to their own directory, not list it
        self._socket_path = str(self.root / "host.sock")
        self._server = await asyncio.start_unix_server(self._on_connect, path=self._socket_path)
        os.chmod(self._socket_path, 0o600)
        view_root = self.root / "view"  # the workers' filesystem, mounted in the zygote only
        view_root.mkdir(0o755)
        loop = asyncio.get_running_loop()
        self._cgroups, missing = await loop.run_in_executor(
            None, cgroup.Tree.create, "toolr1_sbx_", self.num_workers
        )
        init = {
            "view_root": str(view_root) if os.geteuid() == 0 else "",
            "preload": self.preload,
            "tools": [t for t in self.tools if not t.host],
            "host_tools": [
                {"name": t.name, "signature": t.signature, "doc": t.doc}
                for t in self.tools
                if t.host
            ],
            "authorized_imports": self.authorized_imports,
            "max_output_chars": self.max_output_chars,
        }
        try:
            payload = pickle.dumps(init)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ValueError(
                "in-sandbox tools must pickle (a module-level function or a picklable callable); "
                f"use host=True for closures over host state: {e}"
            ) from None
        boot = (
            f"import sys; sys.path[:] = {[p for p in sys.path if p]!r}; "
            "from toolr1_jax.sandbox import worker; worker.zygote_main()"
        )
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(self.root),
            "TMPDIR": str(self.root),
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self._zygote = await asyncio.create_subprocess_exec(
            sys.executable, "-E", "-s", "-c", boot,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=env, cwd=str(self.root), start_new_session=True,
        )  # fmt: skip
        self._zygote.stdin.write(len(payload).to_bytes(4, "big") + payload)
        await self._zygote.stdin.drain()
        try:
            ready = await asyncio.wait_for(
                protocol.read(self._zygote.stdout), self._start_timeout_s
            )
        except (EOFError, asyncio.TimeoutError):
            raise SandboxError("the sandbox's pre-warmed parent failed to start") from None
        if ready["op"] != "ready":
            raise SandboxError(f"unexpected first message from the parent: {ready}")
        self.capabilities = ready["capabilities"]
        self.capabilities["cgroup"] = sorted(self._cgroups.dirs) if self._cgroups else []
        self._reader_task = asyncio.create_task(self._read_zygote())
        self._warn_unenforced(missing)
        self._start_spare()

    def _warn_unenforced(self, missing_controllers: list[str]) -> None:
        """One warning that names every barrier this host does not give the sessions."""
        caps = self.capabilities
        gaps = []
        if not self._cgroups:
            gaps.append(
                "no cgroup with the memory controller (cgroup v1 or v2, writable by this process): "
                "memory_mb is only an address-space limit per process (RLIMIT_AS), max_processes "
                "only RLIMIT_NPROC of the session's uid, cpu_cores is not enforced, and a run's "
                "leftover processes are found only as children of the interpreter"
            )
        elif missing_controllers:
            what = {"pids": "max_processes across the session", "cpu": "cpu_cores"}
            gaps.append(
                "no cgroup controller for "
                + ", ".join(f"{c} ({what.get(c, c)} not enforced)" for c in missing_controllers)
            )
        if not caps.get("mount_namespace"):
            why = caps.get("mount_error") or "not root"
            gaps.append(
                f"no mount namespace ({why}): no private /tmp or /dev/shm, no disk_mb quota, and "
                "reads are bounded only by Landlock"
            )
        for key, what in (
            ("pid_namespace", "pid namespace"),
            ("net_namespace", "network namespace"),
            ("ipc_namespace", "IPC namespace (SysV IPC shared between sessions)"),
            ("seccomp", "seccomp filter (install pyseccomp and libseccomp2)"),
        ):
            if not caps.get(key):
                gaps.append(f"no {what}")
        if not caps.get("landlock_abi"):
            gaps.append("no Landlock")
        if gaps:
            warnings.warn(
                "SandboxPool: this host does not enforce parts of the sandbox: " + "; ".join(gaps),
                RuntimeWarning,
                stacklevel=3,
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(Exception):
                await (await spare).close()
        results = await asyncio.gather(
            *(s.close() for s in list(self._sessions)), return_exceptions=True
        )
        z = self._zygote
        if z is not None and z.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._send_zygote({"op": "exit"})
                z.stdin.close()
            try:
                await asyncio.wait_for(z.wait(), 10.0)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(z.pid, signal.SIGKILL)
                await z.wait()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        loop = asyncio.get_running_loop()
        if self._cgroups is not None:
            # After the zygote: every worker and every session cgroup is gone by now.
            await loop.run_in_executor(None, self._cgroups.remove)
        if self.root is not None:
            await loop.run_in_executor(None, _remove_tree, self.root)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise SandboxError(f"{len(errors)} session(s) failed to close: {errors[0]!r}")

    # ---------------------------------------------------------------- sessions

    async def open(self, files: Mapping[str, bytes] | None = None) -> Session:
        """A new session whose working directory holds `files` (name -> content)."""
        if self._zygote is None or self._closed:
            raise RuntimeError("the pool is not running (use `async with SandboxPool(...)`)")
        files = dict(files or {})
        names = {name: _safe_name(name) for name in files}
        for name, data in files.items():
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"attachment {name!r} must be bytes, got {type(data).__name__}")
        session = await self._take_spare() or await self._new_session()
        self._sessions.add(session)
        self._start_spare()
        try:
            # With a mount namespace the directory is a tmpfs that exists only in the zygote's
            # namespace (it outlives workers, and unmounting it is the cleanup); the host reaches
            # it through the zygote's root. Nothing of the session has run yet.
            base = session.wd
            if session._dir_mounted:
                base = pathlib.Path(f"/proc/{self._zygote.pid}/root{session.wd}")
            if sum(len(d) for d in files.values()) <= _INLINE_FILES_BYTES:
                _write_files(base, files, names, session._uid)
            else:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, _write_files, base, files, names, session._uid)
        except BaseException:
            self._sessions.discard(session)
            await session.close()
            raise
        return session

    async def _new_session(self) -> Session:
        """A started session with an empty directory, not yet handed out."""
        self._next_sid += 1
        sid = f"s{self._next_sid}"
        wd = self.root / sid
        uid = self._allocate_uid() if self.capabilities.get("root") else None
        loop = asyncio.get_running_loop()
        cg = await loop.run_in_executor(None, self._make_session_dir, sid, wd, uid)
        session = Session(self, sid, wd, uid, cg)
        try:
            await session._start_worker()
        except BaseException:
            await session.close()
            raise
        return session

    def _start_spare(self) -> None:
        # One started session waits for the next `open`: a worker's confinement (cgroup joins,
        # namespaces, the filesystem view) costs milliseconds that an episode need not wait for
        # when sessions open one at a time. Opens that find none start their own, as before.
        if self._spare is None and not self._closed:
            self._spare = asyncio.ensure_future(self._new_session())

    async def _take_spare(self) -> Session | None:
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        try:
            session = await spare  # may still be starting
        except Exception:  # noqa: BLE001 - a failed spare: the caller starts a session itself
            return None
        w = session._worker
        if w is None or w.exited.done():  # its worker died while it waited
            await session.close()
            return None
        return session

    def _make_session_dir(self, sid: str, wd: pathlib.Path, uid: int | None):
        os.mkdir(wd, 0o700)
        if uid is not None:
            os.chown(wd, uid, uid)
        if self._cgroups is None:
            return None
        lim = self.limits
        return self._cgroups.session(sid, lim.memory_mb, lim.max_processes, lim.cpu_cores)

    def _allocate_uid(self) -> int:
        while True:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
            if uid not in self._uids:
                self._uids.add(uid)
                return uid

    def _release(self, session: Session) -> None:
        self._sessions.discard(session)
        self._uids.discard(session._uid)

    @property
    def num_open_sessions(self) -> int:
        return len(self._sessions)

    async def _spawn(self, session: Session, mount_dir: bool) -> _Worker:
        loop = asyncio.get_running_loop()
        token = secrets.token_hex(16)
        sid = session.id
        hello = self._hellos[token] = loop.create_future()
        spawned = self._spawns[sid] = loop.create_future()
        cg = session._cgroup
        self._send_zygote({
            "op": "spawn", "sid": sid, "token": token, "wd": str(session.wd),
            "uid": session._uid, "host_socket": self._socket_path,
            "limits": dataclasses.asdict(self.limits), "mount_wd": mount_dir,
            "cgroup_procs": cg.procs_files if cg else [], "cgroup_memory": cg is not None,
        })  # fmt: skip
        try:
            pid, exited = await asyncio.wait_for(spawned, self._start_timeout_s)
            done, _ = await asyncio.wait(
                [hello, exited], timeout=self._start_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if hello not in done:
                self._send_zygote({"op": "kill", "pid": pid})
                why = f"exited: {exited.result()}" if exited.done() else "timed out"
                raise SandboxError(f"the worker for session {sid} failed to start ({why})")
        finally:
            self._hellos.pop(token, None)
            self._spawns.pop(sid, None)
        reader, writer, isolation = hello.result()
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            writer.close()
            raise SandboxError(f"the worker for session {sid} died as it started") from None
        return _Worker(pid, pidfd, reader, writer, exited, isolation)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            msg = await asyncio.wait_for(protocol.read(reader, 2**16), self._start_timeout_s)
        except (EOFError, asyncio.TimeoutError, protocol.ProtocolError, ConnectionError):
            writer.close()
            return
        fut = self._hellos.get(msg.get("token")) if msg["op"] == "hello" else None
        if fut is None or fut.done():
            writer.close()
            return
        fut.set_result((reader, writer, msg.get("isolation", {})))

    def _send_zygote(self, msg: dict) -> None:
        if self._zygote is None or self._zygote.returncode is not None:
            raise SandboxError("the sandbox's pre-warmed parent is not running")
        self._zygote.stdin.write(protocol.encode(msg))

    async def _read_zygote(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                msg = await protocol.read(self._zygote.stdout)
                if msg["op"] == "spawned":
                    exited = self._exits[msg["pid"]] = loop.create_future()
                    fut = self._spawns.get(msg["sid"])
                    if fut is not None and not fut.done():
                        fut.set_result((msg["pid"], exited))
                elif msg["op"] == "spawn_failed":
                    fut = self._spawns.get(msg["sid"])
                    if fut is not None and not fut.done():
                        fut.set_exception(SandboxError(f"fork failed: {msg['error']}"))
                elif msg["op"] == "exited":
                    fut = self._exits.pop(msg["pid"], None)
                    if fut is not None and not fut.done():
                        fut.set_result({k: v for k, v in msg.items() if k in ("code", "signal")})
        except (EOFError, protocol.ProtocolError):
            pass
        # The parent is gone, and every worker with it: fail whoever waits.
        for fut in self._spawns.values():
            if not fut.done():
                fut.set_exception(SandboxError("the sandbox's pre-warmed parent exited"))
        for fut in self._exits.values():
            if not fut.done():
                fut.set_result({"signal": int(signal.SIGKILL)})

    # ---------------------------------------------------------------- host tools

    async def _call_host_tool(self, msg: dict) -> dict:
        call_id = msg.get("id")
        t = self._host_tools.get(msg.get("tool"))
        if t is None:
            return {"op": "raise", "id": call_id, "error": f"no host tool {msg.get('tool')!r}"}
        args, kwargs = msg.get("args"), msg.get("kwargs")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return {"op": "raise", "id": call_id, "error": "malformed call"}
        try:
            inspect.signature(t.fn).bind(*args, **kwargs)
            if inspect.iscoroutinefunction(t.fn) or inspect.iscoroutinefunction(
                type(t.fn).__call__
            ):
                value = await t.fn(*args, **kwargs)
            else:
                loop = asyncio.get_running_loop()
                value = await loop.run_in_executor(None, functools.partial(t.fn, *args, **kwargs))
        except Exception as e:
            return {"op": "raise", "id": call_id, "error": f"{type(e).__name__}: {e}"}
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = str(value)
        return {"op": "return", "id": call_id, "value": value}


def _write_files(base: pathlib.Path, files: dict, names: dict, uid: int | None) -> None:
    for name, data in files.items():
        path = base / names[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(data))
    if uid is not None:
        for dirpath, _, filenames in os.walk(base):
            os.chown(dirpath, uid, uid)
            for n in filenames:
                os.chown(os.path.join(dirpath, n), uid, uid)
