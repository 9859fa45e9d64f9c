"""Entry point of the rollout component: package + spec in, a judged rollout out.

It validates its inputs, then calls the engine's public API (`rollout.api.run_rollout`) with the
package as the candidate release. It never pretends: if the engine cannot be imported it fails
with "rollout engine not available". The rollout's state and JSONL ledger go to the `result`
output, with `result.json` {phase, reason, ledger, candidate, stable, tags}.

With `--registry`, the registry follows traffic once the rollout ends, exactly as the trigger's
in-process delivery does (`aml_pipelines.delivery.follow_traffic`): promoted → the candidate is
`stage=production` and the previous production version `stage=archived`; rolled back → the
candidate is `stage=rolled-back` with `rollback_reason`. This is what keeps the registry true when
the rollout runs inside an Azure ML job (the deploy pipeline), where no trigger process sees its
outcome. A paused rollout changes no tag. Tags that cannot be written fail the step (exit 1): the
traffic moved, and a registry that says otherwise must not look like success. The outcome reaches
`result.json` all the same, whatever the tagging raised: its `tags` says `written`, or `not
written: <why>` (null without `--registry`; `pending` in the copy a rollout writes before tagging,
which a step killed meanwhile leaves).

A model's first release (green serving nothing, no `stable:` in the spec, and no production
version in `--registry`) has nothing to be compared with: as in the trigger's delivery
(`aml_pipelines.delivery.check_first_release`), it is deployed to green with all traffic and
judged on the spec's absolute limits; with `--registry` it is tagged `stage=production` and
`first_check=<verdict>` (it stays deployed whatever the verdict). `result.json` then carries
`first_check` too, and `traffic`: what the router serves once the tags are written,
`{"green": w, "blue": w}` as read back (`delivery.served_traffic`), not what was asked. That read
is a report: weights that cannot be read (any error) give `traffic: null` and a line saying so,
and change neither the tags nor the exit code.

Exit codes: 0 promoted (Succeeded; a first release's check Successful, or unjudged), 3 rolled
back, 4 engine not available, 5 paused for a human (a first release's check Inconclusive), 1
failed (a first release's check Failed or Error) or invalid input, 130 interrupted (SIGINT, or
SIGTERM: Azure ML cancelling the job).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
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
_EXIT_BY_PHASE = {
    "Succeeded": 0,
    "RolledBack": EXIT_ROLLED_BACK,
    "Paused": EXIT_PAUSED,
    "Inconclusive": EXIT_PAUSED,  # a first release's check: a human's call
}
_PACKAGE_KEYS = ("model", "version", "sha256", "image")
#: result.json's `tags` (null without --registry): written, or "not written: <why>"; pending in
#: the copy written before tagging, which a step killed meanwhile leaves.
TAGS_WRITTEN = "written"
TAGS_PENDING = "pending"


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
    version = package["version"]
    if isinstance(version, bool) or not re.fullmatch(r"[1-9][0-9]*", str(version)):
        # The registry's versions are whole numbers; the registry tags and a first release's
        # check read it as one, after the release is deployed.
        raise InvalidInput(
            f"package: {path}: version {version!r} is not a registry version (a whole number "
            "from 1)"
        )
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
        from rollout.commands.stack import sigterm_as_interrupt
        from rollout.controller import RealClock
        from rollout.core.types import Release
        from rollout.errors import RolloutError
    except ImportError as exc:
        log.error("rollout engine not available (%s); nothing was rolled out", exc)
        return EXIT_ENGINE_UNAVAILABLE

    from aml_pipelines.delivery import starts_anew

    candidate = Release(
        model=str(package["model"]),
        version=str(package["version"]),
        sha256=str(package["sha256"]),
        image=str(package["image"]),
        model_dir=str(args.package.resolve()),
    )
    # Azure ML stops a cancelled job's step with SIGTERM: stop as on Ctrl-C (the lease released,
    # the log saying where the rollout stands), not die mid-tick.
    with sigterm_as_interrupt() as stopping:
        clock = RealClock(stopping)  # stops at its next wait should the signal's raise be lost
        try:
            spec = load_spec(args.spec)
            first = _first_release(spec, candidate, args.registry)
            if first is not None:
                return _check_first(spec, candidate, first, args, clock)
            log.info("rolling out %s:%s (%s)", candidate.model, candidate.version, candidate.image)
            # A pipeline step must end: a rollout held for a human stops here (exit 5, resumable).
            result = run_rollout(
                spec,
                candidate=candidate,
                state_dir=args.result,
                stop_when_paused=True,
                restart=starts_anew(spec, candidate, args.result),
                clock=clock,
            )
        except (RolloutError, _RegistryUnreadable) as exc:
            log.error("rollout failed: %s", exc)
            return 1
        except KeyboardInterrupt:  # Ctrl-C in run-local: a traceback told nothing of the rollout
            log.error(
                "interrupted: the rollout stopped without a verdict; "
                "its status and ledger are in %s",
                args.result,
            )
            return EXIT_INTERRUPTED
    outcome = {
        "phase": str(result.phase),
        "reason": result.reason,
        "ledger": str(result.ledger_path),
        "candidate": asdict(result.candidate) if result.candidate else None,
        "stable": asdict(result.stable) if result.stable else None,
        "tags": None,
    }
    log.info("rollout ended %s: %s (ledger %s)", result.phase, result.reason, result.ledger_path)
    if not args.registry:
        write_json(args.result / "result.json", outcome)
        return _EXIT_BY_PHASE.get(str(result.phase), 1)
    registry = args.registry
    written = _tag_then_record(
        args.result,
        lambda: _follow_traffic(registry, candidate, result),
        lambda tags: outcome | {"tags": tags},
    )
    return _EXIT_BY_PHASE.get(str(result.phase), 1) if written["tags"] == TAGS_WRITTEN else 1


class _RegistryUnreadable(Exception):
    """The registry could not say whether the model has a production version."""


def _first_release(spec: Any, candidate: Any, registry_spec: str | None) -> Any:
    """The router to deploy `candidate` to as the model's first release, or None when it is a
    rollout: the spec names `stable`, the registry holds a production version of the model
    (other than the candidate, which a run cut short after tagging made one), or green serves
    another release."""
    from aml_pipelines.delivery import green_is_free
    from aml_pipelines.registry.base import STAGE_TAG, Stage
    from rollout.routers.factory import make_router

    if spec.stable is not None:
        return None
    if registry_spec:
        from aml_pipelines.errors import PipelineError
        from aml_pipelines.registry.factory import open_registry

        try:
            production = open_registry(registry_spec).find_by_tag(
                candidate.model, STAGE_TAG, Stage.PRODUCTION
            )
        except PipelineError as exc:
            raise _RegistryUnreadable(f"reading the production version failed: {exc}") from None
        if any(str(v.version) != candidate.version for v in production):
            return None
    router = make_router(spec.router)  # one client for all calls (azureml: an MLClient)
    return router if green_is_free(spec, candidate, router) else None


def _check_first(
    spec: Any, candidate: Any, router: Any, args: argparse.Namespace, clock: Any
) -> int:
    """Deploy and judge a first release; (with --registry) tag it; write result.json with the
    traffic the router serves then."""
    from aml_pipelines.delivery import (
        FAILED,
        FIRST_CHECK_OUTCOMES,
        check_first_release,
        first_release_reason,
        served_traffic,
    )

    check, reason, ledger = check_first_release(
        spec, candidate, state_dir=args.result, router=router, clock=clock
    )
    phase = FIRST_CHECK_OUTCOMES.get(check, FAILED)

    def record(tags: str | None) -> dict[str, Any]:
        # Read once tagged: a report, which fails nothing that was deployed and tagged, and may
        # be slow to fail. Not read yet for the pending record written before the tags.
        if tags == TAGS_PENDING:
            traffic = None
            told = f"first release of {candidate.model} deployed to green, its check {check}: "
            told += f"{reason} (its tags being written, the traffic it serves read after)"
        else:
            traffic = served_traffic(router, candidate.ref)
            told = first_release_reason(
                candidate.model, int(candidate.version), check, reason, traffic
            )
        return {
            "phase": phase,
            "reason": told,
            "ledger": str(ledger),
            "candidate": asdict(candidate),
            "stable": None,
            "first_check": check,
            "traffic": traffic,
            "tags": tags,
        }

    if args.registry:
        registry = args.registry
        written = _tag_then_record(
            args.result, lambda: _tag_first(registry, candidate, check, reason), record
        )
    else:
        written = record(None)
        write_json(args.result / "result.json", written)
    log.log(logging.ERROR if phase == FAILED else logging.INFO, "%s", written["reason"])
    return _EXIT_BY_PHASE.get(phase, 1) if written["tags"] in (None, TAGS_WRITTEN) else 1


def _tag_then_record(
    folder: Path, tag: Callable[[], str | None], record: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """`tag()` (None, or why the tags were not written), then `record(tags)` written to
    `folder/result.json` and returned, whatever `tag` raised; `tags` is TAGS_WRITTEN or
    "not written: <why>".

    The traffic moved before the tags are written: an error nobody mapped (a bug, an SDK's own
    exception, an interrupt) must not take the outcome with it. It still propagates after the
    record, with its traceback. Written first with `tags` TAGS_PENDING too: a step killed
    while tagging (SIGKILL, the node lost) still leaves its outcome."""
    tags = TAGS_PENDING
    write_json(folder / "result.json", record(tags))
    try:
        failed = tag()
        tags = TAGS_WRITTEN if failed is None else f"not written: {failed}"
    except BaseException as exc:
        tags = f"not written: {type(exc).__name__}: {exc}"
        raise
    finally:
        written = record(tags)
        write_json(folder / "result.json", written)
    return written


def _tag_first(registry_spec: str, candidate: Any, check: str, reason: str) -> str | None:
    """Tag a first release after its check; why not (logged) when that failed."""
    from aml_pipelines.delivery import tag_first_release

    def tag(registry: Any, model: str, version: int) -> None:
        tag_first_release(registry, model, version, check, reason)

    return _write_tags(registry_spec, candidate, f"the first release was checked ({check})", tag)


def _follow_traffic(registry_spec: str, candidate: Any, result: Any) -> str | None:
    """Tag the registry after the rollout's outcome; why not (logged) when that failed."""
    from aml_pipelines.delivery import follow_traffic

    phase = getattr(result.phase, "value", str(result.phase))

    def tag(registry: Any, model: str, version: int) -> None:
        follow_traffic(registry, model, version, phase, result.reason)

    return _write_tags(registry_spec, candidate, f"the rollout ended {phase}", tag)


def _write_tags(
    registry_spec: str, candidate: Any, done: str, tag: Callable[[Any, str, int], None]
) -> str | None:
    """`tag(registry, model, version)` on the candidate's version (which logs each tag); None
    when done, else why not, logged as "`done` but the registry tags were not written"."""
    from aml_pipelines.errors import PipelineError
    from aml_pipelines.registry.factory import open_registry

    try:
        registry = open_registry(registry_spec)
        version = int(candidate.version)
        # A version the registry does not hold (another registry, a damaged version left out of
        # listings) would get no tags and no error: the registry would not follow traffic.
        registry.get(candidate.model, version)
        tag(registry, candidate.model, version)
    except (PipelineError, ValueError, OSError) as exc:  # OSError: one the registry left unmapped
        log.error("%s but the registry tags were not written: %s", done, exc)
        return str(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
