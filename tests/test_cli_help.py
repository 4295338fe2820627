"""The README's commands and flag tables are what the parsers take and `--help` shows; help texts show defaults;
$VLCACHE_HOME decides where vlcache keeps its files; the CLI modules import no circle."""

import argparse
import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from vlcache import cli, paths

README = (REPO / "README.md").read_text()
COMMON = {"--help", "--debug", "--verbose"}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def table_rows() -> dict[str, str]:
    """The README's flag table: command name -> the flags cell (rows of one command joined)."""
    section = README[README.index("## Command line"):README.index("### Several images")]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `vlcache ") and not line.startswith("| every command"):
            continue
        first, flags = [cell.strip() for cell in line.strip("|").split(" | ", 1)]
        names = re.findall(r"`vlcache (\w+)", first) or ["*"]
        for name in names:  # the command cell's flags written as code spans of their own
            rows[name] = rows.get(name, "") + " " + " ".join(f"`{f}`" for f in re.findall(r" (--[a-z-]+)", first)) + " " + flags
    return rows


def readme_flags(cell: str) -> set[str]:
    return set(re.findall(r"`(--[a-z][a-z0-9_-]*)", cell))


def test_the_readme_table_lists_every_flag_of_every_command_and_no_other():
    rows, commands = table_rows(), subparsers()
    assert set(rows) == set(commands) | {"*"}, "a command without a row, or a row without a command"
    for name, parser in commands.items():
        assert readme_flags(rows[name]) == long_flags(parser) - COMMON, name
        assert COMMON - {"--help"} <= long_flags(parser), name  # --debug and --verbose after any command too
    assert readme_flags(rows["*"]) == COMMON - {"--help"}
    assert COMMON - {"--help"} <= long_flags(cli.build_parser())


def help_default(action: argparse.Action) -> str | None:
    match = re.search(r"default: ([^,;)]+)", action.help or "")
    return match.group(1).strip().strip('"') if match else None


def readme_default(cell: str, flag: str) -> str | None:
    """The text in parentheses right after a flag's code span in the table: `--port` (8000) -> 8000."""
    match = re.search(rf"`{re.escape(flag)}(?: [^`]*)?` \(([^,;)]+)", cell)
    return match.group(1).strip().strip('"') if match else None


def test_every_default_is_in_the_help_and_the_readme_agrees():
    rows = table_rows()
    for name, parser in subparsers().items():
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            flag = max(action.option_strings, key=len)
            shown = help_default(action)
            assert shown, f"vlcache {name} {flag}: the help shows no default"
            if not callable(action.type) or action.type in (int, str) or action.type is cli.positive_int:
                assert shown.startswith(str(action.default)), (name, flag, shown, action.default)
            elif action.type is cli.byte_size:
                assert cli.byte_size(shown) == action.default, (name, flag, shown)
            readme = readme_default(rows[name], flag)
            assert readme is not None and shown.startswith(readme), (name, flag, shown, readme)


def test_help_texts_say_what_each_command_does():
    commands = subparsers()

    def help_of(name, flag):
        return next(a.help for a in commands[name]._actions if flag in a.option_strings)

    assert "load the model" not in help_of("status", "--server")
    assert "cache" not in help_of("serve", "--dtype")
    assert help_of("ask", "--top-p") and help_of("chat", "--top-p")
    assert next(a.help for a in commands["inspect"]._actions if a.dest == "path")
    for name, parser in commands.items():  # no option goes undocumented
        for action in parser._actions:
            assert action.help, f"vlcache {name} {action.option_strings or action.dest} has no help text"


