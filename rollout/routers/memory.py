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
            data = json.loads(path.read_text(encoding="utf-8"))
            state = _json_object(data, "the file holds")
            self._weights = _weights_from(_json_object(_field(state, "weights"), "`weights` is"))
            self._releases = _releases_from(
                _json_object(_field(state, "releases"), "`releases` is")
            )
        except (OSError, ValueError) as exc:
            raise RouterError(f"memory router state {path} is unreadable: {exc}") from exc
        except RecursionError as exc:  # (json's, on arrays nested thousands deep)
            raise RouterError(f"memory router state {path} is unreadable: nested too deep") from exc


# The state file's shape, checked field by field: JSON of another shape (a hand edit, another
# tool's file) raised AttributeError or TypeError from deep inside, or loaded weights of 10.5 %.

_WEIGHTS = ("blue", "green", "mirror")
_RELEASE_FIELDS = {f.name for f in fields(Release)}
#: The release fields that may be null (the others are strings; model and version required).
_NULLABLE = {"image", "model_dir", "deployment"}


def _weights_from(data: dict[str, Any]) -> Weights:
    """The `weights` object as Weights: whole numbers for blue and green (mirror optional)."""
    for name, value in data.items():
        if name not in _WEIGHTS:
            raise ValueError(f"`weights.{name}` is no weight ({', '.join(_WEIGHTS)})")
        if type(value) is not int:  # (not a bool, nor 10.0)
            raise ValueError(f"`weights.{name}` is {_shown(value)}, not a whole number")
    for name in _WEIGHTS[:2]:
        _field(data, name, "weights.")
    try:
        return Weights(**data)
    except ValueError as exc:  # out of range, not summing to 100
        raise ValueError(f"`weights`: {exc}") from exc


def _releases_from(data: dict[str, Any]) -> dict[Colour, Release]:
    """The `releases` object (colour: the Release's fields, strings; some may be null)."""
    releases: dict[Colour, Release] = {}
    for key, value in data.items():
        if key not in {c.value for c in Colour}:
            raise ValueError(f"`releases.{key}` is no colour (blue, green)")
        release = _json_object(value, f"`releases.{key}` is")
        for name, field_value in release.items():
            where = f"`releases.{key}.{name}`"
            if name not in _RELEASE_FIELDS:
                raise ValueError(f"{where} is no release field")
            if not isinstance(field_value, str) and not (field_value is None and name in _NULLABLE):
                raise ValueError(f"{where} is {_shown(field_value)}, not a string")
        for name in ("model", "version"):
            _field(release, name, f"releases.{key}.")
        releases[Colour(key)] = Release(**release)
    return releases


def _json_object(value: Any, what: str) -> dict[str, Any]:
    """`value` if a JSON object; else ValueError: "`what` a list, not an object"."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} {_shown(value)}, not an object")
    return value


def _field(data: dict[str, Any], name: str, prefix: str = "") -> Any:
    """`data[name]`; ValueError naming `prefix + name` when it is missing."""
    if name not in data:
        raise ValueError(f"`{prefix}{name}` is missing")
    return data[name]


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
