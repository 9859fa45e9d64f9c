"""In-memory TrafficRouter: the reference backend for tests, dry runs and the simulator.

It keeps what a real data plane keeps (weights, the release per colour). Optionally:

- `state_file`: the routes live in a JSON file written atomically (temp + fsync + rename), so they
  survive the controller process, as Envoy's or Istio's routes do (a file of another shape is a
  RouterError naming the file and the field);
- `journal`: every applied action is appended as one JSON line and fsync'ed before the call
  returns, so a test that SIGKILLs the controller can check exactly what reached the data plane.

Idempotent like every router: setting the weights already served, or removing an absent colour,
changes nothing (but is still journalled, so a test can count repeats).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from rollout.config import MemoryRouterConfig
from rollout.core.types import Colour, Release, Weights
from rollout.errors import RouterError, RouterRefused


class MemoryRouter:
    """A TrafficRouter held in memory (and optionally mirrored to a file)."""

    def __init__(
        self,
        *,
        weights: Weights | None = None,
        releases: dict[Colour, Release] | None = None,
        state_file: Path | None = None,
        journal: Path | None = None,
    ) -> None:
        self._state_file = state_file
        self._journal = journal
        self._weights = weights or Weights.blue_at(0)
        self._releases: dict[Colour, Release] = dict(releases or {})
        if state_file is not None and state_file.exists():
            self._load(state_file)

    @classmethod
    def from_config(cls, cfg: MemoryRouterConfig) -> MemoryRouter:
        """Build from the spec's router section."""
        return cls(state_file=cfg.state_file, journal=cfg.journal)

    # ------------------------------------------------------------------ TrafficRouter protocol

    def deploy(self, colour: Colour, release: Release) -> None:
        """Make `colour` serve `release`; traffic is unchanged."""
        self._releases[colour] = release
        self._commit("deploy", colour=colour.value, release=asdict(release))

    def release(self, colour: Colour) -> Release | None:
        """The release `colour` serves now, or None."""
        return self._releases.get(colour)

    def set_weights(self, weights: Weights) -> None:
        """Route default traffic by `weights`."""
        # RouterRefused, as every router says it: no retry deploys the colour.
        if weights.blue > 0 and Colour.BLUE not in self._releases:
            raise RouterRefused(f"cannot send {weights.blue} % to blue: nothing is deployed there")
        if weights.green > 0 and Colour.GREEN not in self._releases:
            raise RouterRefused(
                f"cannot send {weights.green} % to green: nothing is deployed there"
            )
        if weights.mirror > 0 and Colour.BLUE not in self._releases:
            raise RouterRefused(f"cannot mirror {weights.mirror} % to blue: nothing is deployed")
        self._weights = weights
        self._commit("set_weights", **self._weights_dict())

    def get_weights(self) -> Weights:
        """The weights served now."""
        return self._weights

    def remove(self, colour: Colour) -> None:
        """Remove `colour`'s workload (ending a mirror to it); a no-op when already gone."""
        if self._weights.of(colour) > 0:
            raise RouterError(f"cannot remove {colour.value}: it still serves default traffic")
        if colour is Colour.BLUE and self._weights.mirror:
            self._weights = Weights.blue_at(self._weights.blue)  # no copies to a removed blue
        self._releases.pop(colour, None)
        self._commit("remove", colour=colour.value)

    # ------------------------------------------------------------------------------ persistence

    def _commit(self, action: str, **fields: Any) -> None:
        # Data plane first, journal second: a kill in between leaves an applied-but-unjournalled
        # action, which the idempotent re-apply after restart journals. The reverse order could
        # journal something the data plane never served.
        path = self._state_file
        try:
            if path is not None:
                _atomic_write_json(path, self._snapshot())
            if (path := self._journal) is not None:
                line = json.dumps({"action": action, **fields}, sort_keys=True) + "\n"
                with path.open("a", encoding="utf-8") as fh:
                    fh.write(line)
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:
            # A folder that does not exist, a read-only one: no retry writes it (one line, not
            # a traceback). The spec names the file (`router.state_file` or `router.journal`).
            raise RouterRefused(
                f"memory router: cannot write {path}: {exc.strerror or exc}"
            ) from exc

    def _snapshot(self) -> dict[str, Any]:
        return {
            "weights": self._weights_dict(),
            "releases": {c.value: asdict(r) for c, r in self._releases.items()},
        }

    def _weights_dict(self) -> dict[str, int]:
        out = {"blue": self._weights.blue, "green": self._weights.green}
        if self._weights.mirror:  # (absent when 0: journals read as before)
            out["mirror"] = self._weights.mirror
        return out

    def _load(self, path: Path) -> None:
        try:
            state = _State.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise RouterError(f"memory router state {path} is unreadable: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(map(_problem, exc.errors(include_url=False)))
            raise RouterError(f"memory router state {path} is unreadable: {problems}") from None
        self._weights, self._releases = state.weights, state.releases


class _State(BaseModel):
    """The state file's shape, checked by pydantic against the core's own types (strict: no
    "10" or 10.5 or true for a weight, no null for a string unless the type allows it): JSON of
    another shape (a hand edit, another tool's file) raised AttributeError or TypeError from
    deep inside, or loaded weights of 10.5 %."""

    model_config = ConfigDict(strict=True, extra="forbid")

    weights: Weights
    releases: dict[Colour, Release]


#: What a pydantic error type says of the value it rejected.
_NOT = {
    "int_type": "a whole number",
    "string_type": "a string",
    "dict_type": "an object",
    "dataclass_type": "an object",
    "model_type": "an object",
}
#: What a field under each top-level key is, and which there are (for "is no ..." messages).
_FIELDS = {
    "weights": ("weight", [f.name for f in fields(Weights)]),
    "releases": ("release field", [f.name for f in fields(Release)]),
}


def _problem(error: ErrorDetails) -> str:
    """One pydantic error as a line naming the field: "`weights.blue` is "10", not a whole
    number", "`releases.blue.version` is missing"."""
    loc = [str(part) for part in error["loc"] if part != "[key]"]
    where, kind, ctx = ".".join(loc), error["type"], error.get("ctx", {})
    if kind in _NOT:
        subject = f"`{where}` is" if where else "the file holds"
        return f"{subject} {_shown(error['input'])}, not {_NOT[kind]}"
    if kind == "missing":
        return f"`{where}` is missing"
    if kind == "unexpected_keyword_argument":
        noun, names = _FIELDS[loc[0]]
        return f"`{where}` is no {noun} ({', '.join(names)})"
    if kind == "enum":  # the only enum: a colour key of `releases`
        return f"`{where}` is no colour ({', '.join(c.value for c in Colour)})"
    if kind == "value_error":  # Weights' own checks: out of range, not summing to 100
        return f"`{where}`: {ctx['error']}"
    if kind == "json_invalid":
        return f"not JSON: {ctx['error']}"
    return f"`{where}`: {error['msg']}"


def _shown(value: Any) -> str:
    """A JSON value as a message says it: `a list`, `an object`, `null`, `"10"`, `10.5`."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    shown = json.dumps(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON so a reader (or a crash) sees the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
