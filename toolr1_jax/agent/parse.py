"""Reading the policy's turns: the code to run, a plain-text answer, or a format error.

The `<code>...</code>` block is the format the prompt asks for; a markdown python block is
accepted as a fallback because instruction-tuned models fall back to it under pressure.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap

# What a turn that has neither code nor an answer gets back, so the model can correct its format.
FORMAT_ERROR_OBSERVATION = """\
Error: your reply contained no code block, so nothing was run.
Reply in this format: a line starting with "Thought:", then the Python code in a block that opens \
with a <code> line and closes with a line holding the closing tag, for example:
Thought: I will print the length of the list.
<code>
print(len(items))
</code>
When you have the answer, call final_answer(answer) inside a code block."""

# The innermost opening tag before the first closing one: a thought may mention "<code>" in prose.
_CODE_BLOCK = re.compile(r"<code>((?:(?!<code>).)*?)</code>", re.DOTALL)
_MARKDOWN_BLOCK = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
# A fence some models put inside <code>...</code> anyway.
_INNER_FENCE = re.compile(r"^\s*```(?:python3?|py)?[ \t]*\n(.*?)\n?```\s*$", re.DOTALL)
# GAIA's own answer convention ("FINAL ANSWER: x"), bold or not.
_TEXT_ANSWER = re.compile(
    r"^[ \t]*(?:\*\*)?final answer(?:\*\*)?[ \t]*:(?:\*\*)?[ \t]*(.+?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """`code` to run, else a `text_answer`; neither means a format error."""

    code: str | None
    text_answer: str | None = None

    @property
    def is_format_error(self) -> bool:
        return self.code is None and self.text_answer is None


def extract_code(text: str) -> str | None:
    """The first `<code>` block's code, else the first markdown python block's; None if neither
    holds any code. Only the first block counts: anything after it was written without seeing
    its output."""
    match = _CODE_BLOCK.search(text)
    if match is not None:
        code = match.group(1)
        inner = _INNER_FENCE.match(code)
        if inner is not None:
            code = inner.group(1)
    else:
        match = _MARKDOWN_BLOCK.search(text)
        if match is None:
            return None
        code = match.group(1)
    code = textwrap.dedent(code).strip("\n").rstrip()
    return code if code.strip() else None


def extract_text_answer(text: str) -> str | None:
    """The last "Final answer: ..." line's answer, or None."""
    answers = _TEXT_ANSWER.findall(text)
    if not answers:
        return None
    return answers[-1].strip("* \t") or None


def parse_turn(text: str, *, accept_text_answer: bool = True) -> ParsedTurn:
    """Code wins over a text answer: the code may compute the answer it talks about."""
    code = extract_code(text)
    if code is not None or not accept_text_answer:
        return ParsedTurn(code=code)
    return ParsedTurn(code=None, text_answer=extract_text_answer(text))
