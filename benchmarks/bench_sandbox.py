"""Sandbox latency and throughput: session start (p50/p95), `print(1)` round trip, and programs
per second with 64 concurrent sessions.

    python benchmarks/bench_sandbox.py [--sessions 64] [--starts 100]

Goal (issue 4): session start p50 under 20 ms, thanks to the pre-warmed parent. Since issue 20 the
pool keeps one started session ready for the next `open` (confinement costs milliseconds), so a
serial `open` mostly hands that over; "cold start" opens two at once, and one of them has to start
its own worker: that is the cost of a session nobody prepared.
"""

import argparse
import asyncio
import statistics
import time

from toolr1_jax.sandbox import SandboxPool


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main(args):
    t0 = time.perf_counter()
    async with SandboxPool(num_workers=args.workers, timeout_s=10.0, memory_mb=512) as pool:
        boot_s = time.perf_counter() - t0
        print(f"pool start (parent imports numpy, pandas): {boot_s:.2f} s")
        print(f"isolation: {pool.capabilities}")

        starts = []
        for _ in range(args.starts):
            t = time.perf_counter()
            s = await pool.open(files={"data.txt": b"x" * 1024})
            starts.append(time.perf_counter() - t)
            await s.close()
        p50, p95 = _pct(starts, 0.5) * 1e3, _pct(starts, 0.95) * 1e3
        print(f"session start: p50 {p50:.1f} ms  p95 {p95:.1f} ms  (n={len(starts)})")

        cold = []
        for _ in range(max(args.starts // 4, 1)):
            t = time.perf_counter()
            pair = await asyncio.gather(*(pool.open(files={"data.txt": b"x"}) for _ in range(2)))
            cold.append(time.perf_counter() - t)  # the later of the two, which had no spare
            await asyncio.gather(*(x.close() for x in pair))
        c50, c95 = _pct(cold, 0.5) * 1e3, _pct(cold, 0.95) * 1e3
        print(f"cold session start (two at once): p50 {c50:.1f} ms  p95 {c95:.1f} ms")

        s = await pool.open()
        rtts = []
        for _ in range(args.round_trips):
            t = time.perf_counter()
            r = await s.run("print(1)")
            rtts.append(time.perf_counter() - t)
            assert r.stdout == "1\n", r
        await s.close()
        rt50, rt95 = _pct(rtts, 0.5) * 1e3, _pct(rtts, 0.95) * 1e3
        print(f"print(1) round trip: p50 {rt50:.2f} ms  p95 {rt95:.2f} ms")

        t = time.perf_counter()
        sessions = await asyncio.gather(*(pool.open() for _ in range(args.sessions)))
        open_all_s = time.perf_counter() - t

        async def episode(sess):
            for step in range(args.steps):
                r = await sess.run(f"x{step} = sum(range(1000))\nprint(x{step})")
                assert r.status == "ok", r

        t = time.perf_counter()
        await asyncio.gather(*(episode(x) for x in sessions))
        run_s = time.perf_counter() - t
        await asyncio.gather(*(x.close() for x in sessions))
        n = args.sessions * args.steps
        print(
            f"{args.sessions} concurrent sessions: opened in {open_all_s:.2f} s; {n} programs in "
            f"{run_s:.2f} s = {n / run_s:.0f} programs/s"
        )
    print(
        f"RESULT start_p50_ms={p50:.1f} start_p95_ms={p95:.1f} cold_start_p50_ms={c50:.1f} "
        f"cold_start_p95_ms={c95:.1f} goal_p50_ms=20 "
        f"ratio_to_goal={p50 / 20:.2f} rtt_p50_ms={rt50:.2f} "
        f"throughput_programs_per_s={n / run_s:.0f} "
        f"mean_start_ms={statistics.mean(starts) * 1e3:.1f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--starts", type=int, default=100)
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=8)
    asyncio.run(main(parser.parse_args()))
