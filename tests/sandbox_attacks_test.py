"""Issue 20's root causes, attacked the way the red team did, all at once against one pool while a
bystander session keeps computing; then the pool must still serve a fresh session.

Every attack here succeeded against the sandbox before issue 20 (checked by running this file
against that code); each test names the root cause it covers. Imports are all authorized and the
attacks go through ctypes, so what stops them is the kernel layer (namespaces, cgroup, seccomp,
the filesystem view), not the audit hooks or the import filter.
"""

import asyncio
import io
import os
import platform
import struct
import sys
import time

import pandas as pd
import pytest
import pytest_asyncio

from toolr1_jax.sandbox import SandboxPool

pytestmark = pytest.mark.asyncio(loop_scope="module")

MEMORY_MB = 256
DISK_MB = 64
TIMEOUT_S = 8.0
SECRET = "toolr1-issue20-secret"
SHM_KEY = 0x20202020
X86_64 = platform.machine() == "x86_64"

LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
UNIX_ADDR = "def addr(path):\n    return struct.pack('H108s', socket.AF_UNIX, path.encode())\n"

# The channel to the host is the only socket object in the worker: find it and write raw frames.
CHANNEL = (
    "import gc, socket, struct\n"
    "ch = next(o for o in gc.get_objects() if isinstance(o, socket.socket))\n"
    "def send_raw(payload):\n"
    "    ch.sendall(struct.pack('!I', len(payload)) + payload)\n"
    "    ch.recv(1)\n"
)


def _static_elf_exit_42() -> bytes:
    """A complete static x86_64 program: exit(42). No loader, no libc, nothing to open."""
    base = 0x400000
    code = bytes(
        [0xBF, 42, 0, 0, 0, 0xB8, 60, 0, 0, 0, 0x0F, 0x05]
    )  # mov edi,42; mov eax,60; syscall
    size = 64 + 56 + len(code)
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        *(
            b"\x7fELF",
            2,
            1,
            1,
            0,
            0,
            b"\0" * 7,
            2,
            0x3E,
            1,
            base + 120,
            64,
            0,
            0,
            64,
            56,
            1,
            0,
            0,
            0,
        ),
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + code


def _peak(session) -> int | None:
    cg = getattr(session, "_cgroup", None)  # None: no cgroup (or the code before issue 20)
    return cg.peak_memory_bytes() if cg else None


def _members(session) -> list[int] | None:
    cg = getattr(session, "_cgroup", None)
    return cg.pids() if cg else None


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _HostSocket:
    """A world-writable Unix socket the host listens on, as a careless service would."""

    def __init__(self):
        self.connections = 0

    async def handle(self, reader, writer):
        self.connections += 1
        writer.close()


# --------------------------------------------------------------------------------------------------
# The attacks. Each returns what it observed; the tests below judge it.
# --------------------------------------------------------------------------------------------------


async def _host_file_reads(pool, ctx):
    """1: a root-only file in an import-path directory, this checkout, a neighbour's 0700 files."""
    a, b = await pool.open(), await pool.open()
    out = {}
    out["import_path_secret"] = await a.run(f"print(open({ctx['secret_file']!r}).read())")
    out["checkout"] = await a.run(f"print(open({os.path.abspath(__file__)!r}).read()[:200])")
    await a.run(f"open('private.txt', 'w').write({SECRET!r} + '-neighbour')")
    out["neighbour_file"] = await b.run(f"print(open({str(a.wd / 'private.txt')!r}).read())")
    out["neighbour_listing"] = await b.run(f"import os\nprint(os.listdir({str(pool.root)!r}))")
    await a.close()
    await b.close()
    return out


async def _unix_socket_between_sessions(pool, ctx):
    """2: one session listens on a pathname socket in its directory, another connects to it."""
    a, b = await pool.open(), await pool.open()
    listen = await a.run(
        LIBC + "import socket, struct\n" + UNIX_ADDR + "srv = libc.socket(socket.AF_UNIX, 1, 0)\n"
        "ad = addr('a.sock')\n"
        "print('bind', libc.bind(srv, ad, len(ad)), 'listen', libc.listen(srv, 8))"
    )
    path = str(a.wd / "a.sock")
    connect = await b.run(
        LIBC + "import socket, struct\n" + UNIX_ADDR + "c = libc.socket(socket.AF_UNIX, 1, 0)\n"
        f"ad = addr({path!r})\nprint('connect', libc.connect(c, ad, len(ad)))"
    )
    accepted = await a.run("print('accept', libc.accept4(srv, None, None, 0x800))")  # NONBLOCK
    await a.close()
    await b.close()
    return {"listen": listen, "connect": connect, "accepted": accepted}


