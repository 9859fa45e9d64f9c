"""Entry point of the rollout component: package + spec in, a judged rollout out.

It validates its inputs, then calls the engine's public API (`rollout.api.run_rollout`) with the
package as the candidate release. It never pretends: if the engine cannot be imported it fails
with "rollout engine not available". The rollout's state and JSONL ledger go to the `result`
output, with `result.json` {phase, reason, ledger, candidate, stable}.

With `--registry`, the registry follows traffic once the rollout ends, exactly as the trigger's
in-process delivery does (`aml_pipelines.delivery.follow_traffic`): promoted → the candidate is
`stage=production` and the previous production version `stage=archived`; rolled back → the
candidate is `stage=rolled-back` with `rollback_reason`. This is what keeps the registry true when
the rollout runs inside an Azure ML job (the deploy pipeline), where no trigger process sees its
outcome. A paused rollout changes no tag. Tags that cannot be written fail the step (exit 1): the
traffic moved, and a registry that says otherwise must not look like success.

Exit codes: 0 promoted (Succeeded), 3 rolled back, 4 engine not available, 5 paused for a human,
1 failed or invalid input, 130 interrupted (SIGINT).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aml_pipelines.errors import ConfigError
from aml_pipelines.fileio import read_json_object
from components.common import setup_logging, write_json

log = logging.getLogger("components.rollout")

EXIT_ROLLED_BACK = 3
EXIT_ENGINE_UNAVAILABLE = 4
EXIT_PAUSED = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
_EXIT_BY_PHASE = {"Succeeded": 0, "RolledBack": EXIT_ROLLED_BACK, "Paused": EXIT_PAUSED}
_PACKAGE_KEYS = ("model", "version", "sha256", "image")


class InvalidInput(Exception):
    """An input of the component is missing or malformed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="components.rollout.main", description=__doc__)
    parser.add_argument("--package", type=Path, required=True, help="package folder")
    parser.add_argument("--spec", type=Path, required=True, help="rollout spec (YAML)")
    parser.add_argument(
        "--registry", default=None, help="local:PATH or azureml[:SUB/RG/WS]: tag the outcome"
    )
    parser.add_argument("--result", type=Path, required=True, help="output folder")
    return parser.parse_args(argv)


def read_package(folder: Path) -> dict[str, Any]:
    """package.json of a package folder, with the fields the rollout needs."""
    path = folder / "package.json"
    if not path.is_file():
        raise InvalidInput(f"package: {path} not found (run the package step first)")
    try:
        package = read_json_object(path)
    except ConfigError as exc:
        raise InvalidInput(f"package: {exc}") from None
    if missing := [key for key in _PACKAGE_KEYS if not package.get(key)]:
        raise InvalidInput(f"package: {path} lacks {missing}")
    return package


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        package = read_package(args.package)
        if not args.spec.is_file():
            raise InvalidInput(f"spec: {args.spec} not found")
    except InvalidInput as exc:
        log.error("%s", exc)
        return 1
    try:
        from rollout.api import load_spec, run_rollout
        from rollout.core.types import Release
        from rollout.errors import RolloutError
    except ImportError as exc:
        log.error("rollout engine not available (%s); nothing was rolled out", exc)
        return EXIT_ENGINE_UNAVAILABLE

    candidate = Release(
        model=str(package["model"]),
        version=str(package["version"]),
        sha256=str(package["sha256"]),
        image=str(package["image"]),
        model_dir=str(args.package.resolve()),
    )
    try:
        spec = load_spec(args.spec)
        log.info("rolling out %s:%s (%s)", candidate.model, candidate.version, candidate.image)
        # A pipeline step must end: a rollout held for a human stops here (exit 5, resumable).
        result = run_rollout(
            spec, candidate=candidate, state_dir=args.result, stop_when_paused=True
        )
    except RolloutError as exc:
        log.error("rollout failed: %s", exc)
        return 1
    except KeyboardInterrupt:  # Ctrl-C in run-local: a traceback told nothing of the rollout
        log.error(
            "interrupted: the rollout stopped without a verdict; its status and ledger are in %s",
            args.result,
        )
        return EXIT_INTERRUPTED
    write_json(
        args.result / "result.json",
        {
            "phase": str(result.phase),
            "reason": result.reason,
            "ledger": str(result.ledger_path),
            "candidate": asdict(result.candidate) if result.candidate else None,
            "stable": asdict(result.stable) if result.stable else None,
        },
    )
    log.info("rollout ended %s: %s (ledger %s)", result.phase, result.reason, result.ledger_path)
    if args.registry and not _follow_traffic(args.registry, candidate, result):
        return 1
    return _EXIT_BY_PHASE.get(str(result.phase), 1)


def _follow_traffic(registry_spec: str, candidate: Any, result: Any) -> bool:
    """Tag the registry after the rollout's outcome; False (logged) when that failed."""
    from aml_pipelines.delivery import follow_traffic
    from aml_pipelines.errors import PipelineError
    from aml_pipelines.registry.factory import open_registry

    phase = getattr(result.phase, "value", str(result.phase))
    try:
        registry = open_registry(registry_spec)
        version = int(candidate.version)
        # A version the registry does not hold (another registry, a damaged version left out of
        # listings) would get no tags and no error: the registry would not follow traffic.
        registry.get(candidate.model, version)
        follow_traffic(registry, candidate.model, version, phase, result.reason)  # logs each tag
    except (PipelineError, ValueError) as exc:
        log.error("the rollout ended %s but the registry tags were not written: %s", phase, exc)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
