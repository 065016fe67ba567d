"""The console REPL: one connection to a super node's Admin service, commands run by line or by script."""
from __future__ import annotations

import logging
import os
import sys
from inspect import signature
from pathlib import Path
from typing import TextIO

from node.console.commands import ALIASES, COMMANDS, Quit, lookup
from node.console.parse import ConsoleError, parse_command, split_script
from node.engine.errors import NetError
from node.engine.views import NodeStatus
from node.rpc.clients import AdminClient, is_edge_node, speaks_tls
from node.rpc.options import DEADLINES
from node.security.pki import TlsCredentials

log = logging.getLogger(__name__)

PROMPT = "fledger> "
HISTORY_FILE = Path("~/.fledger_console_history")
HISTORY_LENGTH = 1000
PROBE_DEADLINE = 3.0     # the first Status call: short, so a wrong address fails fast


class ProbeError(ConsoleError):
    """The address is not a reachable super node; the console cannot start (exit 2)."""


class Console:
    """One connection to a super node and the commands that use it (it is the commands' Session)."""

    def __init__(self, address: str, out: TextIO = sys.stdout, identity: TlsCredentials | None = None):
        self.address = address
        self.out = out
        self.identity = identity      # the operator's certificate, for a secure node (console.py --identity)
        self.admin = AdminClient(address, security=identity)
        self.deadlines = DEADLINES

    def close(self) -> None:
        self.admin.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # ---- start-up check --------------------------------------------------------------------------------

    def probe(self) -> NodeStatus:
        """Check the address serves Admin; raise ProbeError with one line (edge node, unreachable, other)."""
        try:
            return self.admin.status(timeout=PROBE_DEADLINE)
        except NetError as exc:
            if exc.status == "UNIMPLEMENTED":
                if is_edge_node(self.address, PROBE_DEADLINE, self.identity):
                    raise ProbeError(f"{self.address} is an edge node; connect the console to a super node") \
                        from None
                raise ProbeError(f"{self.address} does not serve the fledger Admin service; connect the "
                                 f"console to a super node") from None
            if exc.status == "UNAVAILABLE" and speaks_tls(self.address, PROBE_DEADLINE):
                if self.identity is None:
                    raise ProbeError(f"{self.address} runs in secure mode: pass --identity DIR, the operator "
                                     "identity its entry writes in DATA_ROOT/admin") from None
                raise ProbeError(f"the TLS handshake with {self.address} failed: is --identity from this "
                                 "network (its entry's DATA_ROOT/admin)?") from None
            if exc.status in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                raise ProbeError(f"{self.address} refused this console: {exc.details or exc}; use the operator "
                                 "identity (--identity DATA_ROOT/admin of the entry)") from None
            if exc.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                raise ProbeError(f"cannot reach a super node at {self.address} ({exc.status}); is it running? "
                                 f"start one with `python main.py --port PORT --nt SN -z` or fix --ip/--port") \
                    from None
            raise ProbeError(f"super node at {self.address} refused the status query: {exc}") from None

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
        except NetError as exc:
            self.say(self.error_line(exc, line.strip()))
        return False

    def error_line(self, exc: NetError, what: str) -> str:
        """One user-facing line for a failed call."""
        if exc.status == "UNAVAILABLE":
            return f"node {self.address} is unreachable (UNAVAILABLE); is it running?"
        if exc.status == "DEADLINE_EXCEEDED":
            return f"node {self.address} did not answer {what} in time (DEADLINE_EXCEEDED)"
        if exc.status == "UNIMPLEMENTED":
            return f"node {self.address} does not support {what} yet (UNIMPLEMENTED)"
        return f"{what} failed: {exc.status or type(exc).__name__}: {exc.details or exc}"

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