def readme_command_lines() -> list[str]:
    """Every `vlcache ...` command in the README's bash blocks (pipes and comments taken apart)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split(" # ")[0].split("  #")[0].strip()
            for segment in line.split(" | "):
                if segment.strip().startswith("vlcache "):
                    found.append(segment.strip())
    return found


def test_every_readme_command_parses():
    lines = readme_command_lines()
    assert len(lines) >= 20
    for line in lines:
        argv = shlex.split(line)[1:]
        args, unknown = cli.build_parser().parse_known_args(argv)
        assert unknown == [], line
        assert cli.usage_problem(args) is None, line


@pytest.mark.parametrize("command", sorted(subparsers()))
def test_an_unknown_flag_after_a_command_prints_that_commands_usage(command, capsys):
    required = {"cache": ["x.jpg", "-o", "x.pt"], "chat": ["--cache", "x.pt"], "inspect": ["x.pt"]}.get(command, [])
    with pytest.raises(SystemExit) as info:
        cli.main([command, *required, "--frobnicate"])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"usage: vlcache {command} ")
    assert err[-1] == f"vlcache {command}: error: unrecognized arguments: --frobnicate"


def test_an_unknown_flag_before_the_command_prints_vlcaches_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--frobnicate", "ask", "--prompt", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: vlcache [-h]") and err[-1] == "vlcache: error: unrecognized arguments: --frobnicate"


def test_vlcache_home_decides_every_file_vlcache_keeps(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path / "home"))
    assert paths.states_dir() == tmp_path / "home" / "states"
    assert paths.run_file() == tmp_path / "home" / "serve.json"
    assert paths.fingerprints_file() == tmp_path / "home" / "fingerprints.json"
    assert paths.file_hashes_file() == tmp_path / "home" / "file-hashes.json"
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    shown = "".join(capsys.readouterr().out.split())  # help wraps lines, at hyphens too
    assert f"now{tmp_path / 'home' / 'states'})" in shown and f"now{tmp_path / 'home' / 'serve.json'})" in shown
    monkeypatch.delenv("VLCACHE_HOME")
    assert paths.home() == Path.home() / ".cache" / "vlcache"
    # No module but paths.py spells the default folder: every other one asks paths.
    spelled = [p.name for p in (REPO / "src" / "vlcache").rglob("*.py")
               if re.search(r"""["']\.cache["']""", p.read_text()) and p.name != "paths.py"]
    assert spelled == []


def imports(module: Path, package: str) -> set[str]:
    """vlcache modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            found |= {f"{base}.{node.module}"} if node.module else {f"{base}.{a.name}" for a in node.names}
    return found


def test_the_cli_modules_import_no_circle():
    root = REPO / "src" / "vlcache"
    graph = {f"vlcache.{p.stem}": imports(p, "vlcache") for p in root.glob("*.py")}
    graph |= {f"vlcache.commands.{p.stem}": imports(p, "vlcache.commands") for p in (root / "commands").glob("*.py")}

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    commands = [name for name in graph if name.startswith("vlcache.commands.")]
    for module in ("vlcache.cli", "vlcache.remote", "vlcache.console", "vlcache.paths", "vlcache.batch", "vlcache.prompt",
                   *commands):
        assert not reaches(module, module, {module}), f"{module} imports itself through others"
    assert "vlcache.cli" not in graph["vlcache.remote"]
    assert all("vlcache.cli" not in graph[name] for name in commands), "a command's runner imports the parser"
    assert {"vlcache.commands.ask", "vlcache.commands.chat", "vlcache.commands.cache"} <= graph["vlcache.cli"]
    assert all("vlcache.remote" in graph[f"vlcache.commands.{name}"] for name in ("ask", "chat", "cache", "serve"))


def test_each_command_is_a_module_read_in_one_sitting():
    """cli.py holds the parser and the error policy; each command's runner is its own module, and none of them
    (cli.py included) grows past what a person reads in one sitting."""
    root = REPO / "src" / "vlcache"
    sizes = {p.name: len(p.read_text().splitlines()) for p in [root / "cli.py", *(root / "commands").glob("*.py")]}
    assert {"ask.py", "cache.py", "chat.py", "serve.py", "inspect.py", "check.py"} <= set(sizes)
    assert max(sizes.values()) <= 450, sizes
    runners = re.findall(r"^def (run_\w+)", (root / "cli.py").read_text(), flags=re.M)
    assert runners == ["run_command"], runners  # the error policy, not a command


def test_the_tiny_builders_import_no_circle():
    testing = REPO / "src" / "vlcache" / "testing"
    graph = {p.stem: {m.rsplit(".", 1)[-1] for m in imports(p, "t")} for p in testing.glob("*.py")}
    assert "families" not in graph["more_families"] and "builder" in graph["more_families"] & graph["families"]


def fake_detached_server(home: Path, url: str) -> subprocess.Popen:
    """A process recorded as `serve --detach` records one (stop only reads the record and signals the pid)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "serve.json").write_text(json.dumps({"pid": process.pid, "url": url, "log": str(home / "serve.log")}))
    return process


def test_stop_takes_server_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path))
    monkeypatch.setenv("VLCACHE_SERVER", "http://127.0.0.1:9")  # not read by stop
    process = fake_detached_server(tmp_path, "http://127.0.0.1:8123")
    try:
        assert cli.main(["stop", "--server", "http://127.0.0.1:9999"]) == 1
        assert capsys.readouterr().err.splitlines() == [
            "error: the server at http://127.0.0.1:9999 was not started by `vlcache serve --detach` here (that one is "
            "http://127.0.0.1:8123); vlcache stops only the server it started"]
        assert process.poll() is None and (tmp_path / "serve.json").exists()
        assert cli.main(["stop", "--server", "127.0.0.1:8123/v1", "--json"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out) == {"stopped": True, "url": "http://127.0.0.1:8123", "pid": process.pid}
        assert captured.err.splitlines() == [f"stopped the server at http://127.0.0.1:8123 (pid {process.pid})"]
        process.wait(timeout=30)  # ended (stop reaps it: its own child here, so the status is gone)
        assert not (tmp_path / "serve.json").exists()
        assert cli.main(["stop", "--json"]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.splitlines() == [
            "error: no server started with `vlcache serve --detach` is running"]
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
