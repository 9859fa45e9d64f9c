"""The runtime closure of a list of requirements on a target platform, read from this environment.

Two places pin "everything these packages pull in": scripts/lock_environment.py writes
environment.yml's transitive block (the Azure ML steps' environment) and the package step writes
the scoring image's requirements.txt (components/package). Both ask the same question and answer
it offline, here: start from the top requirements, read each installed distribution's
Requires-Dist, keep those whose PEP 508 marker is true on the *target* platform (Linux x86_64,
CPython at a given version: `target_environment`, not the machine running this), follow the
requirements a requested extra guards (`uvicorn[standard]` adds uvloop, httptools...), and answer
each distribution reached with the version installed here.

A distribution may be asked for at another version than the installed one (`pinned`: the package
step pins a model's libraries at the versions it was trained with). Requirements on it are checked
against that version, but its own Requires-Dist are those of a version not installed here and
cannot be read: it is a leaf of the walk, listed in `Closure.unread`, and the caller says what it
does about the dependencies nobody pinned.

This module is imported by the components in Azure ML: the standard library and `packaging`
only (pinned in environment.yml: skops and azure-ai-ml's marshmallow need it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from aml_pipelines.errors import ClosureError

__all__ = ["Closure", "ClosureError", "closure", "target_environment"]


def target_environment(python: str) -> dict[str, str]:
    """PEP 508 marker values on the images we build for: Linux x86_64, CPython `python` (X.Y.Z)."""
    return {
        "implementation_name": "cpython",
        "implementation_version": python,
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": python,
        "python_version": ".".join(python.split(".")[:2]),
        "sys_platform": "linux",
    }


@dataclass(frozen=True)
class Closure:
    """What the top requirements need on the target: every distribution (the top ones included)
    by canonical name, with its version; `unread`, those among them taken at a version that is
    not installed here, whose own requirements were not followed."""

    versions: dict[NormalizedName, str]
    unread: tuple[NormalizedName, ...] = ()


def closure(
    top: Iterable[Requirement],
    environment: Mapping[str, str],
    *,
    pinned: Mapping[str, str] | None = None,
    top_name: str = "the top requirements",
) -> Closure:
    """Every distribution `top` needs in `environment` (marker values), walked a (name, extra)
    pair at a time: `foo[bar]` also takes the requirements foo guards with `extra == "bar"`.

    Versions are the installed ones, except `pinned` (name -> version): where that is not the
    installed version, the distribution is a leaf (`Closure.unread`). ClosureError when a needed
    distribution is not installed (and not pinned), or a requirement refuses the version there is.
    `top_name` names who asks for `top` in those errors.
    """
    overrides = {canonicalize_name(name): version for name, version in (pinned or {}).items()}
    versions: dict[NormalizedName, str] = {}
    unread: set[NormalizedName] = set()
    seen: set[tuple[NormalizedName, str]] = set()
    queue = deque((requirement, top_name) for requirement in top)
    while queue:
        requirement, wanted_by = queue.popleft()
        name = canonicalize_name(requirement.name)
        try:
            dist: metadata.Distribution | None = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            dist = None
        installed = None if dist is None else dist.version
        version = overrides.get(name, installed)
        if version is None:
            raise ClosureError(
                f"{wanted_by} needs {requirement}, but it is not installed here",
                package=name,
                installed=None,
            )
        if not requirement.specifier.contains(version, prereleases=True):
            where = "installed here" if version == installed else "pinned"
            raise ClosureError(
                f"{wanted_by} needs {requirement}, {where}: {version}",
                package=name,
                installed=version,
            )
        versions[name] = version
        if dist is None or version != installed:
            unread.add(name)  # another version's Requires-Dist: not this one's to read
            continue
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for line in dist.requires or []:
                needed = Requirement(line)
                if needed.marker is None or needed.marker.evaluate({**environment, "extra": extra}):
                    queue.append((needed, f"{name}[{extra}]" if extra else name))
    return Closure(versions, tuple(sorted(unread)))
