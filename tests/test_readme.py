"""The README is what a newcomer follows: its command table must list exactly the CLI's commands,
and its test command must be the one CI runs."""

import re
from pathlib import Path

import typer

from fabwatch.stream.cli.main import app

REPO = Path(__file__).resolve().parents[1]


def _cli_commands() -> set[str]:
    group = typer.main.get_command(app)
    names = set()
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        names |= {f"{name} {s}" for s in sub} if sub else {name}
    return names


def _readme_commands() -> set[str]:
    text = (REPO / "README.md").read_text()
    names = set()
    for row in re.findall(r"^\| `fabwatch ([^`]+)`", text, flags=re.M):
        words = row.replace("\\|", "|").split()
        head, rest = words[0], words[1] if len(words) > 1 else ""
        if rest and not rest.startswith(("-", "[", "(")) and rest.upper() != rest:
            names |= {f"{head} {s}" for s in rest.split("|")}
        else:
            names.add(head)
    return names


def test_command_table_matches_the_cli():
    assert _readme_commands() == _cli_commands()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^make test$", readme, flags=re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()
