"""GAIA's exact-match scorer: the ground truth picks a number, list or string comparison.

Reimplements the rules of the official GAIA scorer (see issue 6 for the precise statement).
Imports no JAX.
"""

from __future__ import annotations

import re
import string

# Only ASCII punctuation is stripped in the string branch, as in GAIA's scorer: a model answer
# with typographic quotes or dashes does not match a ground truth with ASCII ones.
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_LIST_SEPARATORS = re.compile(r"[,;]")
_WHITESPACE = re.compile(r"\s")


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _as_number(text: str) -> float | None:
    """The answer as a float after dropping unit and grouping characters, or None."""
    for char in "$%,":
        text = text.replace(char, "")
    try:
        return float(text)
    except ValueError:
        return None


def _numbers_equal(model_answer: str, ground_truth: str) -> bool:
    # An unparseable answer is wrong even against an "inf" ground truth (GAIA's reference code
    # maps unparseable answers to inf, which would make any text match "inf").
    value = _as_number(model_answer)
    return value is not None and value == float(ground_truth)


def _normalize(text: str, *, remove_punct: bool) -> str:
    # Removing all whitespace (not just collapsing it) makes "sea gull" equal "seagull".
    text = _WHITESPACE.sub("", text).lower()
    return text.translate(_PUNCT_TABLE) if remove_punct else text


def question_scorer(model_answer: str | None, ground_truth: str) -> bool:
    """True when `model_answer` matches `ground_truth` under GAIA's rules.

    The ground truth decides the branch: a number (it parses as a float), a list (it contains
    "," or ";"), otherwise a string. A `None` answer is scored as the string "None".
    """
    if not isinstance(ground_truth, str):
        raise TypeError(
            f"question_scorer: ground_truth must be a str, got {type(ground_truth).__name__} "
            f"({ground_truth!r})."
        )
    if model_answer is None:
        model_answer = "None"
    if not isinstance(model_answer, str):
        raise TypeError(
            f"question_scorer: model_answer must be a str or None, got "
            f"{type(model_answer).__name__} ({model_answer!r})."
        )

    if _parses_as_float(ground_truth):
        return _numbers_equal(model_answer, ground_truth)

    if _LIST_SEPARATORS.search(ground_truth):
        truth_items = _LIST_SEPARATORS.split(ground_truth)
        answer_items = _LIST_SEPARATORS.split(model_answer)
        if len(truth_items) != len(answer_items):
            return False
        for answer_item, truth_item in zip(answer_items, truth_items, strict=True):
            if _parses_as_float(truth_item):
                ok = _numbers_equal(answer_item, truth_item)
            else:
                # Punctuation is kept inside list items: it can be part of the answer.
                ok = _normalize(answer_item, remove_punct=False) == _normalize(
                    truth_item, remove_punct=False
                )
            if not ok:
                return False
        return True

    return _normalize(model_answer, remove_punct=True) == _normalize(
        ground_truth, remove_punct=True
    )
