"""Rewrite environment.yml's transitive block and constraints-dev.txt, as installed here.

environment.yml's `pip:` list has two parts. The top one is written by hand: pyproject's runtime
dependencies, each `==` the version the venv runs. Below the comment that starts with HEADER, this
script writes every package those pull in on the Azure ML image (Linux x86_64, CPython at the
file's `python=` pin; markers for other platforms and pythons evaluate false, requested extras
such as uvicorn[standard] count), each `==` the version installed in the interpreter running it.
Nothing a step imports floats, and `make` installs the venv with the same pins as constraints.
The walk is aml_pipelines/closure.py's, the one the package step pins its image's
requirements.txt with.

An upgrade: change a top pin, `make` (re-installs the venv at it), then, with the venv's python,

    .venv/bin/python scripts/lock_environment.py           # rewrite the block in place
    .venv/bin/python scripts/lock_environment.py --check   # exit 1 if the file is not current

If `make` refuses the new pin because it needs another version of a package the block pins
(pydantic pins its pydantic-core exactly, so every pydantic upgrade does), `--clear` the block
first: `make` then installs what the new pin needs and keeps the rest as installed.

Only the lines from HEADER to the end of the `pip:` list are rewritten; the top pins and every
other line stay as written.

The same run writes constraints-dev.txt, next to environment.yml: everything pyproject's `dev`
extra (pytest, ruff, mypy...) pulls in on *this* machine (markers evaluated here: dev runs
locally) that environment.yml does not pin, each `==` the installed version. `make` installs the
venv with both files as constraints, so a new pytest or mypy release cannot break `make check`;
none of it goes into the Azure ML environment. To upgrade a dev tool, `.venv/bin/pip install -U`
it, then run this script. `--check` and `--clear` act on both files.
tests/pipelines/test_environment.py checks the result offline.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import NormalizedName, canonicalize_name

from aml_pipelines.closure import ClosureError, closure, target_environment

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT_YML = REPO / "environment.yml"
PYPROJECT = REPO / "pyproject.toml"
DEV_CONSTRAINTS = "constraints-dev.txt"  # written next to the environment.yml given
HEADER = "# The transitive closure of the pins above"
DEV_HEADER = """\
# pip constraints for the dev tools: everything pyproject's `dev` extra pulls in on this machine
# (PEP 508 markers evaluated here) that environment.yml does not pin, each == the version the venv
# runs. `make` installs with environment.yml's pins and these; none of it goes into the Azure ML
# environment. Generated, do not edit: `.venv/bin/python scripts/lock_environment.py` rewrites it
# with environment.yml (to upgrade a dev tool, `.venv/bin/pip install -U` it first).
"""
_PIP = re.compile(r"^(?P<indent> *)- pip:\s*$")
_PYTHON = re.compile(r"^ *- python=(?P<version>\d+\.\d+\.\d+)\s*$")


class LockError(Exception):
    """The venv cannot give the block: a needed package missing, or installed at a version the
    package needing it refuses (a top pin changed but not yet installed, say)."""


def rewrite(text: str, *, clear: bool = False) -> str:
    """`text` (environment.yml) with the transitive block (re)written for this interpreter, or
    (`clear`) with its comment only."""
    lines = text.splitlines(keepends=True)
    start, end = _pip_list(lines)
    python = next((m["version"] for m in map(_PYTHON.match, lines) if m), None)
    if python is None:
        raise LockError("environment.yml has no `- python=X.Y.Z` or no `- pip:` list")
    items = lines[start + 1 : end]
    block = next((i for i, line in enumerate(items) if line.strip().startswith(HEADER)), None)
    top_lines = items if block is None else items[:block]
    top = _pins(top_lines)
    if not top:
        raise LockError("environment.yml's `- pip:` list has no pins above the generated block")
    item_indent = " " * min(_indent(line) for line in top_lines if line.strip().startswith("- "))
    if not top_lines[-1].endswith("\n"):
        top_lines[-1] += "\n"  # the file ended on the last top pin
    pins = {canonicalize_name(r.name) for r in top}
    versions = {} if clear else _closure(top, target_environment(python), "environment.yml")
    comment = [
        f"{HEADER} on the image (Linux x86_64, CPython {python}), each",
        "# == the version the venv runs. Generated, do not edit: change a pin above, `make`, then",
        "# `.venv/bin/python scripts/lock_environment.py` (`--clear` first if `make` conflicts).",
    ]
    generated = [f"{item_indent}{line}\n" for line in comment] + [
        f"{item_indent}- {name}=={versions[name]}\n"
        for name in sorted(versions)
        if name not in pins
    ]
    return "".join(lines[: start + 1] + top_lines + generated + lines[end:])


def dev_constraints(environment_yml: str, dev: list[Requirement], *, clear: bool = False) -> str:
    """constraints-dev.txt: everything `dev` (pyproject's dev extra) needs on this machine that
    `environment_yml` (the file's text, block written) does not pin; (`clear`) the header only."""
    lines = environment_yml.splitlines()
    start, end = _pip_list(lines)
    pinned = {canonicalize_name(r.name) for r in _pins(lines[start + 1 : end])}
    here = {key: str(value) for key, value in default_environment().items()}  # a TypedDict
    versions = {} if clear else _closure(dev, here, "pyproject's dev extra")
    return DEV_HEADER + "".join(
        f"{name}=={versions[name]}\n" for name in sorted(versions) if name not in pinned
    )


def _dev_requirements() -> list[Requirement]:
    extras = tomllib.loads(PYPROJECT.read_text())["project"].get("optional-dependencies", {})
    if "dev" not in extras:
        raise LockError(f"{PYPROJECT} has no `dev` extra")
    return [Requirement(line) for line in extras["dev"]]


def _pins(lines: list[str]) -> list[Requirement]:
    """The requirements of the `- ...` items among `lines` (comments skipped)."""
    pins = []
    for item in (line.strip()[2:] for line in lines if line.strip().startswith("- ")):
        try:
            pins.append(Requirement(item))
        except InvalidRequirement as exc:  # e.g. conda's `- pkg=1.0`
            why = str(exc).splitlines()[0]  # packaging adds the item and a caret below
            raise LockError(
                f"the `- pip:` item {item!r} is not a pip requirement ({why}): "
                "pin it as name==version"
            ) from None
    return pins


def _pip_list(lines: list[str]) -> tuple[int, int]:
    """The index of `- pip:` in `lines` and the end of its list (past its last item)."""
    pip = next(((i, m) for i, m in enumerate(map(_PIP.match, lines)) if m), None)
    if pip is None:
        raise LockError("environment.yml has no `- python=X.Y.Z` or no `- pip:` list")
    start, indent = pip[0], len(pip[1]["indent"])
    end = start + 1  # the list runs to the first line indented no deeper than `- pip:`
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1  # trailing blank lines are the file's, not the list's
    return start, end


def _closure(
    top: list[Requirement], environment: Mapping[str, str], top_name: str
) -> dict[NormalizedName, str]:
    """The venv's versions of everything `top` needs in `environment` (aml_pipelines.closure)."""
    try:
        return closure(top, environment, top_name=top_name).versions
    except ClosureError as exc:
        if exc.installed is None:
            hint = "`make` first (on Linux, with the image's python)"
        else:
            hint = (
                "`make` re-installs the venv at environment.yml's pins, after `--clear` if pip "
                "finds they conflict; then run this again"
            )
        raise LockError(f"{exc}: {hint}") from exc


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=ENVIRONMENT_YML,
        help=f"{DEV_CONSTRAINTS} goes next to it",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if either file is not current"
    )
    mode.add_argument(
        "--clear",
        action="store_true",
        help="empty the block and the dev constraints, so that `make` can install a changed top "
        "pin's own dependencies",
    )
    args = parser.parse_args(argv)
    dev_path = args.path.with_name(DEV_CONSTRAINTS)
    try:
        text = args.path.read_text()
        dev_text = dev_path.read_text() if dev_path.exists() else ""
    except OSError as exc:
        print(f"error: {exc.filename}: cannot be read ({exc.strerror})", file=sys.stderr)
        return 2
    try:
        locked = rewrite(text, clear=args.clear)
        dev_locked = dev_constraints(locked, _dev_requirements(), clear=args.clear)
    except LockError as exc:
        print(f"error: {args.path}: {exc}", file=sys.stderr)
        return 2
    stale = {
        path: (new, what)
        for path, old, new, what in [
            (args.path, text, locked, "transitive block"),
            (dev_path, dev_text, dev_locked, "dev constraints"),
        ]
        if new != old
    }
    for path, (new, what) in stale.items():
        if args.check:
            print(
                f"{path}: the {what} differ from this venv's closure; "
                f"run {sys.executable} scripts/{Path(__file__).name}",
                file=sys.stderr,
            )
        else:
            path.write_text(new)
            print(f"{path}: {what} {'emptied' if args.clear else 'rewritten'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
