"""The pre-warmed parent ("zygote") and the sandboxed interpreter it forks for each session.

The pool starts one zygote per pool as a fresh interpreter with a scrubbed environment. It imports
the heavy modules and builds in-sandbox tools once, builds the workers' filesystem view in a mount
namespace of its own, then forks a worker per session on request. A worker confines itself (its
session's cgroup; new pid, network, IPC and mount namespaces; the view as its root; rlimits; its
own uid without capabilities; Landlock; seccomp; audit hooks) before it touches user code, then
serves `run` requests over a Unix socket to the host. Nothing here trusts the code it runs; the
host trusts nothing a worker sends.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import errno
import gc
import importlib
import importlib.util
import io
import json
import linecache
import os
import pickle
import selectors
import signal
import socket
import sys
import threading
import time
import traceback

from toolr1_jax.sandbox import lockdown, protocol
from toolr1_jax.tools import registry

# Modules the policy may import by default: pure-computation standard library plus the scientific
# stack. Everything that reaches the OS (os, sys, subprocess, socket, ctypes, shutil, signal,
# threading) is left out. This is a policy for well-behaved programs; containment of the rest is
# the OS's job (see lockdown.py), since Python-level import checks are easy to walk around.
DEFAULT_AUTHORIZED_IMPORTS = (
    "array",
    "base64",
    "bisect",
    "calendar",
    "cmath",
    "collections",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "html",
    "itertools",
    "json",
    "math",
    "numbers",
    "operator",
    "pprint",
    "queue",
    "random",
    "re",
    "stat",
    "statistics",
    "string",
    "struct",
    "textwrap",
    "time",
    "typing",
    "unicodedata",
    "uuid",
    "zoneinfo",
    "numpy",
    "pandas",
    "sympy",
    "scipy",
)

_CODE_FILENAME = "<code>"
# Files and directories per tmpfs: bounds the kernel memory a session can pin with empty files.
_MAX_INODES = 65536
_WALL = 0x40000000  # waitpid's __WALL: also children whose exit signal is not SIGCHLD
_MAX_TRACEBACK_FRAMES = 4
_MAX_ERROR_CHARS = 2000


# --------------------------------------------------------------------------------------------------
# The zygote.
# --------------------------------------------------------------------------------------------------


def zygote_main() -> None:
    """Entry point of the pre-warmed parent: fd 0 carries requests, fd 1 carries replies."""
    # The first frame is pickled (tools are Python objects) and comes from the host, before any
    # worker exists; every later frame is JSON.
    init = pickle.loads(_read_exact_fd(0, _read_header_fd(0)))
    for name in init["preload"]:
        importlib.import_module(name)
    tools = init["tools"]
    for t in tools:
        # In-sandbox tools with host-built state (a BM25 index) build it here, once, so every
        # forked worker shares the pages copy-on-write.
        warm = getattr(t.fn, "warm", None)
        if callable(warm):
            warm()
    caps = _probe_capabilities()
    caps["mount_namespace"] = False
    if caps["root"] and init["view_root"]:
        try:
            lockdown.private_mounts()
            dirs, files = _view_paths(init["authorized_imports"], init["preload"])
            caps["view_workdir"] = lockdown.build_view(init["view_root"], dirs, files)
            caps["mount_namespace"] = True
        except OSError as e:
            caps["mount_error"] = str(e)
    caps["seccomp"] = lockdown.seccomp_available()
    seccomp = lockdown.seccomp_filter() if caps["seccomp"] else None
    with contextlib.suppress(OSError):
        lockdown.set_child_subreaper()
    gc.collect()
    gc.freeze()  # keep the warm heap out of the collector so forked children share its pages
    protocol.write_fd(1, protocol.encode({"op": "ready", "capabilities": caps}))
    _Zygote(init, caps, seccomp).serve()


def _read_header_fd(fd: int) -> int:
    return int.from_bytes(_read_exact_fd(fd, 4), "big")


def _read_exact_fd(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 2**20))
        if not chunk:
            raise EOFError("host closed the control channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _probe_capabilities() -> dict:
    """What the kernel lets us do, tried once in throwaway children."""
    caps = {
        "root": os.geteuid() == 0,
        "pid_namespace": False,
        "net_namespace": False,
        "ipc_namespace": False,
        "landlock_abi": lockdown.landlock_abi(),
    }
    try:
        pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pidns_fd = -1
    try:
        if pidns_fd >= 0:
            lockdown.unshare(lockdown.CLONE_NEWPID)
            caps["pid_namespace"] = True
    except OSError:
        pass
    pid = os.fork()
    if pid == 0:
        ok = 0
        for bit, flag in ((1, lockdown.CLONE_NEWNET), (2, lockdown.CLONE_NEWIPC)):
            try:
                lockdown.unshare(flag)
                ok |= bit
            except BaseException:
                pass
        os._exit(ok)
    _, status = os.waitpid(pid, 0)
    ok = os.waitstatus_to_exitcode(status)
    caps["net_namespace"] = ok & 1 == 1
    caps["ipc_namespace"] = ok & 2 == 2
    if caps["pid_namespace"]:
        lockdown.setns(pidns_fd, lockdown.CLONE_NEWPID)
    if pidns_fd >= 0:
        os.close(pidns_fd)
    return caps


class _Zygote:
    def __init__(self, init: dict, caps: dict, seccomp):
        self.init = init
        self.caps = caps
        self.seccomp = seccomp
        self.live: dict[int, str] = {}  # worker pid -> session id, until reaped
        self.pidfds: dict[int, int] = {}
        self.sel: selectors.BaseSelector | None = None
        self.pidns_fd = (
            os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            if caps["pid_namespace"]
            else -1
        )

    def serve(self) -> None:
        # Exits are watched through a pidfd per worker, not SIGCHLD: the host stops and continues
        # workers between runs, and SIGCHLD would wake this loop for each of those, for nothing.
        # Orphans re-parented here (only without pid namespaces) are reaped on the 1 s tick.
        os.set_blocking(0, False)
        frames = protocol.FrameBuffer()
        self.sel = sel = selectors.DefaultSelector()
        sel.register(0, selectors.EVENT_READ, "control")
        running = True
        while running:
            for key, _ in sel.select(timeout=1.0):
                if key.data != "control":
                    continue  # a worker exited: reaped below
                try:
                    data = os.read(0, 2**16)
                except BlockingIOError:
                    continue
                if not data:  # the host is gone: take every worker with us
                    running = False
                    break
                for raw in frames.feed(data):
                    msg = protocol.decode(raw)
                    if msg["op"] == "spawn":
                        self.spawn(msg)
                    elif msg["op"] == "kill":
                        self.kill(msg["pid"])
                    elif msg["op"] == "release":
                        # Unmounting the session's tmpfs frees all of it at once; EINVAL: never
                        # mounted (the session failed before its first worker).
                        with contextlib.suppress(OSError):
                            lockdown.umount(msg["wd"])
                    elif msg["op"] == "exit":
                        running = False
            self.reap()
        for pid in list(self.live):
            self.kill(pid)
        deadline = time.monotonic() + 5.0
        while self.live and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)

    def spawn(self, req: dict) -> None:
        try:
            if req["mount_wd"] and self.caps["mount_namespace"]:
                # In the zygote's namespace, so the directory outlives the session's workers.
                lockdown.mount_session_dir(req["wd"], req["limits"]["disk_mb"], req["uid"],
                                           _MAX_INODES)  # fmt: skip
            if self.pidns_fd >= 0:
                # Each worker is pid 1 of a fresh pid namespace: when it dies the kernel kills
                # everything it started, whatever process group or session those moved to.
                lockdown.setns(self.pidns_fd, lockdown.CLONE_NEWPID)
                lockdown.unshare(lockdown.CLONE_NEWPID)
            pid = os.fork()
        except OSError as e:
            self.reply({"op": "spawn_failed", "sid": req["sid"], "error": str(e)})
            return
        if pid == 0:
            code = 70
            try:
                _worker_main(req, self.init, self.caps, self.seccomp)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        if self.pidns_fd >= 0:
            lockdown.setns(self.pidns_fd, lockdown.CLONE_NEWPID)
        self.live[pid] = req["sid"]
        self.pidfds[pid] = os.pidfd_open(pid)  # cannot fail: an unreaped child keeps its pid
        self.sel.register(self.pidfds[pid], selectors.EVENT_READ, pid)
        self.reply({"op": "spawned", "sid": req["sid"], "pid": pid})

    def kill(self, pid: int) -> None:
        # Only pids we have not reaped: a reaped pid may already belong to someone else.
        if pid in self.live:
            for fn in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    fn(pid, signal.SIGKILL)

    def reap(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            if pid in self.live:
                # Still a zombie, so its group id cannot have been reused: clear stragglers left in
                # its process group (the only containment when pid namespaces are unavailable).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            pidfd = self.pidfds.pop(pid, None)
            if pidfd is not None:
                self.sel.unregister(pidfd)
                os.close(pidfd)
            sid = self.live.pop(pid, None)
            if sid is not None:
                if os.WIFSIGNALED(status):
                    self.reply({"op": "exited", "pid": pid, "signal": os.WTERMSIG(status)})
                else:
                    self.reply({"op": "exited", "pid": pid, "code": os.WEXITSTATUS(status)})

    def reply(self, msg: dict) -> None:
        protocol.write_fd(1, protocol.encode(msg))


# --------------------------------------------------------------------------------------------------
# The worker: confinement, then a read-eval loop.
# --------------------------------------------------------------------------------------------------


def _worker_main(req: dict, init: dict, caps: dict, seccomp) -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    # First, before anything can fork: the session's cgroup ("0" is the writer itself), so every
    # process the session ever has is limited and listed there.
    for path in req["cgroup_procs"]:
        with open(path, "w") as f:
            f.write("0")
    os.setsid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(req["host_socket"])  # as root, before the uid drop: the socket file is 0600
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(max(keep + 1, 3), 1 << 16)
    # Library code that prints outside a run writes to /dev/null (runs swap in a capture).
    sys.stdin = sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115

    limits = lockdown.Limits(**req["limits"])
    uid = req.get("uid")
    view = caps["mount_namespace"]
    report = {
        "pid_namespace": caps["pid_namespace"],
        "net_namespace": caps["net_namespace"],
        "ipc_namespace": caps["ipc_namespace"],
        "mount_namespace": view,
        "cgroup": bool(req["cgroup_procs"]),
        "uid": os.getuid(),
    }
    flags = 0
    if caps["net_namespace"]:
        flags |= lockdown.CLONE_NEWNET
    if caps["ipc_namespace"]:
        # SysV shared memory, queues and semaphores die with the namespace, i.e. with the worker.
        flags |= lockdown.CLONE_NEWIPC
    if view:
        flags |= lockdown.CLONE_NEWNS
    if flags:
        # The probe said these work; failing here fails the spawn rather than running weaker.
        lockdown.unshare(flags)
    if view:
        wd = caps["view_workdir"]
        lockdown.enter_view(init["view_root"], req["wd"], wd, limits.disk_mb, _MAX_INODES)
        writable = [wd, "/tmp", "/dev/shm"]
    else:
        wd = req["wd"]
        os.chdir(wd)
        writable = [wd]
    os.environ.clear()
    os.environ.update(
        PATH="/usr/local/bin:/usr/bin:/bin",
        HOME=wd,
        TMPDIR=wd,
        LANG="C.UTF-8",
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    # A write past RLIMIT_FSIZE should be an OSError in the program, not a silent death.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if uid is None:
        limits = dataclasses.replace(limits, max_processes=0)
    lockdown.apply_rlimits(limits, cap_address_space=not req["cgroup_memory"])
    if uid is not None:
        lockdown.drop_privileges(uid, uid)
        report["uid"] = uid
    report["landlock"] = False
    lockdown.set_no_new_privs()
    if caps["landlock_abi"] > 0:
        # In the view, everything visible may be read: the view holds nothing else.
        readable = None if view else _readable_dirs(init["authorized_imports"], init["preload"])
        with contextlib.suppress(OSError):
            lockdown.landlock_confine(writable, caps["landlock_abi"], readable_dirs=readable)
            report["landlock"] = True
    report["seccomp"] = False
    if seccomp is not None:
        lockdown.seccomp_load_bpf(seccomp)
        report["seccomp"] = True
    conn = _Channel(sock)
    interp = _Interpreter(
        conn,
        tools=init["tools"],
        host_tools=init["host_tools"],
        authorized_imports=init["authorized_imports"],
        max_output_chars=init["max_output_chars"],
    )
    _install_audit_hook([os.path.realpath(p) for p in writable])
    report["audit_hooks"] = True
    conn.send({"op": "hello", "token": req["token"], "isolation": report})
    interp.serve()


def _view_paths(authorized: tuple, preload: tuple) -> tuple[list[str], list[str]]:
    """What a worker may read: the interpreter, the system libraries, and the packages of the
    preloaded and authorized modules wherever they are installed. Not sys.path as a whole: it holds
    the launch script's directory (the checkout, for `python train.py`) and the test directory."""
    dirs = ["/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32"]
    dirs += {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    # This package alone (the worker's own code, for imports a tool makes late), not the checkout
    # around it; a file in it that is not world-readable stays unreadable (no capabilities).
    dirs.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # Public system tables that libraries read lazily (time zones, mimetypes, the loader's cache).
    files = ["/etc/localtime", "/etc/timezone", "/etc/mime.types", "/etc/ld.so.cache"]
    names = set(preload) | (set() if "*" in authorized else set(authorized))
    for name in sorted(names):
        try:
            spec = importlib.util.find_spec(name.partition(".")[0])
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if spec.submodule_search_locations:
            dirs += list(spec.submodule_search_locations)
        elif spec.origin and os.path.isabs(spec.origin):
            files.append(spec.origin)
    return dirs, files


def _readable_dirs(authorized: tuple, preload: tuple) -> list[str]:
    """Landlock's read allowlist where there is no mount namespace (the same paths as the view)."""
    dirs, files = _view_paths(authorized, preload)
    paths = {p for p in dirs + files if os.path.exists(p)}
    paths.update(os.path.realpath(p) for p in list(paths))
    return sorted(paths)


class _Channel:
    """The worker's end of the host socket; frames from host tool replies and run requests."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, msg: dict) -> None:
        with self.lock:
            protocol.send_sock(self.sock, msg)

    def recv(self) -> dict:
        return protocol.recv_sock(self.sock)


class _SoftTimeout(BaseException):
    """Raised into the program by SIGALRM at the time limit; the host kills it shortly after if
    the program is stuck where Python cannot interrupt it."""


class _BoundedText(io.TextIOBase):
    """stdout/stderr for the program: keeps the first `limit` chars and counts the rest, so an
    output flood costs CPU time but never memory."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(room, len(s))
        self.dropped += max(len(s) - max(room, 0), 0)
        return len(s)

    def text(self) -> str:
        out = "".join(self.parts)
        if self.dropped:
            out += f"\n... [{self.dropped} more characters of output dropped]"
        return out


class _HostToolStub:
    """Stands in for a host tool: forwards the call over the channel and waits for the reply."""

    def __init__(self, conn: _Channel, name: str, signature: str, doc: str):
        self._conn = conn
        self.__name__ = name
        self.__qualname__ = name
        self.__doc__ = f"{signature}\n\n{doc}"
        self._next_id = 0

    def __call__(self, *args, **kwargs):
        self._next_id += 1
        call_id = f"{self.__name__}:{self._next_id}"
        msg = {"op": "call", "id": call_id, "tool": self.__name__, "args": args, "kwargs": kwargs}
        try:
            json.dumps(msg)
        except (TypeError, ValueError) as e:
            raise TypeError(f"arguments to {self.__name__} must be JSON values: {e}") from None
        self._conn.send(msg)
        while True:
            reply = self._conn.recv()
            if reply.get("id") != call_id:
                continue  # a late reply to a call that a timeout interrupted
            if reply["op"] == "return":
                return reply["value"]
            raise RuntimeError(f"{self.__name__} failed: {reply.get('error', 'unknown error')}")

    def __repr__(self) -> str:
        return f"<tool {self.__name__}>"


class _Interpreter:
    def __init__(self, conn, *, tools, host_tools, authorized_imports, max_output_chars):
        self.conn = conn
        self.max_output_chars = max_output_chars
        self.authorized = tuple(authorized_imports)
        self.run_count = 0
        safe_builtins = dict(vars(builtins))
        safe_builtins["__import__"] = self._import
        self.namespace: dict = {"__name__": "__main__", "__builtins__": safe_builtins}
        self.namespace["final_answer"] = registry.final_answer.fn
        for t in tools:
            self.namespace[t.name] = t.fn
        for t in host_tools:
            self.namespace[t["name"]] = _HostToolStub(conn, t["name"], t["signature"], t["doc"])

    def _import(self, name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0:
            top = name.partition(".")[0]
            if "*" not in self.authorized and top not in self.authorized:
                raise ImportError(
                    f"import of {name!r} is not allowed; authorized imports: "
                    + ", ".join(sorted(self.authorized))
                )
        return importlib.__import__(name, globals, locals, fromlist, level)

    def serve(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError, protocol.ProtocolError):
                os._exit(0)
            if msg["op"] == "run":
                _reap_children()  # what the host killed after the last run
                result = self.run(msg["code"], float(msg["timeout_s"]))
                result["op"] = "result"
                result["id"] = msg["id"]
                # Only consulted without a cgroup; with one, the host lists the processes itself.
                result["children_alive"] = _reap_children()
                self.conn.send(result)
            # Anything else is a stale host-tool reply after an interrupted call: ignore it.

    def run(self, code: str, timeout_s: float) -> dict:
        self.run_count += 1
        out = _BoundedText(self.max_output_chars)
        result = {"status": "ok", "value": None, "error": None, "final_answer": None}
        filename = f"{_CODE_FILENAME[:-1]}-{self.run_count}>"
        start = time.perf_counter()

        def on_alarm(signum, frame):
            raise _SoftTimeout

        old_stdout, old_stderr = sys.stdout, sys.stderr
        signal.signal(signal.SIGALRM, on_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            sys.stdout = sys.stderr = out
            try:
                body, last = _split_last_expression(code, filename)
                linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
                exec(body, self.namespace)
                if last is not None:
                    value = eval(last, self.namespace)
                    if value is not None:
                        result["value"] = _truncate(repr(value), self.max_output_chars)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except registry.FinalAnswer as e:
            result["final_answer"] = _truncate(_safe_str(e.answer), self.max_output_chars)
        except _SoftTimeout:
            result["status"] = "timeout"
            result["error"] = (
                f"TimeoutError: the program was interrupted after {timeout_s:g} s. Variables "
                "defined so far are kept."
            )
        except MemoryError as e:
            gc.collect()
            result["status"] = "memory"
            result["error"] = _format_error(e, filename, "memory limit reached")
        except SystemExit:
            result["status"] = "error"
            result["error"] = "SystemExit: programs may not exit the interpreter; use final_answer"
        except BaseException as e:
            result["status"] = "error"
            result["error"] = _format_error(e, filename)
        finally:
            sys.stdout, sys.stderr = old_stdout, old_stderr
            signal.setitimer(signal.ITIMER_REAL, 0)
        result["stdout"] = out.text()
        result["duration_s"] = time.perf_counter() - start
        return result


def _split_last_expression(code: str, filename: str):
    """Compile `code`; a trailing expression is compiled apart so its value can be shown."""
    tree = ast.parse(code, filename=filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(body=tree.body.pop().value)
        last = compile(last, filename, "eval")
    return compile(tree, filename, "exec"), last


def _reap_children() -> bool:
    """Reap exited children, whatever their exit signal; True while some still run."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG | _WALL)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _safe_str(x) -> str:
    try:
        return str(x)
    except BaseException as e:  # a hostile __str__
        return f"<unprintable {type(x).__name__}: {type(e).__name__}>"


def _truncate(s: str, limit: int) -> str:
    if len(s) <= limit:
        return s
    return s[:limit] + f"... [{len(s) - limit} more characters]"


def _format_error(e: BaseException, filename: str, note: str = "") -> str:
    """`Type: message` after the last few traceback frames that are the program's own lines."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == filename]
    lines = []
    if isinstance(e, SyntaxError) and e.filename == filename:
        lines.append(f"  line {e.lineno}\n    {(e.text or '').rstrip()}")
    for f in frames[-_MAX_TRACEBACK_FRAMES:]:
        where = f"  line {f.lineno}, in {f.name}"
        lines.append(f"{where}\n    {f.line}" if f.line else where)
    try:
        message = "".join(traceback.format_exception_only(type(e), e)).strip()
    except BaseException:
        message = type(e).__name__
    if note:
        message = f"{message} ({note})"
    text = message
    if lines:
        text = "Traceback (most recent call last):\n" + "\n".join(lines) + "\n" + message
    return _truncate(text, _MAX_ERROR_CHARS)


# --------------------------------------------------------------------------------------------------
# Audit hooks: the Python-level layer, present even where the kernel offers no namespaces.
# --------------------------------------------------------------------------------------------------

_BLOCKED_EVENTS = {
    "os.fork": "creating processes",
    "os.forkpty": "creating processes",
    "os.exec": "running programs",
    "os.posix_spawn": "running programs",
    "os.spawn": "running programs",
    "os.system": "running programs",
    "subprocess.Popen": "running programs",
    "pty.spawn": "running programs",
    "socket.__new__": "network access",
    "socket.connect": "network access",
    "socket.bind": "network access",
    "socket.getaddrinfo": "network access",
    "socket.gethostbyname": "network access",
    "socket.sendto": "network access",
    "os.chroot": "changing the root directory",
}
_PATH_EVENTS = {
    "os.remove": 0,
    "os.rmdir": 0,
    "os.mkdir": 0,
    "os.rename": (0, 1),
    "os.link": (0, 1),
    "os.symlink": 1,
    "os.chmod": 0,
    "os.chown": 0,
    "os.truncate": 0,
    "os.utime": 0,
    "os.mkfifo": 0,
    "os.mknod": 0,
    "shutil.rmtree": 0,
    "shutil.copyfile": 1,
    "shutil.move": 1,
}
_SIGNAL_EVENTS = ("os.kill", "os.killpg", "signal.pthread_kill")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install_audit_hook(writable: list[str]) -> None:
    """`writable[0]` is the working directory; with the filesystem view, /tmp and /dev/shm follow
    (private to the session, so writing there is as harmless as in its directory)."""
    guard = threading.local()
    wd = writable[0]
    prefixes = tuple(p.rstrip("/") + "/" for p in writable)
    own_pid = os.getpid()

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an fd we already hold
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        real = os.path.realpath(os.path.join(wd, os.fspath(path)))
        return real in writable or real.startswith(prefixes)

    def proc_of_other(path) -> bool:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        parts = os.path.normpath(os.path.join(wd, os.fspath(path))).split("/")
        return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit()

    def hook(event: str, args: tuple) -> None:
        if getattr(guard, "active", False):
            return
        guard.active = True
        try:
            reason = _BLOCKED_EVENTS.get(event)
            if reason is None and event == "open":
                path, mode, flags = args
                if path is not None and not isinstance(path, int):
                    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                        isinstance(flags, int) and flags & _WRITE_FLAGS
                    )
                    if writing and not inside(path):
                        reason = f"writing outside the working directory ({path!r})"
                    elif proc_of_other(path):
                        reason = f"reading another process's state ({path!r})"
            elif reason is None and event in _PATH_EVENTS:
                idx = _PATH_EVENTS[event]
                for i in idx if isinstance(idx, tuple) else (idx,):
                    if i < len(args) and args[i] is not None and not inside(args[i]):
                        reason = f"changing files outside the working directory ({args[i]!r})"
            elif reason is None and event in _SIGNAL_EVENTS:
                target = args[0]
                if event == "signal.pthread_kill" or target not in (own_pid, os.getpid()):
                    reason = "signalling other processes"
        finally:
            guard.active = False
        if reason is not None:
            raise PermissionError(errno.EPERM, f"sandbox: {reason} is not permitted")

    sys.addaudithook(hook)
