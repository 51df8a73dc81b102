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
# Integers and fractions compare exactly. A number written with a decimal
# point may be a rounded float (a gold 3.3333333333 for the model's "10/3"),
# so when either side has decimals they compare within a relative 1e-6 and
# within half a unit of the coarser side's last written digit: 5.0001 is not
# 5, 192000001.0 is not 192000000, and 0.30000000000000004 is 0.3.
_REL_TOL = Fraction(1, 10**6)


def parse_number(text: str | None) -> Fraction | None:
    """Exact value of a number as a model or dataset writes it, else None.

    Accepts an optional sign, `$`, thousands commas, a trailing `.` or `%`
    sign dropped, decimals and simple fractions `a/b`. No exponents, no
    inf/nan, at most 40 digits.
    """
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, (int, Fraction)):
        text = str(text)
    elif isinstance(text, float):
        text = repr(text)
    if not isinstance(text, str):
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


def _places(text: object) -> int | None:
    """Decimal places a number is written with; None for a fraction (exact at any precision)."""
    cleaned = (repr(text) if isinstance(text, float) else str(text)).strip().rstrip(".%")
    if "/" in cleaned:
        return None
    return len(cleaned.split(".", 1)[1]) if "." in cleaned else 0


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


def answers_match(predicted: object, gold: object) -> bool:
    """Numeric equality of two answers: exact, or within relative 1e-6 if either has decimals. Never raises."""
    try:
        pred_value, gold_value = parse_number(predicted), parse_number(gold)
        if pred_value is None or gold_value is None:
            return False
        if pred_value == gold_value:
            return True
        places = [p for p in (_places(predicted), _places(gold)) if p is not None]
        if not any(places):  # integers and fractions only: exact
            return False
        diff = abs(pred_value - gold_value)
        return diff <= _REL_TOL * max(abs(pred_value), abs(gold_value)) and diff <= Fraction(1, 2 * 10**min(places))
    except Exception:  # noqa: BLE001  grading model output must never stop a run
        return False


def is_correct(solution: object, gold: object) -> bool:
    """Whether the solution's final answer numerically equals `gold`; False on anything unparseable. Never raises."""
    try:
        return answers_match(extract_answer(solution), gold)
    except Exception:  # noqa: BLE001
        return False