async def _unix_socket_to_host(pool, ctx):
    """2: connect to a world-writable socket the host listens on."""
    s = await pool.open()
    r = await s.run(
        LIBC + "import socket, struct\n" + UNIX_ADDR + "c = libc.socket(socket.AF_UNIX, 1, 0)\n"
        f"ad = addr({ctx['host_socket']!r})\n"
        "print('connect', libc.connect(c, ad, len(ad)), ctypes.get_errno())"
    )
    await s.close()
    return {"connect": r}


async def _inotify_on_neighbour(pool, ctx):
    """2: watch a neighbour's directory and learn the names of the files it creates."""
    a, b = await pool.open(), await pool.open()
    watch = await b.run(
        LIBC + "fd = libc.inotify_init1(0x800)\n"  # IN_NONBLOCK
        f"w = libc.inotify_add_watch(fd, {str(a.wd).encode()!r}, 0x100)\n"  # IN_CREATE
        "print('watch', fd, w, ctypes.get_errno())"
    )
    await a.run("open('name-that-leaks.txt', 'w').close()")
    events = await b.run(
        "buf = ctypes.create_string_buffer(4096)\nn = libc.read(fd, buf, 4096)\n"
        "print('events', n, buf.raw[:max(n, 0)])"
    )
    await a.close()
    await b.close()
    return {"watch": watch, "events": events}


async def _sysv_ipc(pool, ctx):
    """3: SysV shared memory written by one session and read by another; a queue left behind."""
    a, b = await pool.open(), await pool.open()
    shm = (
        LIBC + "libc.shmat.restype = ctypes.c_void_p\n"
        f"sid = libc.shmget({SHM_KEY}, {64 * 2**20}, 0o1666)\n"  # IPC_CREAT | 0666
        "p = libc.shmat(sid, None, 0) if sid >= 0 else None\n"
    )
    write = await a.run(
        shm
        + f"if p and p != ctypes.c_void_p(-1).value:\n    ctypes.memmove(p, {SECRET.encode()!r},"
        f" {len(SECRET)})\n"
        f"print('shm', sid, 'msg', libc.msgget({SHM_KEY + 1}, 0o1666))"
    )
    read = await b.run(
        LIBC + "libc.shmat.restype = ctypes.c_void_p\n"
        f"sid = libc.shmget({SHM_KEY}, 0, 0)\n"
        "p = libc.shmat(sid, None, 0) if sid >= 0 else None\n"
        "ok = p and p != ctypes.c_void_p(-1).value\n"
        f"print('read', sid, ctypes.string_at(p, {len(SECRET)}) if ok else None)"
    )
    await a.close()
    await b.close()
    return {"write": write, "read": read}


async def _forks_past_memory(pool, ctx):
    """4: four forks of 200 MiB each under a 256 MiB memory_mb (a per-process limit passes)."""
    s = await pool.open()
    r = await s.run(
        LIBC + "import os, time\nfor i in range(4):\n    if libc.fork() == 0:\n"
        "        x = b'x' * (200 * 2**20)\n"
        "        libc.close(libc.creat(f'child{i}'.encode(), 0o600))\n"
        "        time.sleep(30)\n"
        "time.sleep(4)\n"
        "print('children holding 200 MiB:', sum(os.path.exists(f'child{i}') for i in range(4)))"
    )
    peak = _peak(s)
    after = await s.run("print('alive')")
    await s.close()
    return {"result": r, "peak": peak, "after": after}


async def _memfd_past_memory(pool, ctx):
    """4: a memfd holding 360 MiB, which RLIMIT_AS does not see."""
    s = await pool.open()
    r = await s.run(
        # 30 memfds of 12 MiB each: every one stays under max_file_mb, so only memory stops them.
        LIBC + "import os\nchunk = b'm' * 2**22\nheld = 0\nfds = []\ntry:\n"
        "    for _ in range(30):\n        fds.append(libc.memfd_create(b'hoard', 0))\n"
        "        for _ in range(3):\n            held += os.write(fds[-1], chunk)\n"
        "finally:\n    print('memfd MiB', held >> 20)"
    )
    peak = _peak(s)
    await s.close()
    return {"result": r, "peak": peak}


