"""The root command: help lists every group, and stays light (no heavy SDK imported)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rollout.cli import app
from tests.cli import run_cli

HEAVY = ("azure.ai.ml", "sklearn", "fastapi", "kubernetes", "prometheus_api_client", "scipy")


def test_help_lists_every_group() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in ("pipeline", "registry", "rollout", "trigger", "serve", "load"):
        assert group in result.output


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "rollout", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "Usage:" in done.stdout and "bootstrap" in done.stdout


def test_help_imports_no_heavy_sdk() -> None:
    # `import azure.ai.ml` alone costs seconds; --help must not pay for it.
    code = (
        "import sys\n"
        "from rollout.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "HEAVY="


def test_help_shows_flags_as_flags() -> None:
    """A flag takes no value, so its help shows no type (typer 0.29.0-0.29.2 printed `<bool>`
    after every flag, `--help` included, which reads as if `--watch true` were expected)."""
    result = CliRunner().invoke(app, ["rollout", "status", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    assert "--watch" in result.output and "<float>" in result.output  # typed options keep theirs
    assert "<bool>" not in result.output


@pytest.mark.parametrize(
    "name",
    [
        # Was: rich read `[/x]` in the quoted path as a closing tag and died with a traceback.
        pytest.param("[/x].yaml", id="markup"),
        pytest.param(":rocket:.yaml", id="emoji-code"),  # was printed as an emoji
    ],
)
def test_an_error_quoting_brackets_is_shown_as_is(tmp_path: Path, name: str) -> None:
    spec = tmp_path / name
    done = run_cli("manifests", "--spec", str(spec), columns=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith(f"error: {spec}: ")
    assert "Traceback" not in done.stderr


def _helps() -> list[tuple[str, str]]:
    """(where, text) for every command's and every parameter's help in the whole tree."""
    import typer.main

    found: list[tuple[str, str]] = []

    def walk(command: Any, path: str) -> None:
        if command.help:
            found.append((path, command.help))
        for param in command.params:
            if help_text := getattr(param, "help", None):
                found.append((f"{path} {param.name}", help_text))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "aml-rollout")
    return found


def test_no_help_text_is_swallowed_as_markup() -> None:
    """Help is rendered as rich markup, where `[default: x]` is a tag: it vanished, leaving
    `Model name .` (registry list, trigger status, --image-registry, --run-dir, --registry)."""
    from rich.text import Text

    swallowed = [
        f"{where}: {text!r}" for where, text in _helps() if Text.from_markup(text).plain != text
    ]
    assert not swallowed


def test_command_summaries_are_one_line() -> None:
    """A group's command list shows each command's first paragraph with its line breaks kept
    (rich markup mode), so a docstring wrapped at 100 columns read `held (4), failed (5),` then
    `error (2).` on a line of its own in `aml-rollout rollout --help`."""
    import inspect

    broken = [
        f"{where}: {text!r}"
        for where, text in _helps()
        if "\n" in inspect.cleandoc(text).split("\n\n")[0]
    ]
    assert not broken
