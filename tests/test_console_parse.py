"""The console's command parser (call and space forms, literal arguments only, nothing ever evaluated) and its
command table (names, aliases, quit)."""
from __future__ import annotations

import io

import pytest

from node.console.commands import ALIASES, COMMANDS, Quit, lookup
from node.console.parse import ConsoleError, parse_command, split_script
from node.console.repl import Console


@pytest.mark.parametrize("line, expected", [
    ("train", ("train", (), {})),
    ("train()", ("train", (), {})),
    ("  train()  ", ("train", (), {})),
    ("train();", ("train", (), {})),
    ("train(rounds=3)", ("train", (), {"rounds": 3})),
    ("getModel(height=2)", ("getModel", (), {"height": 2})),
    ("getModel(height=2, path='model.pt')", ("getModel", (), {"height": 2, "path": "model.pt"})),
    ('getModel(path="a b;c.pt")', ("getModel", (), {"path": "a b;c.pt"})),
    ("getBlock 3", ("getBlock", (3,), {})),
    ("getBlock(3)", ("getBlock", (3,), {})),
    ("getModel height=2, path='m.pt'", ("getModel", (), {"height": 2, "path": "m.pt"})),
    ("help getModel", ("help", ("getModel",), {})),
    ("chain(n=-1)", ("chain", (), {"n": -1})),
    ("x(None, True, [1, 2], {'a': 1.5})", ("x", (None, True, [1, 2], {"a": 1.5}), {})),
])
def test_parse_accepts_call_space_and_keyword_forms(line, expected) -> None:
    assert parse_command(line) == expected


@pytest.mark.parametrize("line", [
    "",
    "getBlock(3",
    "getBlock(3))",
    "train(rounds=)",
    "1 + 2",
    "'train'",
    "a.b()",
    "train()()",
    "train(); pause()",
    "getBlock[3]",
])
def test_parse_rejects_bad_syntax_with_one_line(line) -> None:
    with pytest.raises(ConsoleError) as info:
        parse_command(line)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("line", [
    "__import__('os').system('touch PWNED')",
    "getBlock(__import__('os').system('touch PWNED'))",
    "getModel(path=open('PWNED', 'w'))",
    "train(rounds=1+1)",
    "getModel(**{'height': 1})",
    "getBlock(*[1])",
    "getBlock(x)",
    "train(rounds=(lambda: 1)())",
    "getBlock 3 + __import__('os').getpid()",
])
def test_parse_refuses_code_without_evaluating_it(line, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConsoleError):
        parse_command(line)
    assert not (tmp_path / "PWNED").exists()


def test_split_script_keeps_semicolons_inside_quotes() -> None:
    assert split_script("status(); getModel(path='a;b.pt') ;; chain()\nverify") == \
        ["status()", "getModel(path='a;b.pt')", "chain()", "verify"]


def test_unknown_command_and_bad_arguments_are_one_line_and_need_no_node() -> None:
    out = io.StringIO()
    console = Console("127.0.0.1:1", out=out)   # never contacted: parsing and binding fail first
    try:
        assert console.run_command("bogus()") is False
        assert console.run_command("getBlock()") is False
        assert console.run_command("train(rounds='many')") is False
        assert console.run_command("help(nope)") is False
        assert console.run_command("help()") is True
    finally:
        console.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "unknown command 'bogus'; type help"
    assert lines[1].startswith("bad arguments for getBlock:")
    assert lines[2].startswith("bad arguments: rounds must be an integer")
    assert lines[3].startswith("bad arguments for help:")
    assert any(line.strip().startswith("getModel") for line in lines[4:])


def test_command_names_are_case_insensitive_and_trainfl_is_an_alias() -> None:
    out = io.StringIO()
    with Console("127.0.0.1:1", out=out) as console:
        assert console.run_command("HELP trainFL") is True
        assert console.run_command("help(\"getsn\")") is True
    assert out.getvalue().splitlines()[0].startswith("train: start or resume")
    assert out.getvalue().splitlines()[1].startswith("getSN: ")


@pytest.mark.parametrize("name", ["getSN", "getsn", "GETSN", "GetSn"])
def test_lookup_matches_names_case_insensitively(name: str) -> None:
    assert lookup(name) == ("getSN", COMMANDS["getSN"])


@pytest.mark.parametrize("alias, canonical", [("trainFL", "train"), ("TRAINFL", "train"), ("exit", "quit")])
def test_lookup_resolves_aliases_to_their_command(alias: str, canonical: str) -> None:
    assert lookup(alias) == (canonical, COMMANDS[canonical])


def test_every_alias_names_a_command() -> None:
    assert all(lookup(alias)[0].lower() == target for alias, target in ALIASES.items())


def test_lookup_of_an_unknown_name_is_a_one_line_console_error() -> None:
    with pytest.raises(ConsoleError, match=r"^unknown command 'bogus'; type help$"):
        lookup("bogus")


@pytest.mark.parametrize("line", ["quit()", "exit", "EXIT()"])
def test_quit_and_exit_raise_quit_without_a_node(line: str) -> None:
    with Console("127.0.0.1:1", out=io.StringIO()) as console, pytest.raises(Quit):
        console.run_command(line)


def test_a_script_stops_at_quit() -> None:
    out = io.StringIO()
    with Console("127.0.0.1:1", out=out) as console:
        code = console.run_script("help('train'); quit(); bogus()")
    assert code == 0 and "unknown command" not in out.getvalue()
