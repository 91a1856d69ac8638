"""GAIA's exact scorer on a table of cases covering each branch and its traps."""

import pytest

from toolr1_jax.rewards import gaia_scorer

# (model_answer, ground_truth, expected, why)
CASES = [
    # --- number branch: the ground truth parses as a float ---
    ("1000", "1000", True, "plain number"),
    ("$1,000", "1000", True, "dollar sign and thousands separator are dropped"),
    ("1,000", "1000", True, "thousands separator in the answer is dropped"),
    ("1000.0", "1000", True, "compared as floats"),
    ("17", "17.0", True, "ground truth with a decimal point"),
    ("50%", "50", True, "percent sign is dropped"),
    ("5 %", "5", True, "float() tolerates the space left after dropping %"),
    ("  17  ", "17", True, "surrounding whitespace is tolerated by float()"),
    ("1e3", "1000", True, "scientific notation parses"),
    ("1_000", "1000", True, "float() accepts digit-group underscores"),
    ("0.1", "0.10", True, "trailing zero in the ground truth"),
    ("-3", "-3", True, "negative number"),
    ("3", "-3", False, "sign matters"),
    ("3.14", "3.14159", False, "no tolerance: floats must be equal"),
    ("17 hours", "17", False, "units other than $ and % make the answer unparseable"),
    ("seventeen", "17", False, "number words are not parsed"),
    ("€5", "5", False, "only $, % and , are removed"),
    ("", "0", False, "empty answer is unparseable"),
    (None, "0", False, "None becomes the string 'None', unparseable"),
    ("abc", "inf", False, "an unparseable answer is wrong even against inf"),
    ("1.000", "1", True, "a dot is a decimal point, not a separator"),
    # --- list branch: ground truth is not a float and holds ',' or ';' ---
    ("1000", "1,000", False, "'1,000' as ground truth is a two-item list"),
    ("1,000", "1,000", True, "items '1' and '000' compare numerically"),
    ("1, 000", "1,000", True, "numeric items tolerate whitespace"),
    ("apple, banana", "apple, banana", True, "identical list"),
    ("banana, apple", "apple, banana", False, "lists are order-sensitive"),
    ("Apple,Banana", "apple, banana", True, "items lose whitespace and case"),
    ("apple; banana", "apple, banana", True, "',' and ';' are interchangeable"),
    ("apple, banana, cherry", "apple, banana", False, "item counts must match"),
    ("apple banana", "apple, banana", False, "a space is not a separator"),
    ("a.b, c", "ab, c", False, "punctuation is kept inside list items"),
    ("St. Louis, Paris", "st. louis, paris", True, "punctuation kept, case ignored"),
    ("2, 3.0, $4", "2, 3, 4", True, "numeric items are normalised like numbers"),
    ("2, three", "2, 3", False, "numeric item must parse"),
    ("2, 3", "2, three", False, "string item compared as a string"),
    ("1, 2,", "1, 2", False, "a trailing separator adds an empty item"),
    ("1, 2,", "1, 2,", True, "empty items compare equal"),
    (None, "a, b", False, "None against a list"),
    ("the cat, dog", "cat, dog", False, "articles are not removed in lists"),
    ("x;y;z", "x; y; z", True, "semicolon lists"),
    # --- string branch ---
    ("Paris", "paris", True, "case-insensitive"),
    ("sea gull", "seagull", True, "all whitespace removed"),
    ("Paris.", "Paris", True, "ASCII punctuation removed"),
    ("The Paris", "Paris", False, "articles are not removed"),
    ("St Louis", "St. Louis", True, "punctuation in the ground truth removed too"),
    ("Pairs", "Paris", False, "different string"),
    (None, "None", True, "None is scored as the string 'None'"),
    ("none", "None", True, "'none' equals None's string"),
    ("\u201cParis\u201d", "Paris", False, "typographic quotes are not ASCII punctuation"),
    ("17", "17 hours", False, "'17 hours' as ground truth is a string"),
    ("17hours", "17 hours", True, "whitespace removal joins the words"),
    ("\u00dcN\u00cfCODE", "\u00fcn\u00efcode", True, "non-ASCII letters are lowercased"),
    ("a\tb\nc", "abc", True, "tabs and newlines are whitespace"),
    ("A-B", "AB", True, "hyphen is punctuation"),
    ("x", "", False, "empty ground truth only matches empty text"),
    ("!!!", "", True, "punctuation-only answer normalises to empty"),
]


@pytest.mark.parametrize(
    ("model_answer", "ground_truth", "expected"),
    [c[:3] for c in CASES],
    ids=[f"{i:02d}-{c[3]}" for i, c in enumerate(CASES)],
)
def test_question_scorer_table(model_answer, ground_truth, expected):
    assert gaia_scorer.question_scorer(model_answer, ground_truth) is expected


def test_table_covers_each_branch():
    def branch(ground_truth):
        try:
            float(ground_truth)
            return "number"
        except ValueError:
            return "list" if ("," in ground_truth or ";" in ground_truth) else "string"

    counts = {"number": 0, "list": 0, "string": 0}
    for _, truth, _, _ in CASES:
        counts[branch(truth)] += 1
    assert len(CASES) >= 40
    assert all(n >= 10 for n in counts.values()), counts
    # Every branch has both outcomes in the table.
    for name in counts:
        outcomes = {e for _, t, e, _ in CASES if branch(t) == name}
        assert outcomes == {True, False}, name


def test_rejects_non_string_inputs():
    with pytest.raises(TypeError, match="ground_truth must be a str"):
        gaia_scorer.question_scorer("1", None)
    with pytest.raises(TypeError, match="model_answer must be a str or None"):
        gaia_scorer.question_scorer(17, "17")
