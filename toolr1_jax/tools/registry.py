"""Tools: typed, documented functions the policy calls from its code, rendered for the prompt.

A tool runs inside the sandbox worker (`host=False`, the default: it must pickle, so a module-level
function or a picklable callable object) or in the host process behind an RPC stub (`host=True`:
for closures over host state such as a search client with credentials; arguments and results
cross the channel as JSON).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import keyword
import textwrap
from collections.abc import Callable, Iterable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    signature: str  # e.g. "search(query: str, k: int = 5) -> str"
    doc: str
    fn: Callable[..., Any]
    host: bool = False
    # A transport that another tool calls (e.g. the host half of an in-sandbox tool): it is
    # served like any tool but left out of the prompt, since the policy has no use for it.
    hidden: bool = False

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        # `@tool` rebinds the function's module-level name to this Tool, so the function itself no
        # longer pickles by reference; the Tool does, under that same name.
        module, qualname = (
            getattr(self.fn, "__module__", None),
            getattr(self.fn, "__qualname__", ""),
        )
        if module and "<locals>" not in qualname and _lookup(module, qualname) is self:
            return _lookup, (module, qualname)
        return Tool, (self.name, self.signature, self.doc, self.fn, self.host, self.hidden)


def _lookup(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _signature_text(name: str, fn: Callable[..., Any]) -> str:
    try:
        sig = inspect.signature(fn, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        sig = inspect.signature(fn)
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.annotation is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if missing:
        raise ValueError(f"tool {name!r}: parameters {missing} have no type annotation")
    if sig.return_annotation is inspect.Signature.empty:
        raise ValueError(f"tool {name!r}: the return type is not annotated")
    return f"{name}{sig}"


def make_tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    doc: str | None = None,
    host: bool = False,
    hidden: bool = False,
) -> Tool:
    """A Tool from any callable; `name` and `doc` default to the function's own."""
    name = name or getattr(fn, "__name__", None)
    if not name or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"tool name {name!r} is not a Python identifier")
    doc = inspect.cleandoc(doc or inspect.getdoc(fn) or "")
    if not doc:
        raise ValueError(f"tool {name!r} has no docstring; the policy needs one to use it")
    return Tool(
        name=name, signature=_signature_text(name, fn), doc=doc, fn=fn, host=host, hidden=hidden
    )


def tool(fn: Callable[..., Any] | None = None, *, host: bool = False, name: str | None = None):
    """Decorator: `@tool` or `@tool(host=True)` turns a typed, documented function into a Tool."""
    if fn is None:
        return lambda f: make_tool(f, name=name, host=host)
    return make_tool(fn, name=name, host=host)


class FinalAnswer(BaseException):
    """Raised by `final_answer` to end the program; a BaseException so `except Exception` in the
    policy's code cannot swallow it."""

    def __init__(self, answer: Any):
        super().__init__(answer)
        self.answer = answer


def _final_answer(answer: Any) -> None:
    """Give the final answer to the task and end the episode. Call it exactly once, with the
    answer itself (a number, a short string, or a comma-separated list), not an explanation."""
    raise FinalAnswer(answer)


final_answer = make_tool(_final_answer, name="final_answer")


def render_tools(tools: Iterable[Tool]) -> str:
    """Python stubs (signature + docstring) of every tool the policy sees, for the prompt."""
    blocks = []
    for t in tools:
        if t.hidden:
            continue
        doc = textwrap.indent(f'"""{t.doc}\n"""', "    ")
        blocks.append(f"def {t.signature}:\n{doc}")
    return "\n\n".join(blocks)


def render_signatures(tools: Iterable[Tool]) -> str:
    """One signature a line, of every tool the policy sees (for short prompts)."""
    return "\n".join(t.signature for t in tools if not t.hidden)


def check_unique(tools: Iterable[Tool]) -> tuple[Tool, ...]:
    tools = tuple(tools)
    for t in tools:
        if not isinstance(t, Tool):
            raise TypeError(f"expected a Tool (use @registry.tool), got {type(t).__name__}")
    names = [t.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tool names must be unique; repeated: {dupes}")
    if "final_answer" in names:
        raise ValueError("final_answer is built in; do not pass it as a tool")
    return tools
