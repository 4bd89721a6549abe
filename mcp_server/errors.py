"""Argument errors in plain words: "seed must be at most 2147483646 (got -1)", never pydantic's dump."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _sentence(err: dict[str, Any]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        word = {"greater_than_equal": "at least", "greater_than": "above", "less_than_equal": "at most",
                "less_than": "below"}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {word} {bound}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', 'one of the listed values')}"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "string_too_short":
        return f"must be at least {ctx.get('min_length')} character(s)"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type"):
        return "must be a number"
    if kind in ("string_type",):
        return "must be a string"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind in ("dict_type",):
        return "must be an object"
    if kind in ("list_type",):
        return "must be a list"
    if kind == "extra_forbidden":
        return "is not an argument of this tool"
    message = str(err.get("msg", "is invalid"))
    message = message.removeprefix("Value error, ").removeprefix("Input ")
    return message[0].lower() + message[1:] if message else "is invalid"


def plain_validation_error(exc: ValidationError) -> str:
    """One sentence per wrong argument, with the value that was given."""
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "the arguments"
        sentence = f"{field} {_sentence(err)}"
        if err["type"] != "missing" and "input" in err:
            sentence += f" (got {_shown(err['input'])})"
        parts.append(sentence)
    return "invalid arguments: " + "; ".join(parts)