async def _many_files(pool, ctx):
    """4: many files, each under max_file_mb, filling the host's disk (160 MiB in 40 files)."""
    s = await pool.open()
    r = await s.run(
        "total = 0\ntry:\n    for i in range(40):\n"
        "        total += open(f'f{i}', 'wb').write(b'z' * 2**22)\n"
        "finally:\n    print('MiB written', total >> 20)"
    )
    on_host = os.listdir(s.wd)  # the session directory as the host's filesystem holds it
    await s.close()
    return {"result": r, "on_host": on_host}


async def _thread_after_run(pool, ctx):
    """4: a background thread keeps burning CPU after its run returned."""
    s = await pool.open()
    r = await s.run(
        "import threading\ndef burn():\n    while True:\n        pass\n"
        "threading.Thread(target=burn, daemon=True).start()\nkept = 'variables'"
    )
    pid = s.pid
    await asyncio.sleep(0.1)  # the host acts on the result at once; let it land
    before = _cpu_seconds(pid)
    await asyncio.sleep(1.5)
    burned = _cpu_seconds(pid) - before
    after = await s.run("kept")
    await s.close()
    return {"result": r, "burned_s": burned, "after": after}


async def _clone_without_exit_signal(pool, ctx):
    """4: a raw clone() child with exit signal 0 (invisible to waitpid) outlives its run."""
    s = await pool.open()
    r = await s.run(
        LIBC + "import time\nchild = libc.syscall(56, 0, 0, 0, 0, 0)\n"  # SYS_clone, flags 0
        "if child == 0:\n    while True:\n        time.sleep(0.05)\nprint('child', child)"
    )
    members = _members(s)
    nxt = await s.run("print('alive', libc.kill(child, 0), ctypes.get_errno())")
    await s.close()
    return {"result": r, "members": members, "worker": s, "next": nxt}


async def _malformed_frames(pool, ctx):
    """5: forged frames on the channel: JSON nested 100k deep, a list as tool name, 16 MiB."""
    out = {}
    frames = {
        "deep": 'b\'{"op":"call","id":"x","tool":"t","args":\' + b\'[\' * 100000 + '
        "b']' * 100000 + b',\"kwargs\":{}}'",
        "list_tool": 'b\'{"op":"call","id":"x","tool":["t"],"args":[],"kwargs":{}}\'',
        "huge": 'b\'{"op":"call","id":"x","tool":"t","args":[\' + b\'0,\' * (8 * 2**20) + '
        "b'0],\"kwargs\":{}}'",
    }
    for name, payload in frames.items():
        s = await pool.open()
        try:
            out[name] = await s.run(CHANNEL + f"send_raw({payload})")
        except Exception as e:  # noqa: BLE001 - recorded: raising into the caller is the bug
            out[name] = e
        out[name + "_closed"] = s.closed
        await s.close()
    return out


async def _deep_tree(pool, ctx):
    """6: 1,500 nested directories, one of them mode 0, and a symlink to / for the cleanup."""
    s = await pool.open()
    r = await s.run(
        "import os\nos.symlink('/', 'escape')\nfor _ in range(1500):\n"
        "    os.mkdir('d')\n    os.chdir('d')\nos.mkdir('locked')\nos.chmod('locked', 0)\n"
        "os.chdir('/')\nprint('built')"
    )
    wd = s.wd
    try:
        await s.close()
        closed = None
    except Exception as e:  # noqa: BLE001 - recorded: close() raising is the bug
        closed = e
    # The parent unmounts the directory when it reads the pool's message: give it a moment.
    for _ in range(200):
        with open(f"/proc/{pool._zygote.pid}/mountinfo") as f:
            zygote_mounts = f.read()
        if str(wd) not in zygote_mounts:
            break
        await asyncio.sleep(0.01)
    return {"result": r, "close_error": closed, "wd": wd, "zygote_mounts": zygote_mounts}


