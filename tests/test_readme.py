"""The README is what a newcomer follows: its command table must list exactly the CLI's commands,
and its test command must be the one CI runs."""

import re
from pathlib import Path
from typing import Any

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


# ---- every command, flag, variable and metric the docs name exists ----------------------------------
DOCS = [REPO / "README.md", REPO / "docs" / "operations.md"]
SHELL_STOPS = {"#", ">", "|", ";", "&&"}


def _code(text: str) -> list[str]:
    """Fenced code lines and inline code spans (which may wrap a line)."""
    fences = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return [line for block in fences for line in block.splitlines()] + re.findall(r"`([^`]+)`", prose)


def _walk() -> tuple[Any, dict[tuple[str, ...], Any]]:
    """Every command path of the CLI (typer's vendored click objects), the root as ()."""
    root = typer.main.get_command(app)
    paths: dict[tuple[str, ...], Any] = {}

    def visit(cmd: Any, path: tuple[str, ...]) -> None:
        paths[path] = cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            visit(sub, (*path, name))

    visit(root, ())
    return root, paths


def _flags(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} | {"--help"}


def _doc_commands() -> list[tuple[str, list[str]]]:
    """(span, its tokens after ``fabwatch``) for each mention of the command, up to a shell operator or comment."""
    out = []
    for span in (s for doc in DOCS for s in _code(doc.read_text())):
        for m in re.finditer(r"(?:^|(?<=[\s/]))fabwatch\s+(.*)", span.replace("\\|", "|"), flags=re.S):
            words = []
            for w in m.group(1).split():
                if w in SHELL_STOPS:
                    break
                words.append(w)
            out.append((span, words))
    return out


def test_documented_commands_and_their_flags_exist():
    root, paths = _walk()
    for span, words in _doc_commands():
        current = [()]
        for word in words:
            cmds = [paths[p] for p in current]
            if word.startswith(("-", "[", "(")):
                for flag in re.findall(r"--[a-z][a-z0-9-]*", word):
                    assert all(flag in _flags(c) for c in cmds), f"{span!r}: no {flag} on {current}"
            elif all(hasattr(c, "commands") for c in cmds):
                current = [(*p, alt) for p in current for alt in word.split("|")]
                assert all(p in paths for p in current), f"{span!r}: no command {' '.join(current[0])}"


def test_documented_flags_exist_on_some_command():
    _, paths = _walk()
    known = set().union(*(_flags(c) for c in paths.values()))
    spans = [s for doc in DOCS for s in _code(doc.read_text())]
    named = {f for s in spans for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", s)}
    assert named - known == set()


def _env_from_code() -> set[str]:
    names = set()
    for folder in ("stream", "export", "models"):
        for path in (REPO / folder).rglob("*.py"):
            names |= set(re.findall(r'(?:environ\.get\(|environ\[|getenv\(|_switch\()"(FABWATCH_\w+)"', path.read_text()))
    return names


def test_documented_environment_variables_exist():
    """Settings fields (FABWATCH_<FIELD>, FABWATCH_TOPIC_<NAME>), FABWATCH_<COMMAND>_<OPTION> of every option
    (click's auto_envvar_prefix) and the variables the code reads directly."""
    from fabwatch.stream.cli.main import ENV_PREFIX
    from fabwatch.stream.kafka.config import Settings, TopicNames

    _, paths = _walk()
    known = {f"FABWATCH_{f.upper()}" for f in Settings.model_fields} | {f"FABWATCH_TOPIC_{f.upper()}"
                                                                         for f in TopicNames.model_fields}
    known |= {"_".join((ENV_PREFIX, *path, p.name)).upper().replace("-", "_")
              for path, cmd in paths.items() for p in cmd.params if p.param_type_name == "option"}
    known |= _env_from_code()
    named = {n for doc in DOCS for n in re.findall(r"FABWATCH_[A-Z0-9_]*[A-Z0-9]", doc.read_text())}
    assert "FABWATCH_SERVE_REGISTRY" in named and named - known == set()


def test_documented_metrics_are_registered_with_their_labels():
    from fabwatch.models.sidecar.trainer import TrainerMetrics
    from fabwatch.stream.alerts.forward import ForwardMetrics
    from fabwatch.stream.metrics import LogServeMetrics, ProcessorMetrics

    metrics = {}
    for owner in (ProcessorMetrics(), LogServeMetrics(), TrainerMetrics(), ForwardMetrics()):
        for m in vars(owner).values():
            if hasattr(m, "_labelnames"):
                names = {m._name} | ({f"{m._name}_total"} if m._type == "counter" else set())
                metrics |= {n: set(m._labelnames) for n in names}
    named = [(n, set(filter(None, (labels or "").split(","))))
             for doc in DOCS for n, labels in re.findall(r"`(fabwatch_[a-z_]+)(?:\{([a-z_,]+)\})?", doc.read_text())]
    assert len(named) >= 10
    for name, labels in named:
        assert name in metrics, name
        assert labels <= metrics[name], (name, labels, metrics[name])
