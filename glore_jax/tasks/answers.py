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
# The capture is the first chunk after the marker, a `$` allowed before it.
_HASH_RE = re.compile(r"####[ \t]*(\$?[ \t]*[^\s]*)")
_ANSWER_IS_RE = re.compile(r"the answer is[: \t]*(\$?[ \t]*[^\s]*)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"^([-+]?)(\d+(?:\.\d*)?|\.\d+)$")
_FRACTION_RE = re.compile(r"^([-+]?)(\d+)\s*/\s*(\d+)$")
_MAX_DIGITS = 40
# Gold answers from SVAMP are rounded floats such as 3.3333333333; an exact
# comparison would reject the model's equally valid "10/3". A number written
# with this many decimals or more is taken as rounded in its last place.
_ROUNDED_DECIMALS = 4


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


def _decimals(text: str) -> int:
    cleaned = text.strip().rstrip(".%")
    return len(cleaned.split(".", 1)[1]) if "." in cleaned and "/" not in cleaned else 0


def extract_answer(solution: str) -> str | None:
    """The final answer text: the last `#### N`, else the last "The answer is N"; else None."""
    if not isinstance(solution, str):
        return None
    for pattern in (_HASH_RE, _ANSWER_IS_RE):
        matches = list(pattern.finditer(solution))
        if matches:
            # "18." ending a sentence is 18; "$ 18" is 18.
            found = matches[-1].group(1).lstrip("$").strip().rstrip(".")
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
        decimals = max(_decimals(predicted), _decimals(gold))
        return decimals >= _ROUNDED_DECIMALS and abs(pred_value - gold_value) <= Fraction(1, 10**decimals)
    except (ValueError, OverflowError, ZeroDivisionError, TypeError):
        return False


def is_correct(solution: str, gold: str) -> bool:
    """Whether the solution's final answer numerically equals `gold`. Never raises."""
    return answers_match(extract_answer(solution), gold)
