"""Exact, safe evaluation of the calculator expressions inside `<<expr=value>>`.

Model samples are untrusted text, so nothing here calls `eval`: a small
recursive-descent parser accepts only numbers, + - * /, unary minus and
parentheses, and computes with `fractions.Fraction` so `1/3*3 == 1` exactly.
Sizes are capped because a sampled "99999...9 * 99999...9" chain must not
stall a grading loop.
"""

from __future__ import annotations

import re
from fractions import Fraction

# Longer literals or deeper nesting than any GSM8K / synthetic step ever needs
# are treated as garbage rather than computed.
MAX_LITERAL_DIGITS = 40
MAX_EXPR_CHARS = 200
MAX_RESULT_DIGITS = 60

_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(.))")


class ExpressionError(ValueError):
    """The text is not a well-formed +,-,*,/ expression over plain numbers."""


def _tokenize(text: str) -> list[str]:
    tokens = []
    for match in _TOKEN_RE.finditer(text):
        number, other = match.groups()
        if number is not None:
            if len(number.replace(".", "")) > MAX_LITERAL_DIGITS:
                raise ExpressionError(f"number literal too long in {text!r}")
            tokens.append(number)
        elif other is not None and not other.isspace():
            if other not in "+-*/()":
                raise ExpressionError(f"unexpected character {other!r} in {text!r}")
            tokens.append(other)
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := '-' unary | '(' expr ')' | number."""

    def __init__(self, tokens: list[str], text: str):
        self.tokens, self.pos, self.text, self.depth = tokens, 0, text, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError(f"unexpected end of {self.text!r}")
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
            _check_size(value, self.text)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.unary()
            if op == "/" and rhs == 0:
                raise ExpressionError(f"division by zero in {self.text!r}")
            value = value * rhs if op == "*" else value / rhs
            _check_size(value, self.text)
        return value

    def unary(self) -> Fraction:
        token = self.take()
        if token == "-":
            return -self.unary()
        if token == "(":
            self.depth += 1
            if self.depth > 20:
                raise ExpressionError(f"nesting too deep in {self.text!r}")
            value = self.expr()
            if self.take() != ")":
                raise ExpressionError(f"unbalanced parentheses in {self.text!r}")
            self.depth -= 1
            return value
        if token[0].isdigit() or token[0] == ".":
            return Fraction(token)
        raise ExpressionError(f"unexpected {token!r} in {self.text!r}")


def _check_size(value: Fraction, text: str) -> None:
    if max(abs(value.numerator), value.denominator).bit_length() > MAX_RESULT_DIGITS * 3.33:
        raise ExpressionError(f"intermediate result too large in {text!r}")


def evaluate(text: str) -> Fraction:
    """Exact value of an arithmetic expression; raises ExpressionError on anything else."""
    if len(text) > MAX_EXPR_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPR_CHARS} characters")
    # GSM8K annotations sometimes write thousands separators inside the expression.
    tokens = _tokenize(text.replace(",", ""))
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens, text)
    value = parser.expr()
    if parser.peek() is not None:
        raise ExpressionError(f"trailing {parser.peek()!r} in {text!r}")
    return value


def literals(text: str) -> list[Fraction]:
    """The number literals of an expression, in order (unary minus not applied)."""
    return [Fraction(t) for t in _tokenize(text.replace(",", "")) if t[0].isdigit() or t[0] == "."]
