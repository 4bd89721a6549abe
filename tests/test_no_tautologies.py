"""The suite's own asserts can fail: none compares an expression with itself, looks for a literal in
an expression built from that same literal (`"x" in s + "x"`), or is truthy by construction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _outside_calls(node: ast.AST):
    """The nodes of `node`, not descending into call arguments (`"a" in f("a")` can be a real check)."""
    yield node
    if isinstance(node, ast.Call):
        yield from _outside_calls(node.func)
        return
    for child in ast.iter_child_nodes(node):
        yield from _outside_calls(child)


def _truthy_constant(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and bool(node.value)


def tautologies(source: str, filename: str = "<test>") -> list[str]:
    """`file:line: expression` of every assert that cannot fail by the rules above."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Assert):
            continue
        test, bad = node.test, False
        if _truthy_constant(test):
            bad = True
        for sub in ast.walk(test):
            if isinstance(sub, ast.BoolOp) and isinstance(sub.op, ast.Or) and any(map(_truthy_constant, sub.values)):
                bad = True
            if not isinstance(sub, ast.Compare):
                continue
            operands = [sub.left, *sub.comparators]
            texts = [ast.unparse(o) for o in operands]
            if any(texts[i] == texts[i + 1] for i in range(len(sub.ops))):
                bad = True  # x == x, x <= x, x in x
            for left, op, right in zip(operands, sub.ops, operands[1:]):
                if isinstance(op, (ast.In, ast.NotIn)) and isinstance(left, ast.Constant):
                    if any(isinstance(n, ast.Constant) and n.value == left.value for n in _outside_calls(right)):
                        bad = True  # "x" in s + "x", "x" in ["x", ...]
        if bad:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(test)}")
    return found


@pytest.mark.parametrize("source", [
    'assert "your name is" in role.lower() + "your name is"',
    'assert "a" in [b, "a"]',
    'assert "a" not in f"{x}a"',
    "assert x.y == x.y",
    "assert 0 < n <= n",
    "assert True",
    'assert "message"',
    "assert ok or 1",
])
def test_the_rules_catch_tautologies(source: str) -> None:
    assert tautologies(source) == [f"<test>:1: {ast.unparse(ast.parse(source).body[0].test)}"]


@pytest.mark.parametrize("source", [
    'assert "your name is" in role.lower()',
    'assert "hello" in decode(encode("hello"))',
    'assert make(tags=["a", "a"]).tags == ["a"]',
    "assert x.y == z.y",
    "assert ok or other",
])
def test_the_rules_pass_real_checks(source: str) -> None:
    assert tautologies(source) == []


def test_no_assert_in_the_suite_is_a_tautology() -> None:
    found = [hit for path in sorted(TESTS.rglob("*.py"))
             for hit in tautologies(path.read_text(), str(path.relative_to(TESTS.parent)))]
    assert found == []
