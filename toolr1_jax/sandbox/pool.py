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
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping

from toolr1_jax.sandbox import lockdown, protocol, worker
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


class SandboxError(RuntimeError):
    """The sandbox failed (not the program it ran): the parent died, a worker never started."""


@dataclasses.dataclass
class _Worker:
    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    exited: asyncio.Future
    isolation: dict


class Session:
    """One episode's interpreter: persistent variables, a private working directory."""

    def __init__(self, pool: SandboxPool, sid: str, wd: pathlib.Path, uid: int | None):
        self._pool = pool
        self.id = sid
        self.wd = wd
        self._uid = uid
        self._worker: _Worker | None = None
        self._lock = asyncio.Lock()
        self._run_id = 0
        self._closed = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """Host pid of the worker process (None between a kill and the next run)."""
        return self._worker.pid if self._worker else None

    @property
    def isolation(self) -> dict:
        """Which barriers the worker reported in force (namespaces, Landlock, uid, audit hooks)."""
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
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            await self._kill_worker()
            await asyncio.get_running_loop().run_in_executor(None, _remove_tree, self.wd)
            self._pool._release(self)

    async def _start_worker(self) -> None:
        self._worker = await self._pool._spawn(self.id, self.wd, self._uid)

    async def _kill_worker(self) -> dict:
        w, self._worker = self._worker, None
        if w is None:
            return {}
        self._pool._send_zygote({"op": "kill", "pid": w.pid})
        w.writer.close()
        try:
            return await asyncio.wait_for(asyncio.shield(w.exited), 10.0)
        except asyncio.TimeoutError:
            raise SandboxError(f"worker {w.pid} did not die after SIGKILL") from None

    async def _run_once(self, code: str) -> ExecResult:
        pool = self._pool
        w = self._worker
        self._run_id += 1
        start = time.perf_counter()
        protocol.write(w.writer, {"op": "run", "id": self._run_id, "code": code,
                                  "timeout_s": pool.timeout_s})  # fmt: skip
        try:
            msg = await asyncio.wait_for(
                self._serve(w, self._run_id), pool.timeout_s + pool.kill_grace_s
            )
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
        except (EOFError, ConnectionError, protocol.ProtocolError) as e:
            return await self._crashed(w, e, start)
        try:
            result = _result_from_frame(msg, pool.max_output_chars + _STRING_SLACK)
        except protocol.ProtocolError as e:
            return await self._crashed(w, e, start)
        result = dataclasses.replace(result, duration_s=time.perf_counter() - start)
        if msg.get("children_alive"):
            await self._kill_worker()
            extra = (
                "The program left child processes running, so its interpreter was killed and all "
                "variables were lost."
            )
            error = f"{result.error}\n{extra}" if result.error else extra
            status = result.status if result.status != "ok" else "error"
            result = dataclasses.replace(result, status=status, error=error)
        return result

    async def _crashed(self, w: _Worker, cause: Exception, start: float) -> ExecResult:
        # The channel broke: the process died, or the program closed or garbled its end.
        try:
            info = await asyncio.wait_for(asyncio.shield(w.exited), 0.5)
        except asyncio.TimeoutError:
            info = None
        await self._kill_worker()
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

    async def _serve(self, w: _Worker, run_id: int) -> dict:
        """Answer host-tool calls until the run's result arrives."""
        while True:
            msg = await protocol.read(w.reader)
            op = msg["op"]
            if op == "result" and msg.get("id") == run_id:
                return msg
            if op != "call":
                raise protocol.ProtocolError(f"unexpected frame {op!r} during a run")
            reply = await self._pool._call_host_tool(msg)
            protocol.write(w.writer, reply)
            await w.writer.drain()


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _result_from_frame(msg: dict, max_chars: int) -> ExecResult:
    """Validate what a (possibly hostile) worker claims before it becomes an ExecResult."""
    status = msg.get("status")
    if status not in ("ok", "error", "timeout", "memory"):
        raise protocol.ProtocolError(f"invalid status {status!r}")

    def text(key: str, optional: bool) -> str | None:
        v = msg.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise protocol.ProtocolError(f"field {key!r} is not a string")
        v = v.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
        return v[:max_chars]

    return ExecResult(
        status=status,
        stdout=text("stdout", optional=False),
        value=text("value", optional=True),
        error=text("error", optional=True),
        final_answer=text("final_answer", optional=True),
    )


def _remove_tree(path: pathlib.Path) -> None:
    def retry_writable(func, p, exc_info):
        # Without root, a program may have left a directory unwritable; make it writable again.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        with contextlib.suppress(FileNotFoundError):
            func(p)

    if path.exists():
        shutil.rmtree(path, onerror=retry_writable)


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
      memory_mb: address space a program may add on top of the pre-warmed interpreter.
      tools: `registry.Tool`s available in every session (besides `final_answer`).
      authorized_imports: top-level modules the program may import (None: the defaults, "*": all).
      max_output_chars: bound on captured stdout, the last value's repr and the final answer.
      max_processes: tasks (processes and threads) per session, when sessions get their own uid.
      max_file_mb, max_open_files: per-process rlimits.
      session_cpu_s: CPU seconds a session may use over its life (a backstop to the wall clock).
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
        )
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
        init = {
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
        self._reader_task = asyncio.create_task(self._read_zygote())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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
        if self.root is not None:
            await asyncio.get_running_loop().run_in_executor(None, _remove_tree, self.root)
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
        self._next_sid += 1
        sid = f"s{self._next_sid}"
        wd = self.root / sid
        uid = self._allocate_uid() if self.capabilities.get("root") else None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _make_workdir, wd, files, names, uid)
        session = Session(self, sid, wd, uid)
        self._sessions.add(session)
        try:
            await session._start_worker()
        except BaseException:
            self._sessions.discard(session)
            await session.close()
            raise
        return session

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

    async def _spawn(self, sid: str, wd: pathlib.Path, uid: int | None) -> _Worker:
        loop = asyncio.get_running_loop()
        token = secrets.token_hex(16)
        hello = self._hellos[token] = loop.create_future()
        spawned = self._spawns[sid] = loop.create_future()
        self._send_zygote({
            "op": "spawn", "sid": sid, "token": token, "wd": str(wd), "uid": uid,
            "host_socket": self._socket_path, "limits": dataclasses.asdict(self.limits),
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
        return _Worker(pid, reader, writer, exited, isolation)

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


def _make_workdir(wd: pathlib.Path, files: dict, names: dict, uid: int | None) -> None:
    os.mkdir(wd, 0o700)
    for name, data in files.items():
        path = wd / names[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(data))
    if uid is not None:
        for dirpath, _, filenames in os.walk(wd):
            os.chown(dirpath, uid, uid)
            for n in filenames:
                os.chown(os.path.join(dirpath, n), uid, uid)
