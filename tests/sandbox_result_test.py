"""ExecResult and SandboxPool argument checks (no processes started)."""

import pytest

from toolr1_jax.sandbox import DEFAULT_AUTHORIZED_IMPORTS, ExecResult, SandboxPool
from toolr1_jax.tools import registry


@registry.tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        SandboxPool(num_workers=0, timeout_s=1, memory_mb=256)
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxPool(num_workers=1, timeout_s=0, memory_mb=256)
    with pytest.raises(TypeError, match="authorized_imports"):
        SandboxPool(num_workers=1, timeout_s=1, memory_mb=256, authorized_imports="numpy")
    with pytest.raises(ValueError, match="unique"):
        SandboxPool(num_workers=1, timeout_s=1, memory_mb=256, tools=[add, add])
    assert "numpy" in DEFAULT_AUTHORIZED_IMPORTS and "os" not in DEFAULT_AUTHORIZED_IMPORTS


def test_observation_rendering():
    r = ExecResult(status="ok", stdout="hello\n", value="42")
    assert r.observation(1000) == "hello\nOut: 42"
    r = ExecResult(status="error", stdout="partial\n", error="NameError: name 'x' is not defined")
    assert r.observation(1000) == "partial\nError: NameError: name 'x' is not defined"
    assert ExecResult(status="ok").observation(1000) == "(no output)"
    long = ExecResult(status="ok", stdout="a" * 5000 + "END")
    obs = long.observation(300)
    assert len(obs) <= 300 and obs.startswith("aaa") and obs.endswith("END") and "cut" in obs
    with pytest.raises(ValueError, match="status"):
        ExecResult(status="fine")
