"""Nothing a session made survives `SandboxPool.close()`; a host without cgroups gets one clear
warning; the pieces the host uses on hostile input (frame decoding, tree removal) hold up alone."""

import asyncio
import os
import pathlib
import warnings

import pytest

from toolr1_jax.sandbox import SandboxPool, cgroup, protocol
from toolr1_jax.sandbox import pool as pool_lib

LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
KEY = 0x20200000


def _uids_of_processes() -> dict[int, int]:
    uids = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    line = next(ln for ln in f if ln.startswith("Uid:"))
                uids[int(entry)] = int(line.split()[1])
            except (OSError, StopIteration):
                continue
    return uids


def _sysv_keys() -> set[int]:
    keys = set()
    for table in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{table}") as f:
            keys |= {int(line.split()[0]) for line in f.read().splitlines()[1:]}
    return keys


async def test_nothing_survives_close():
    pool = SandboxPool(
        num_workers=4, timeout_s=5.0, memory_mb=256, authorized_imports=("*",), preload=()
    )
    await pool.start()
    if not (pool.capabilities["root"] and pool.capabilities["mount_namespace"]):
        await pool.close()
        pytest.skip("needs root: uids, mount namespaces, cgroups")
    sessions = [await pool.open(files={"in.txt": b"attachment"}) for _ in range(3)]
    leave_behind = (
        LIBC + "import os, threading, time\n"
        f"print(libc.shmget({KEY}, 2**20, 0o1666), libc.msgget({KEY + 1}, 0o1666),"
        f" libc.semget({KEY + 2}, 1, 0o1666))\n"
        "open('/dev/shm/left', 'w').write('x')\nopen('/tmp/left', 'w').write('x')\n"
        "os.makedirs('deep/er', exist_ok=True)\nopen('deep/er/file', 'w').write('x')\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    )
    for s in sessions:
        r = await s.run(leave_behind)
        assert r.status == "ok" and "-1" not in r.stdout, r
    # One more process per session that outlives the run by design of the program (and is killed
    # at its end), and one session still mid-run when the pool closes.
    r = await sessions[0].run(LIBC + "import time\nif libc.fork() == 0:\n    time.sleep(60)")
    assert "killed" in r.error, r
    running = asyncio.create_task(sessions[1].run("import time\ntime.sleep(4)"))
    await asyncio.sleep(0.3)

    uids = set(pool._uids)  # the sessions' and the spare's, which the pool started for later
    pids = {s.pid for s in sessions} | {pool._zygote.pid}
    zygote = pool._zygote.pid
    with open(f"/proc/{zygote}/mountinfo") as f:
        mounts_while_open = f.read()
    assert all(str(s.wd) in mounts_while_open for s in sessions)  # the check below means something
    cgroup_dirs = [d for s in sessions for d in s._cgroup.dirs.values()]
    cgroup_dirs += list(pool._cgroups.dirs.values())
    assert all(os.path.isdir(d) for d in cgroup_dirs)
    root = pool.root

    await pool.close()
    await asyncio.gather(running, return_exceptions=True)

    assert not any(os.path.exists(f"/proc/{p}") for p in pids), pids
    leftovers = {p: u for p, u in _uids_of_processes().items() if u in uids}
    assert not leftovers, leftovers
    assert not {KEY, KEY + 1, KEY + 2} & _sysv_keys()
    with open("/proc/self/mountinfo") as f:
        assert str(root) not in f.read()
    assert not [d for d in cgroup_dirs if os.path.exists(d)]
    assert not root.exists()


async def test_a_host_without_cgroups_warns_once_and_still_limits_memory(monkeypatch):
    monkeypatch.setattr(cgroup.Tree, "create", classmethod(lambda cls, *a: (None, ["memory"])))
    pool = SandboxPool(num_workers=2, timeout_s=5.0, memory_mb=128, preload=())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await pool.start()
    try:
        ours = [w for w in caught if "SandboxPool" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        message = str(ours[0].message)
        assert ours[0].category is RuntimeWarning
        assert "no cgroup" in message and "memory_mb" in message and "cpu_cores" in message
        s = await pool.open()
        r = await s.run("x = b'x' * (512 * 2**20)")  # the RLIMIT_AS fallback catches it
        assert r.status == "memory" and "MemoryError" in r.error, r
        assert (await s.run("1 + 1")).value == "2"
        await s.close()
    finally:
        await pool.close()


def test_decode_refuses_deep_nesting_without_raising_recursion():
    deep = b'{"op":"call","args":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(protocol.ProtocolError, match="deeper"):
        protocol.decode(deep)
    shallow_but_over = b'{"op":"x","a":' + b"[" * 40 + b"]" * 40 + b"}"
    with pytest.raises(protocol.ProtocolError, match="deeper than 32"):
        protocol.decode(shallow_but_over)
    assert protocol.decode(b'{"op":"x","a":[[1],{"b":[2]}]}')["a"] == [[1], {"b": [2]}]
    assert protocol.depth({"a": [[1], {"b": [2]}]}) == 4 and protocol.depth(3) == 0


def test_remove_tree_survives_depth_permissions_and_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    victim = tmp_path / "victim"
    victim.mkdir()
    fd = os.open(victim, os.O_RDONLY)
    for _ in range(1500):  # os.makedirs recurses; walk down with directory fds instead
        os.mkdir("d", dir_fd=fd)
        fd, parent = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.close(os.open("bottom.txt", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    os.close(fd)
    (victim / "link_to_outside").symlink_to(outside)
    (victim / "d" / "link_to_file").symlink_to(outside / "keep.txt")
    locked = victim / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "f").write_text("x")
    os.chmod(locked / "inner", 0)
    os.chmod(locked, 0)
    pool_lib._remove_tree(victim)
    assert not victim.exists()
    assert (outside / "keep.txt").read_text() == "keep"
    pool_lib._remove_tree(victim)  # already gone: nothing to do
    single = pathlib.Path(tmp_path / "file")
    single.write_text("x")
    pool_lib._remove_tree(single)
    assert not single.exists()