async def _exec_from_memfd(pool, ctx):
    """7: a static ELF written to a memfd and executed (fexecve: execveat with AT_EMPTY_PATH)."""
    s = await pool.open()
    r = await s.run(
        LIBC + "import os\nfd = libc.memfd_create(b'elf', 0)\n"
        f"os.write(fd, {_static_elf_exit_42()!r})\n"
        "argv = (ctypes.c_char_p * 2)(b'x', None)\nenvp = (ctypes.c_char_p * 1)(None)\n"
        "print('fexecve', libc.fexecve(fd, argv, envp), ctypes.get_errno())"
    )
    await s.close()
    return {"result": r}


async def _honest_address_space(pool, ctx):
    """8: honest code that reserves address space it never touches (allocators do), and the
    suite's kind of program, pd.read_excel on an attachment."""
    s = await pool.open(files={"table.xlsx": ctx["xlsx"]})
    out = {
        "numpy_empty": await s.run("import numpy as np\na = np.empty(2**29)\na.nbytes"),
        "mmap": await s.run("import mmap\nm = mmap.mmap(-1, 4 * 2**30)\nlen(m)"),
        "read_excel": await s.run(
            "import pandas as pd\nint(pd.read_excel('table.xlsx')['a'].sum())"
        ),
    }
    await s.close()
    return out


ATTACKS = {
    "host_file_reads": _host_file_reads,
    "unix_socket_between_sessions": _unix_socket_between_sessions,
    "unix_socket_to_host": _unix_socket_to_host,
    "inotify_on_neighbour": _inotify_on_neighbour,
    "sysv_ipc": _sysv_ipc,
    "forks_past_memory": _forks_past_memory,
    "memfd_past_memory": _memfd_past_memory,
    "many_files": _many_files,
    "thread_after_run": _thread_after_run,
    "clone_without_exit_signal": _clone_without_exit_signal,
    "malformed_frames": _malformed_frames,
    "deep_tree": _deep_tree,
    "exec_from_memfd": _exec_from_memfd,
    "honest_address_space": _honest_address_space,
}
X86_64_ONLY = {"clone_without_exit_signal", "exec_from_memfd"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def seen(tmp_path_factory):
    # A directory on the import path, as the launch script's directory is for `python train.py`;
    # the pool's root goes inside it, as it did for a script in /tmp or a TMPDIR in the checkout.
    import_dir = tmp_path_factory.mktemp("import_path")
    os.chmod(import_dir, 0o755)
    secret_file = import_dir / "secret.txt"
    secret_file.write_text(SECRET)
    os.chmod(secret_file, 0o600)
    sock_path = str(import_dir / "service.sock")
    host = _HostSocket()
    server = await asyncio.start_unix_server(host.handle, path=sock_path)
    os.chmod(sock_path, 0o777)
    buf = io.BytesIO()
    pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}).to_excel(buf, index=False)
    ctx = {"secret_file": str(secret_file), "host_socket": sock_path, "xlsx": buf.getvalue()}
    sys.path.append(str(import_dir))
    (import_dir / "pools").mkdir()
    ipc_before = _host_sysv_ids()
    pool = SandboxPool(
        num_workers=32,
        timeout_s=TIMEOUT_S,
        memory_mb=MEMORY_MB,
        disk_mb=DISK_MB,
        max_file_mb=16,
        max_processes=32,
        authorized_imports=("*",),
        preload=("numpy", "pandas", "openpyxl"),
        root_dir=str(import_dir / "pools"),
    )
    try:
        await pool.start()
        os_layers = pool.capabilities["root"] and pool.capabilities["pid_namespace"]
        if not os_layers:
            pytest.skip("these attacks bypass Python; they need the OS layers (root, namespaces)")
        attacks = {k: v for k, v in ATTACKS.items() if X86_64 or k not in X86_64_ONLY}
        bystander = await pool.open()
        assert (await bystander.run("total = 0")).status == "ok"
        done = asyncio.Event()
        gaps = []

        async def keep_computing():
            results = []
            while not done.is_set():
                results.append(await bystander.run("total += 1\ntotal"))
                await asyncio.sleep(0.05)
            return results

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        calm = asyncio.create_task(keep_computing())
        tick = asyncio.create_task(ticker())
        names = list(attacks)
        # An attack that makes the pool raise is recorded, not fatal: its test then fails alone.
        results = await asyncio.gather(
            *(attacks[n](pool, ctx) for n in names), return_exceptions=True
        )
        done.set()
        seen = dict(zip(names, results, strict=True))
        seen["bystander"] = await calm
        await tick
        seen["loop_max_gap_s"] = max(gaps)
        fresh = await pool.open()
        seen["fresh"] = await fresh.run("6 * 7")
        await fresh.close()
        await bystander.close()
        seen["capabilities"] = pool.capabilities
    finally:
        try:
            await pool.close()
            seen_close = None
        except Exception as e:  # noqa: BLE001 - recorded for test_pool_closes_cleanly
            seen_close = e
        sys.path.remove(str(import_dir))
        server.close()
        await server.wait_closed()
    seen["pool_close_error"] = seen_close
    seen["host_connections"] = host.connections
    seen["new_host_ipc"] = _host_sysv_ids() - ipc_before
    yield seen


