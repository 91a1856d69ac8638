"""Code extraction and format errors of the agent's turns."""

import pytest

from toolr1_jax.agent import parse


def test_code_block_is_extracted_without_the_thought():
    text = "Thought: add them.\n<code>\nx = 1 + 2\nprint(x)\n</code>"
    assert parse.extract_code(text) == "x = 1 + 2\nprint(x)"
    assert parse.parse_turn(text) == parse.ParsedTurn(code="x = 1 + 2\nprint(x)")


def test_only_the_first_code_block_counts():
    # A second block was written before the first one's output was seen.
    text = "<code>\na = 1\n</code>\nObservation:\n1\n<code>\nfinal_answer(a)\n</code>"
    assert parse.extract_code(text) == "a = 1"


def test_markdown_block_is_the_fallback():
    text = "Thought: compute.\n```python\nprint(6 * 7)\n```\nDone."
    assert parse.extract_code(text) == "print(6 * 7)"
    assert parse.extract_code("```py\nx = 2\n```") == "x = 2"
    # A fence that is not python is prose, not code to run.
    assert parse.extract_code("```text\nhello\n```") is None


def test_code_block_wins_over_markdown_and_inner_fences_are_stripped():
    text = "```python\nprint('md')\n```\n<code>\n```python\nprint('tag')\n```\n</code>"
    assert parse.extract_code(text) == "print('tag')"


def test_indented_code_is_dedented():
    assert parse.extract_code("<code>\n    x = 1\n    if x:\n        print(x)\n</code>") == (
        "x = 1\nif x:\n    print(x)"
    )


@pytest.mark.parametrize(
    "text",
    [
        "I think the answer is 42.",
        "<code>\n   \n</code>",  # an empty block runs nothing
        "<code>\nx = 1\n",  # cut before </code> (length limit): incomplete code is not run
        "",
    ],
)
def test_turns_without_code_are_format_errors(text):
    parsed = parse.parse_turn(text)
    assert parsed.code is None
    assert parsed.is_format_error


def test_text_answer_is_accepted_only_without_code():
    assert parse.parse_turn("Thought: done.\nFINAL ANSWER: Paris") == parse.ParsedTurn(
        code=None, text_answer="Paris"
    )
    assert parse.parse_turn("**Final Answer:** 3, 4").text_answer == "3, 4"
    # The last stated answer is the one given.
    assert parse.extract_text_answer("Final answer: 1\nFinal answer: 2") == "2"
    with_code = parse.parse_turn("Final answer: 7\n<code>\nfinal_answer(7)\n</code>")
    assert with_code == parse.ParsedTurn(code="final_answer(7)")
    strict = parse.parse_turn("FINAL ANSWER: Paris", accept_text_answer=False)
    assert strict.is_format_error


def test_format_error_observation_shows_the_expected_format():
    msg = parse.FORMAT_ERROR_OBSERVATION
    assert "Thought:" in msg and "<code>" in msg and "</code>" in msg
    assert "final_answer" in msg
    # The example in the message is itself a well-formed turn.
    assert parse.extract_code(msg) == "print(len(items))"


def test_a_tag_mentioned_in_the_thought_does_not_swallow_the_block():
    text = "Thought: I will write a <code> block.\n<code>\nprint(1)\n</code>"
    assert parse.extract_code(text) == "print(1)"
