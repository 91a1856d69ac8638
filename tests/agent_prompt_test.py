"""The code agent's prompt: tool stubs, imports, the task message and the chat rendering."""

import pytest
import transformers

from tests import helpers
from toolr1_jax.agent import parse, prompt
from toolr1_jax.tools import registry


@registry.tool
def word_count(text: str) -> int:
    """Number of whitespace-separated words in `text`."""
    return len(text.split())


def test_system_prompt_renders_tools_imports_and_final_answer():
    text = prompt.render_system_prompt(
        prompt.DEFAULT_SYSTEM_PROMPT_TEMPLATE, [word_count], ["re", "math"]
    )
    assert "def word_count(text: str) -> int:" in text
    assert "Number of whitespace-separated words" in text
    assert "def final_answer(answer: Any) -> None:" in text
    assert "You may import only these modules: math, re." in text
    # The instructions the issue requires: format, persistence, answer formatting.
    for needle in ("Thought:", "<code>", "</code>", "keeps its state", "comma-separated list"):
        assert needle in text
    assert "{tools}" not in text and "{authorized_imports}" not in text
    # The example turn in the prompt is itself parseable.
    assert parse.extract_code(text) == "total = sum(i * i for i in range(1, 11))\nprint(total)"


def test_prompt_template_is_a_config_value():
    template = "Tools:\n{tools}\nImports: {authorized_imports}\nUse {x: 1} freely."
    text = prompt.render_system_prompt(template, [word_count], ["*"])
    # Unknown braces stay as written; only the known slots are filled.
    assert text.endswith("Imports: any module\nUse {x: 1} freely.")
    with pytest.raises(ValueError, match=r"no \{tools\} or \{tool_signatures\} slot"):
        prompt.render_system_prompt("Be helpful.", [], ["math"])


def test_short_prompts_list_tool_signatures_only():
    text = prompt.render_system_prompt("Tools:\n{tool_signatures}\nGo.", [word_count], ["math"])
    assert text == (f"Tools:\n{word_count.signature}\n{registry.final_answer.signature}\nGo.")
    assert word_count.doc.strip().splitlines()[0] not in text


def test_tools_must_be_unique_and_final_answer_is_builtin():
    with pytest.raises(ValueError, match="repeated"):
        prompt.render_system_prompt("{tools}", [word_count, word_count], [])
    with pytest.raises(ValueError, match="built in"):
        prompt.render_system_prompt("{tools}", [registry.final_answer], [])


def test_task_message_lists_attachments():
    assert prompt.render_task(prompt.DEFAULT_TASK_TEMPLATE, "How many rows?") == (
        "Task: How many rows?"
    )
    text = prompt.render_task(prompt.DEFAULT_TASK_TEMPLATE, "Sum it.", ["b.csv", "a.txt"])
    assert text == (
        "Task: Sum it.\n\nAttached files (in the current working directory): a.txt, b.csv"
    )
    # A question that happens to contain a slot name is not substituted again.
    assert prompt.render_task("{question}", "What is {files}?") == "What is {files}?"
    with pytest.raises(ValueError, match=r"no \{question\} slot"):
        prompt.render_task("Solve it.", "q")


def test_messages_render_through_the_chat_template(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(helpers.make_chatml_tokenizer_dir(tmp_path))
    system = prompt.render_system_prompt(prompt.DEFAULT_SYSTEM_PROMPT_TEMPLATE, [word_count], [])
    messages = prompt.build_messages(system, prompt.render_task("{question}", "Count words."))
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        "<|im_start|>user\nCount words.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.render_observation("42") == "Observation:\n42"