def _host_sysv_ids() -> set[tuple[str, int, int]]:
    """(table, key, id) of every SysV object in the host's IPC namespace."""
    ids = set()
    for table in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{table}") as f:
            for line in f.read().splitlines()[1:]:
                key, ident = line.split()[:2]
                ids.add((table, int(key), int(ident)))
    return ids


def _stdout_of(r):
    return r.stdout if hasattr(r, "stdout") else repr(r)


# ---- 1. Host file reads ----------------------------------------------------------------------


async def test_1_root_only_file_on_the_import_path_is_not_readable(seen):
    r = seen["host_file_reads"]["import_path_secret"]
    assert SECRET not in r.stdout and r.status == "error", r
    assert "FileNotFoundError" in r.error, r  # not even visible


async def test_1_checkout_is_not_readable(seen):
    r = seen["host_file_reads"]["checkout"]
    assert r.status == "error" and "FileNotFoundError" in r.error, r


async def test_1_neighbours_files_are_not_readable(seen):
    out = seen["host_file_reads"]
    assert SECRET not in out["neighbour_file"].stdout, out["neighbour_file"]
    assert out["neighbour_file"].status == "error", out["neighbour_file"]
    r = out["neighbour_listing"]
    assert r.status == "error" and "FileNotFoundError" in r.error, r


# ---- 2. Channels between sessions and to the host ---------------------------------------------


async def test_2_sessions_cannot_meet_on_a_unix_socket(seen):
    out = seen["unix_socket_between_sessions"]
    assert "bind -1" in out["listen"].stdout, out["listen"]
    assert "connect -1" in out["connect"].stdout, out["connect"]
    assert "accept -1" in out["accepted"].stdout, out["accepted"]


async def test_2_host_unix_socket_is_unreachable(seen):
    r = seen["unix_socket_to_host"]["connect"]
    assert "connect -1" in r.stdout, r
    assert seen["host_connections"] == 0


async def test_2_inotify_shows_nothing_of_a_neighbour(seen):
    out = seen["inotify_on_neighbour"]
    assert "watch -1" in out["watch"].stdout, out["watch"]
    assert "name-that-leaks" not in _stdout_of(out["events"]), out["events"]


# ---- 3. IPC ----------------------------------------------------------------------------------


async def test_3_sysv_shared_memory_is_private_and_dies_with_the_pool(seen):
    out = seen["sysv_ipc"]
    assert out["write"].status == "ok" and "shm -1" not in out["write"].stdout, out["write"]
    assert SECRET not in out["read"].stdout, out["read"]
    assert "read -1" in out["read"].stdout, out["read"]  # no such key in its own namespace
    assert not seen["new_host_ipc"], seen["new_host_ipc"]  # nothing outlived the pool


# ---- 4. Limits per session, not per process --------------------------------------------------


async def test_4_forked_children_share_the_sessions_memory_limit(seen):
    out = seen["forks_past_memory"]
    r = out["result"]
    assert "children holding 200 MiB: 4" not in r.stdout, r
    assert out["peak"] is not None and out["peak"] <= MEMORY_MB * 2**20, out["peak"]
    assert out["after"].status == "ok" and out["after"].stdout == "alive\n", out["after"]


