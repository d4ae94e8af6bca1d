"""The filter language of the hidden ``<Class>.get_all_records_where(expr)`` message
(``ocaml/database/db_filter_lex.mll``, ``db_filter_parse.mly``, ``db_filter.ml``):

    expr  := value "=" value | expr "and" expr | expr "or" expr | "not" expr
           | "true" | "false" | "(" expr ")"
    value := '"literal"' | 'field "name"'

``and``/``or`` share one precedence level, left-associative; ``not`` binds tighter. Values compare
as the strings xapi's database stores (booleans ``true``/``false``, integers in decimal).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from xencr.sim.errors import XapiError

Predicate = Callable[[dict[str, Any]], bool]
_TOKEN = re.compile(r'\s*(?:(=)|(\()|(\))|"([^"]*)"|(true|false|field|and|or|not)\b)')


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise XapiError("INTERNAL_ERROR", f"Parse error in filter expression: {text!r}")
        eq, lp, rp, ident, word = m.groups()
        out.append(
            ("=", "")
            if eq
            else ("(", "")
            if lp
            else (")", "")
            if rp
            else ("ident", ident)
            if ident is not None
            else (word, "")
        )
        pos = m.end()
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _combine(keyword: str, lhs: Predicate, rhs: Predicate) -> Predicate:
    if keyword == "and":
        return lambda row: lhs(row) and rhs(row)
    return lambda row: lhs(row) or rhs(row)


def parse(text: str) -> Predicate:
    tokens = _tokens(text)
    pos = 0

    def fail() -> XapiError:
        return XapiError("INTERNAL_ERROR", f"Parse error in filter expression: {text!r}")

    def peek() -> str:
        return tokens[pos][0] if pos < len(tokens) else "eof"

    def take(kind: str) -> str:
        nonlocal pos
        if peek() != kind:
            raise fail()
        value = tokens[pos][1]
        pos += 1
        return value

    def value() -> Callable[[dict[str, Any]], str]:
        if peek() == "field":
            take("field")
            name = take("ident")
            return lambda row: _text(row.get(name, ""))
        literal = take("ident")
        return lambda row: literal

    def unary() -> Predicate:
        kind = peek()
        if kind == "not":
            take("not")
            inner = unary()
            return lambda row: not inner(row)
        if kind in ("true", "false"):
            take(kind)
            return (lambda row: True) if kind == "true" else (lambda row: False)
        if kind == "(":
            take("(")
            inner = expr()
            take(")")
            return inner
        left, _, right = value(), take("="), value()
        return lambda row: left(row) == right(row)

    def expr() -> Predicate:
        result = unary()
        while peek() in ("and", "or"):
            keyword = peek()
            take(keyword)
            result = _combine(keyword, result, unary())
        return result

    predicate = expr()
    if pos != len(tokens):
        raise fail()
    return predicate
