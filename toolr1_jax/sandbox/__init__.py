"""Sandboxed, persistent Python execution for the code agent (DESIGN section 7). Imports no JAX.

async with SandboxPool(num_workers=8, timeout_s=10, memory_mb=1024) as pool:
    session = await pool.open(files={"data.csv": b"..."})
    result = await session.run("import pandas as pd; pd.read_csv('data.csv').shape")
    await session.close()
"""

from toolr1_jax.sandbox.pool import SandboxError, SandboxPool, Session
from toolr1_jax.sandbox.result import ExecResult, render_observation
from toolr1_jax.sandbox.worker import DEFAULT_AUTHORIZED_IMPORTS

__all__ = [
    "DEFAULT_AUTHORIZED_IMPORTS",
    "ExecResult",
    "SandboxError",
    "SandboxPool",
    "Session",
    "render_observation",
]
