"""SandboxPool behaviour: persistence, isolation, results, tools, limits, concurrency, cleanup."""

import asyncio
import os
import time

import pytest
import pytest_asyncio

from toolr1_jax.sandbox import SandboxPool
from toolr1_jax.tools import files, registry, search

pytestmark = pytest.mark.asyncio(loop_scope="module")


@registry.tool
def add(a: int, b: int) -> int:
    """Add two integers (runs inside the sandbox)."""
    return a + b + 0 * os.getpid()


HOST_CALLS = []


@registry.tool(host=True)
def lookup(key: str) -> str:
    """Look a key up in host state."""
    HOST_CALLS.append((key, os.getpid()))
    if key == "missing":
        raise KeyError(key)
    return f"value-of-{key}"


@registry.tool(host=True)
async def slow_echo(text: str) -> str:
    """Echo after a pause, asynchronously on the host."""
    await asyncio.sleep(0.05)
    return text.upper()


DOCS = [
    {
        "doc_id": "d1",
        "title": "Zorblat flux",
        "text": "The Zorblat flux capacitor was built in 1987.",
    },
    {"doc_id": "d2", "title": "Quimby river", "text": "The Quimby river is 412 km long."},
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool():
    tools = [add, lookup, slow_echo, search.make_search_tool(DOCS), files.inspect_file_tool]
    async with SandboxPool(
        num_workers=4, timeout_s=2.0, memory_mb=512, kill_grace_s=0.5, tools=tools
    ) as p:
        yield p


async def test_state_persists_within_a_session_and_not_across(pool):
    a, b = await pool.open(), await pool.open()
    r = await a.run("import math\nx = 20\ndef double(v):\n    return 2 * v")
    assert r.status == "ok" and r.value is None and r.stdout == "", r
    r = await a.run("print(math.sqrt(16))\ndouble(x) + 2")
    assert (r.status, r.stdout, r.value) == ("ok", "4.0\n", "42"), r
    r = await b.run("x")
    assert r.status == "error" and "NameError" in r.error, r
    await a.run("open('mine.txt', 'w').write('a')")
    r = await b.run("import pathlib\nsorted(p.name for p in pathlib.Path('.').iterdir())")
    assert r.status == "error", r  # pathlib is not authorized by default
    r = await b.run("open('mine.txt').read()")
    assert r.status == "error" and "FileNotFoundError" in r.error, r
    await a.close()
    await b.close()
    assert not a.wd.exists() and not b.wd.exists()


async def test_attachments_final_answer_and_errors(pool):
    s = await pool.open(files={"data.csv": b"a,b\n1,2\n3,4\n", "sub/notes.txt": b"hi"})
    r = await s.run("import pandas as pd\ndf = pd.read_csv('data.csv')\nint(df['b'].sum())")
    assert (r.status, r.value) == ("ok", "6"), r
    assert (await s.run("open('sub/notes.txt').read()")).value == "'hi'"
    r = await s.run("print('thinking')\nfinal_answer(df['a'].sum())\nprint('not reached')")
    assert (r.status, r.stdout, r.final_answer) == ("ok", "thinking\n", "4"), r
    r = await s.run("try:\n    final_answer('x')\nexcept Exception:\n    pass")
    assert r.final_answer == "x", r  # final_answer cannot be swallowed by `except Exception`
    r = await s.run("y = 1\n\ndef f():\n    return 1 / 0\n\nf()")
    assert r.status == "error", r
    assert "ZeroDivisionError" in r.error and "line 4, in f" in r.error and "1 / 0" in r.error
    r = await s.run("def broken(:\n    pass")
    assert r.status == "error" and "SyntaxError" in r.error, r
    r = await s.run("import os")
    assert r.status == "error" and "not allowed" in r.error, r
    r = await s.run("import sys\nsys.exit(3)")
    assert r.status == "error", r
    assert (await s.run("y")).value == "1"
    await s.close()


async def test_timeouts_keep_or_lose_variables_and_say_so(pool):
    s = await pool.open()
    await s.run("kept = 'yes'")
    r = await s.run("import time\ntime.sleep(30)")
    assert r.status == "timeout" and "kept" in r.error and r.duration_s < 2.5, r
    assert (await s.run("kept")).value == "'yes'"
    pid = s.pid
    start = time.perf_counter()
    r = await s.run("import collections, itertools\ncollections.deque(itertools.count(), maxlen=0)")
    assert r.status == "timeout" and "lost" in r.error, r
    assert time.perf_counter() - start < 2.0 + 0.5 + 1.0
    r = await s.run("kept")
    assert r.status == "error" and "NameError" in r.error, r
    assert "lost" in r.notice and "lost" in r.observation(1000)
    assert s.pid != pid and not os.path.exists(f"/proc/{pid}/status")
    assert (await s.run("kept = 1\nkept")).notice == ""
    await s.close()


async def test_tools_in_sandbox_and_on_host(pool):
    s = await pool.open()
    r = await s.run("add(40, 2), os_pid_differs")
    assert r.status == "error" and "NameError" in r.error  # tools only, no stray names
    r = await s.run("add(40, 2)")
    assert (r.status, r.value) == ("ok", "42"), r
    HOST_CALLS.clear()
    r = await s.run("v = lookup('k1')\nprint(v)\nslow_echo('abc')")
    assert (r.status, r.stdout, r.value) == ("ok", "value-of-k1\n", "'ABC'"), r
    assert [("k1", os.getpid())] == HOST_CALLS  # ran in this (host) process
    r = await s.run("lookup('missing')")
    assert r.status == "error" and "KeyError" in r.error, r
    r = await s.run("lookup(object())")
    assert r.status == "error" and "JSON" in r.error, r
    r = await s.run("lookup('a', 'b')")
    assert r.status == "error" and "TypeError" in r.error, r
    r = await s.run("print(search('Zorblat capacitor', k=1))")
    assert r.status == "ok" and "Zorblat flux" in r.stdout and "Quimby" not in r.stdout, r
    r = await s.run("inspect_file")
    assert r.status == "ok" and "inspect_file" in r.value
    await s.close()


async def test_num_workers_bounds_concurrency_without_blocking_the_loop(pool):
    already_open = pool.num_open_sessions
    sessions = [await pool.open() for _ in range(8)]
    ticks = []

    async def ticker():
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    start = time.perf_counter()
    results = await asyncio.gather(*(s.run("import time\ntime.sleep(0.4)") for s in sessions))
    elapsed = time.perf_counter() - start
    task.cancel()
    assert all(r.status == "ok" for r in results)
    assert elapsed >= 0.8  # 8 programs, 4 at a time
    # The event loop kept running meanwhile: no pause between ticks comes near one program's
    # 0.4 s, which a run that blocked the loop would show. (A count of ticks would also measure
    # how busy the machine is: on a loaded CI box 10 ms sleeps took 20 ms.)
    gaps = [b - a for a, b in zip([start, *ticks], [*ticks, start + elapsed], strict=True)]
    assert max(gaps) < 0.2, (max(gaps), len(ticks))
    for s in sessions:
        await s.close()
    assert pool.num_open_sessions == already_open


async def test_isolation_layers_in_force(pool):
    s = await pool.open()
    iso = s.isolation
    caps = pool.capabilities
    assert iso["audit_hooks"]
    if caps["root"]:
        assert iso["uid"] != 0
    if caps["net_namespace"]:
        assert iso["net_namespace"]
    if caps["landlock_abi"] > 0:
        assert iso["landlock"]
    await s.close()


async def test_bad_input_is_rejected_clearly(pool):
    with pytest.raises(ValueError, match="relative path"):
        await pool.open(files={"../escape.txt": b"x"})
    with pytest.raises(TypeError, match="bytes"):
        await pool.open(files={"a.txt": "text"})
    s = await pool.open()
    with pytest.raises(TypeError, match="str"):
        await s.run(b"print(1)")
    await s.close()
    with pytest.raises(RuntimeError, match="closed"):
        await s.run("1")


async def test_closing_the_pool_leaves_no_process_or_directory():
    p = SandboxPool(num_workers=2, timeout_s=2.0, memory_mb=256, preload=())
    await p.start()
    sessions = [await p.open(files={"f.txt": b"x"}) for _ in range(3)]
    await sessions[0].run("t = 1")
    pids = [s.pid for s in sessions] + [p._zygote.pid]
    root = p.root
    await p.close()
    assert not root.exists()
    assert all(not os.path.exists(f"/proc/{pid}/status") for pid in pids)