async def test_4_memfd_counts_against_the_memory_limit(seen):
    out = seen["memfd_past_memory"]
    r = out["result"]
    assert "memfd MiB 360" not in r.stdout, r
    assert r.status in ("memory", "error"), r
    assert out["peak"] <= MEMORY_MB * 2**20, out["peak"]


async def test_4_disk_quota_bounds_the_session_directory(seen):
    out = seen["many_files"]
    r = out["result"]
    assert r.status == "error" and "No space left" in r.error, r
    written = int(r.stdout.split()[-1])
    assert written <= DISK_MB, r
    assert out["on_host"] == [], out["on_host"]  # nothing reached the host's disk


async def test_4_a_thread_does_not_burn_cpu_after_its_run(seen):
    out = seen["thread_after_run"]
    assert out["result"].status == "ok", out["result"]
    assert out["burned_s"] < 0.1, out["burned_s"]
    assert out["after"].value == "'variables'", out["after"]  # the interpreter was kept


async def test_4_a_clone_child_without_exit_signal_does_not_survive_the_run(seen):
    if "clone_without_exit_signal" not in seen:
        pytest.skip("x86_64 syscall number")
    out = seen["clone_without_exit_signal"]
    r = out["result"]
    assert "killed" in (r.error or ""), r
    assert "alive -1 3" in out["next"].stdout, out["next"]  # ESRCH: gone, and reaped


# ---- 5. The host side of the tool channel ------------------------------------------------------


@pytest.mark.parametrize("frame", ["deep", "list_tool", "huge"])
async def test_5_malformed_frame_ends_the_session_without_raising(seen, frame):
    r = seen["malformed_frames"][frame]
    assert not isinstance(r, BaseException), r
    assert r.status == "crashed" and "sandbox_error" in r.error, r
    assert seen["malformed_frames"][frame + "_closed"]


async def test_5_no_frame_stalled_the_event_loop(seen):
    # A 16 MiB frame used to be parsed on the loop for 1.4-2.3 s; now its header is enough.
    assert seen["loop_max_gap_s"] < 1.0, seen["loop_max_gap_s"]


# ---- 6. Cleanup ------------------------------------------------------------------------------


async def test_6_deep_tree_odd_permissions_and_symlinks_are_cleaned_up(seen):
    out = seen["deep_tree"]
    assert out["result"].stdout == "built\n", out["result"]
    assert out["close_error"] is None, out["close_error"]
    assert not out["wd"].exists()
    assert str(out["wd"]) not in out["zygote_mounts"]
    assert os.path.isdir("/usr/bin")  # the symlink to / was removed, not followed


# ---- 7. Exec ---------------------------------------------------------------------------------


async def test_7_a_static_elf_in_a_memfd_does_not_execute(seen):
    if "exec_from_memfd" not in seen:
        pytest.skip("an x86_64 program")
    r = seen["exec_from_memfd"]["result"]
    assert r.status == "ok" and "fexecve -1 1" in r.stdout, r  # EPERM, and the worker lives


# ---- 8. The memory limit must not hurt honest code ----------------------------------------------


async def test_8_address_space_reservations_are_not_memory(seen):
    out = seen["honest_address_space"]
    assert (out["numpy_empty"].status, out["numpy_empty"].value) == ("ok", str(2**32)), out
    assert (out["mmap"].status, out["mmap"].value) == ("ok", str(4 * 2**30)), out
    assert (out["read_excel"].status, out["read_excel"].value) == ("ok", "6"), out


# ---- Everyone else ---------------------------------------------------------------------------


async def test_bystander_kept_its_state_throughout(seen):
    results = seen["bystander"]
    assert len(results) >= 10
    assert [r.status for r in results] == ["ok"] * len(results), results
    assert [r.value for r in results] == [str(i) for i in range(1, len(results) + 1)]


async def test_pool_closes_cleanly(seen):
    assert seen["pool_close_error"] is None, seen["pool_close_error"]


async def test_pool_still_serves(seen):
    assert (seen["fresh"].status, seen["fresh"].value) == ("ok", "42"), seen["fresh"]


async def test_every_barrier_was_in_force(seen):
    caps = seen["capabilities"]
    for key in ("pid_namespace", "net_namespace", "ipc_namespace", "mount_namespace", "seccomp"):
        assert caps[key], (key, caps)
    assert set(caps["cgroup"]) == {"memory", "pids", "cpu"}, caps
