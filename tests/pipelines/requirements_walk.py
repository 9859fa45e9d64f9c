"""What environment.yml pins, and an independent walk of installed Requires-Dist, for the tests.

The tests of the pinned closures (environment.yml, constraints-dev.txt, the package image's
requirements.txt) check what aml_pipelines.closure wrote: this walk and these marker values are
written apart from it on purpose, so that a mistake there is not repeated here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def environment_yml() -> tuple[list[str], list[str]]:
    """environment.yml's conda dependencies and its pip requirements."""
    deps = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    return [str(d) for d in deps if not isinstance(d, dict)], pip


def image_markers() -> dict[str, str]:
    """PEP 508 marker values on the steps' image: Linux x86_64, CPython at environment.yml's
    `python=` pin. A dependency only Windows, macOS or another Python needs is not pinned."""
    (python,) = [d.partition("=")[2] for d in environment_yml()[0] if d.startswith("python=")]
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
        "python_version": python.rpartition(".")[0],
        "sys_platform": "linux",
    }


def walk(
    top: list[tuple[Requirement, str]],
    markers: Mapping[str, str],
    *,
    follow: Callable[[str], bool] = lambda name: True,
) -> Iterator[tuple[Requirement, str]]:
    """Every requirement reached from `top`, with who asked for it: the installed Requires-Dist
    of each package `follow` accepts (by canonical name), markers evaluated in `markers`, an
    extra asked for adding what the package guards with `extra == ...`. Written apart from
    aml_pipelines.closure on purpose: these tests check what it wrote."""
    seen: set[tuple[str, str]] = set()
    queue = list(top)
    while queue:
        requirement, wanted_by = queue.pop()
        yield requirement, wanted_by
        name = canonicalize_name(requirement.name)
        if not follow(name):
            continue
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for line in metadata.requires(name) or []:
                dependency = Requirement(line)
                if dependency.marker is None or dependency.marker.evaluate(
                    {**markers, "extra": extra}
                ):
                    queue.append((dependency, f"{name}[{extra}]" if extra else name))
