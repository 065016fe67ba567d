"""Console command lines: ``name``, ``name(args)``, ``name arg, key=value`` and ``;``-separated scripts, read
with ``ast.literal_eval`` node by node, so nothing the user types is ever executed. Pure: no network."""
from __future__ import annotations

import ast
import re
from typing import Any


class ConsoleError(Exception):
    """A user-facing failure: printed as one line, the console keeps running."""


_NAME = re.compile(r"[A-Za-z_]\w*")
_SPACE_FORM = re.compile(r"([A-Za-z_]\w*)\s+(\S.*)", re.DOTALL)
_HEX_WORD = re.compile(r"[0-9a-f]*[a-f][0-9a-f]*")   # a node id or a prefix of one, as getSN() shows them


def parse_command(line: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """Split ``name``, ``name(args)`` or ``name arg, key=value`` into (name, args, kwargs).

    Arguments must be Python literals (numbers, strings, booleans, None, lists...); they are read with
    ``ast.literal_eval`` node by node, so nothing the user types is ever executed. In the space form a bare
    word argument is taken as a string (``help train``), as is a lone word of lowercase hex digits with a letter
    among them (a node id or its prefix: ``removeSN 3fa2``). Raises ConsoleError with one line on anything else.
    """
    text = line.strip().rstrip(";").strip()
    if not text:
        raise ConsoleError("empty command; type help")
    if _NAME.fullmatch(text):
        return text, (), {}
    bare_words = False
    space = _SPACE_FORM.fullmatch(text)
    if space and _HEX_WORD.fullmatch(space.group(2).strip()):   # removeSN 3fa2: not a Python literal, an id
        return space.group(1), (space.group(2).strip(),), {}
    if space and not space.group(2).startswith("("):
        text, bare_words = f"{space.group(1)}({space.group(2)})", True
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ConsoleError(f"bad syntax in {line.strip()!r}; commands look like name(), name(1) or "
                           f"name(key=value)") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise ConsoleError(f"bad syntax in {line.strip()!r}; commands look like name(), name(1) or "
                           f"name(key=value)")
    args = tuple(_literal(node, call.func.id, bare_words) for node in call.args)
    kwargs: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise ConsoleError(f"bad arguments for {call.func.id}: '**' is not supported")
        kwargs[keyword.arg] = _literal(keyword.value, call.func.id, bare_words)
    return call.func.id, args, kwargs


def _literal(node: ast.expr, name: str, bare_words: bool) -> Any:
    if bare_words and isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Starred):
        raise ConsoleError(f"bad arguments for {name}: '*' is not supported")
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ConsoleError(f"bad arguments for {name}: {ast.unparse(node)!r} is not a literal value "
                           f"(use numbers or quoted strings)") from None


def split_script(text: str) -> list[str]:
    """Split ``cmd1; cmd2`` on semicolons and newlines that are outside quotes; drop empty pieces."""
    pieces, current, quote = [], [], ""
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch in ";\n":
            pieces.append("".join(current))
            current = []
        else:
            current.append(ch)
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]
