"""Final answers: extracting them from a solution and grading them against gold.

Grading is numeric, not textual: "1,000", "$1000", "1000.0" and "1000." are
the same answer, and so are "3/4" and "0.75". Anything that is not a plain
number (garbage, "inf", "nan", "1e999999", absurdly long digit strings) is
simply not a correct answer: these functions never raise on model output.
"""

from __future__ import annotations

import re
from fractions import Fraction

# GSM8K uses "#### N"; few-shot style prompts end with "The answer is N".
_HASH_RE = re.compile(r"####\s*(.*)")
_ANSWER_IS_RE = re.compile(r"the answer is[:\s]*(.*)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"^([-+]?)(\d+(?:\.\d*)?|\.\d+)$")
_FRACTION_RE = re.compile(r"^([-+]?)(\d+)\s*/\s*(\d+)$")
_MAX_DIGITS = 40
# Gold answers from SVAMP are floats such as 3.3333333333; an exact
# comparison would reject the model's equally valid "10/3".
_REL_TOL = Fraction(1, 10**6)


def parse_number(text: str | None) -> Fraction | None:
    """Exact value of a number as a model or dataset writes it, else None.

    Accepts an optional sign, `$`, thousands commas, a trailing `.` or `%`
    sign dropped, decimals and simple fractions `a/b`. No exponents, no
    inf/nan, at most 40 digits.
    """
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    cleaned = cleaned.rstrip(".%")
    if not cleaned or sum(c.isdigit() for c in cleaned) > _MAX_DIGITS:
        return None
    if match := _NUMBER_RE.match(cleaned):
        sign, digits = match.groups()
        value = Fraction(digits.rstrip(".") or "0")
        return -value if sign == "-" else value
    if match := _FRACTION_RE.match(cleaned):
        sign, num, den = match.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    return None


def format_number(value: Fraction) -> str:
    """Canonical text of a number: integers bare, otherwise a decimal (10 places max)."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.10f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def normalize_number(text: str) -> str | None:
    """`format_number(parse_number(text))`, or None when `text` is not a number."""
    value = parse_number(text)
    return None if value is None else format_number(value)


def _first_number_text(tail: str) -> str:
    # "#### 18 dollars" or "The answer is 18." : the answer is the first
    # whitespace-delimited chunk, with `$` allowed to be separated by a space.
    tail = tail.strip().lstrip("$").strip()
    chunk = tail.split()[0] if tail.split() else ""
    return chunk.rstrip(".")


def extract_answer(solution: str) -> str | None:
    """The final answer text: the last `#### N`, else the last "The answer is N"; else None."""
    if not isinstance(solution, str):
        return None
    for pattern in (_HASH_RE, _ANSWER_IS_RE):
        matches = list(pattern.finditer(solution))
        if matches:
            found = _first_number_text(matches[-1].group(1).splitlines()[0] if matches[-1].group(1) else "")
            return found or None
    return None


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Numeric equality of two answer strings (never raises)."""
    try:
        pred_value, gold_value = parse_number(predicted), parse_number(gold)
        if pred_value is None or gold_value is None:
            return False
        if pred_value == gold_value:
            return True
        return abs(pred_value - gold_value) <= _REL_TOL * max(1, abs(gold_value))
    except (ValueError, OverflowError, ZeroDivisionError, TypeError):
        return False


def is_correct(solution: str, gold: str) -> bool:
    """Whether the solution's final answer numerically equals `gold`. Never raises."""
    return answers_match(extract_answer(solution), gold)
