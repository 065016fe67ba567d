"""The admin console: a safe command parser and a REPL that drives one super node over the Admin service."""
from __future__ import annotations

import ast
import logging
import os
import re
import sys
from collections.abc import Callable
from inspect import signature
from pathlib import Path
from typing import Any, TextIO

import grpc

from node import transport
from node.console_commands import ALIASES, COMMANDS, ConsoleError, Quit
from node.options import DEADLINES
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import StatusReply as StatusReplyMsg

log = logging.getLogger(__name__)

__all__ = ["Console", "ConsoleError", "parse_command", "split_script"]

PROMPT = "fledger> "
HISTORY_FILE = Path("~/.fledger_console_history")
HISTORY_LENGTH = 1000
PROBE_DEADLINE = 3.0     # the first Status call: short, so a wrong address fails fast

_NAME = re.compile(r"[A-Za-z_]\w*")
_SPACE_FORM = re.compile(r"([A-Za-z_]\w*)\s+(\S.*)", re.DOTALL)


class ProbeError(ConsoleError):
    """The address is not a reachable super node; the console cannot start (exit 2)."""


# ---------------------------------------------------------------- parsing (pure, never evaluates code)

def parse_command(line: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """Split ``name``, ``name(args)`` or ``name arg, key=value`` into (name, args, kwargs).

    Arguments must be Python literals (numbers, strings, booleans, None, lists...); they are read with
    ``ast.literal_eval`` node by node, so nothing the user types is ever executed. In the space form a bare
    word argument is taken as a string (``help train``). Raises ConsoleError with one line on anything else.
    """
    text = line.strip().rstrip(";").strip()
    if not text:
        raise ConsoleError("empty command; type help")
    if _NAME.fullmatch(text):
        return text, (), {}
    bare_words = False
    space = _SPACE_FORM.fullmatch(text)
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


def lookup(name: str) -> tuple[str, Callable[..., bool | None]]:
    """The canonical command name and its function; names are matched case-insensitively."""
    key = name.lower()
    key = ALIASES.get(key, key)
    for canonical, fn in COMMANDS.items():
        if canonical.lower() == key:
            return canonical, fn
    raise ConsoleError(f"unknown command {name!r}; type help")


# ---------------------------------------------------------------- the console

class Console:
    """One connection to a super node: its Admin and SuperNode stubs, and the commands that use them."""

    def __init__(self, address: str, out: TextIO = sys.stdout):
        self.address = address
        self.out = out
        self.channel = transport.open_channel(address)
        self.admin = fledger_pb2_grpc.AdminStub(self.channel)
        self.supernode = fledger_pb2_grpc.SuperNodeStub(self.channel)
        self.deadlines = DEADLINES

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # ---- start-up check --------------------------------------------------------------------------------

    def probe(self) -> StatusReplyMsg:
        """Check the address serves Admin; raise ProbeError with one line (edge node, unreachable, other)."""
        try:
            return self.admin.Status(EmptyMsg(), timeout=PROBE_DEADLINE)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                if self._is_edge_node():
                    raise ProbeError(f"{self.address} is an edge node; connect the console to a super node") \
                        from None
                raise ProbeError(f"{self.address} does not serve the fledger Admin service; connect the "
                                 f"console to a super node") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ProbeError(f"cannot reach a super node at {self.address} ({code.name}); is it running? "
                                 f"start one with `python main.py --port PORT --nt SN -z` or fix --ip/--port") \
                    from None
            raise ProbeError(f"super node at {self.address} refused the status query: "
                             f"{transport.rpc_error_text(exc)}") from None

    def _is_edge_node(self) -> bool:
        try:
            fledger_pb2_grpc.EdgeNodeStub(self.channel).Info(EmptyMsg(), timeout=PROBE_DEADLINE)
        except grpc.RpcError:
            return False
        return True

    # ---- running commands ------------------------------------------------------------------------------

    def run_command(self, line: str) -> bool:
        """Run one command line; print its output or one error line. True on success. Raises Quit on quit."""
        if not line.strip():
            return True
        try:
            name, args, kwargs = parse_command(line)
            canonical, fn = lookup(name)
            try:
                signature(fn).bind(self, *args, **kwargs)
            except TypeError as exc:
                raise ConsoleError(f"bad arguments for {canonical}: {exc}; type help") from None
            return fn(self, *args, **kwargs) is not False
        except ConsoleError as exc:
            self.say(str(exc))
        except grpc.RpcError as exc:
            self.say(self.rpc_error_line(exc, line.strip()))
        return False

    def rpc_error_line(self, exc: grpc.RpcError, what: str) -> str:
        """One user-facing line for a failed call."""
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"node {self.address} is unreachable (UNAVAILABLE); is it running?"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"node {self.address} did not answer {what} in time (DEADLINE_EXCEEDED)"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return f"node {self.address} does not support {what} yet (UNIMPLEMENTED)"
        return f"{what} failed: {code.name if code else 'UNKNOWN'}: {details}"

    def run_script(self, text: str) -> int:
        """Run ``;``-separated commands without a prompt; 0 if all succeeded, 1 otherwise."""
        ok = True
        for line in split_script(text):
            try:
                ok = self.run_command(line) and ok
            except Quit:
                break
        return 0 if ok else 1

    def repl(self, stdin: TextIO | None = None) -> int:
        """Read commands until quit()/exit()/EOF; never dies on a bad command or a failed call. Returns 0."""
        history = _setup_readline() if stdin is None and sys.stdin.isatty() else None
        self.say(f"connected to {self.address}; type help for commands, quit() to leave")
        try:
            while True:
                try:
                    line = input(PROMPT) if stdin is None else _read_line(stdin)
                except EOFError:
                    self.say()
                    return 0
                except KeyboardInterrupt:
                    self.say()
                    continue
                try:
                    self.run_command(line)
                except Quit:
                    return 0
                except KeyboardInterrupt:
                    self.say("interrupted")
        finally:
            if history is not None:
                _save_history(history)


def _read_line(stdin: TextIO) -> str:
    line = stdin.readline()
    if not line:
        raise EOFError
    return line


# ---------------------------------------------------------------- readline: history and completion

def _setup_readline() -> Path | None:
    """Enable tab completion of command names and load the history file; best effort (None if unavailable)."""
    try:
        import readline
    except ImportError:
        return None
    names = sorted([*COMMANDS, *(a for a in ALIASES if a not in {c.lower() for c in COMMANDS})])

    def complete(text: str, state: int) -> str | None:
        matches = [n + "(" for n in names if n.lower().startswith(text.lower())]
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n;(")
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    path = HISTORY_FILE.expanduser()
    try:
        readline.read_history_file(path)
    except OSError:
        pass   # first run, or an unreadable file: start with an empty history
    readline.set_history_length(HISTORY_LENGTH)
    return path


def _save_history(path: Path) -> None:
    try:
        import readline
        readline.write_history_file(path)
        os.chmod(path, 0o600)
    except (ImportError, OSError) as exc:
        log.debug("could not write console history %s: %s", path, exc)
