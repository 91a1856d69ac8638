"""Every text the policy reads: the code-agent system prompt, the task message and observations.

The system prompt and the task message are templates (`AgentConfig` holds them), so a research
variant of the prompt is a config change. Templates name their slots `{tools}` (each tool's stub
with its docstring) or `{tool_signatures}` (one signature per line, for short prompts),
`{authorized_imports}`, and `{question}`, `{files}`; other braces (f-strings, dicts in examples)
are left alone, so the template text needs no escaping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from toolr1_jax.tools import registry

DEFAULT_SYSTEM_PROMPT_TEMPLATE = """\
You are an expert assistant who solves tasks by writing Python code. You work in steps. In each \
step you first explain your reasoning in a line that starts with "Thought:", then you write one \
block of Python code in the format of the example below, and you stop after its closing tag. \
The code is run and what it prints comes back to you in a message that starts with \
"Observation:". Use print() to see intermediate results: only printed output and the value of \
the last expression are shown.

The interpreter keeps its state between steps: variables, functions and imports defined in one \
step are still there in the next. Files attached to the task are in the current working directory.

Example:
Task: What is the sum of the squares of the first 10 positive integers?

Thought: I will compute the sum directly and print it.
<code>
total = sum(i * i for i in range(1, 11))
print(total)
</code>
Observation:
385

Thought: The sum is 385, so I give it as the final answer.
<code>
final_answer(total)
</code>

Besides the Python language, you can call these functions (tools):
{tools}

You may import only these modules: {authorized_imports}.

Rules:
1. Every step has a "Thought:" line and exactly one code block, closed by the </code> tag.
2. Call tools with the arguments they declare; do not guess what they return, print it.
3. Do not repeat a call that already gave you the answer; reuse the variables you stored.
4. When you know the answer, call final_answer(answer) in a code block; the task ends there.

Formatting the final answer (it is compared with the reference answer automatically):
- Give only the answer itself: a number, as few words as possible, or a comma-separated list of \
numbers and/or strings.
- Numbers: write digits without thousands separators and without units such as $ or % unless \
the task asks for them.
- Strings: no articles and no abbreviations (for example city names in full), and write digits \
as numerals unless the task says otherwise.
- Lists: apply the rules above to every element, in the order the task asks for.
"""

DEFAULT_TASK_TEMPLATE = "Task: {question}{files}"

OBSERVATION_PREFIX = "Observation:\n"


def _fill(template: str, values: Mapping[str, str], what: str, required: Sequence[str]) -> str:
    """Fills the template's `{slot}`s; each entry of `required` is a slot name, or a tuple of
    names of which the template must hold at least one."""
    if not isinstance(template, str):
        raise TypeError(f"the {what} template must be a str, got {type(template).__name__}")
    for need in required:
        names = (need,) if isinstance(need, str) else need
        if not any("{" + name + "}" in template for name in names):
            raise ValueError(
                f"the {what} template has no {' or '.join('{' + n + '}' for n in names)} slot; "
                f"its slots are {', '.join('{' + s + '}' for s in values)}"
            )
    # One pass over the known slots only: a value that itself contains "{question}" (say, a
    # tool's docstring) is not substituted again.
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template)


def render_system_prompt(
    template: str, tools: Iterable[registry.Tool], authorized_imports: Sequence[str]
) -> str:
    """The system prompt with the tool stubs (final_answer last) and the importable modules."""
    tools = registry.check_unique(tools) + (registry.final_answer,)
    imports = ", ".join(sorted(authorized_imports)) if authorized_imports else "(none)"
    if "*" in authorized_imports:
        imports = "any module"
    values = {
        "tools": registry.render_tools(tools),
        "tool_signatures": registry.render_signatures(tools),
        "authorized_imports": imports,
    }
    return _fill(template, values, "system prompt", required=(("tools", "tool_signatures"),))


def render_task(template: str, question: str, file_names: Iterable[str] = ()) -> str:
    """The user message that poses the task; `{files}` lists the attachments (empty if none)."""
    names = sorted(file_names)
    files = ""
    if names:
        files = "\n\nAttached files (in the current working directory): " + ", ".join(names)
    return _fill(template, {"question": question, "files": files}, "task", required=("question",))


def build_messages(system_prompt: str, task: str) -> list[dict[str, str]]:
    """The opening conversation: system prompt, then the task."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": task}]


def render_observation(body: str) -> str:
    """The observation message for a program's output (`ExecResult.observation`, already cut to
    size) or for a format error."""
    return OBSERVATION_PREFIX + body
