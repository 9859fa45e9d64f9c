"""Entry point of the register component: gate, register, write registration.json.

Exit codes: 0 registered, 3 refused by the gate (a worse model), 1 any other error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aml_pipelines.errors import GateRefused, PipelineError
from components.common import git_commit, parse_bool, run_id, setup_logging

log = logging.getLogger("components.register")

EXIT_GATE_REFUSED = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="components.register.main", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the trained model folder")
    parser.add_argument(
        "--model-ref",
        default=None,
        help="what the registry records as the model's source (Azure ML: the azureml:// URI "
        "of the same folder); defaults to --model",
    )
    parser.add_argument("--registry", required=True, help="local:PATH or azureml[:SUB/RG/WS]")
    parser.add_argument("--metric", default="mse", choices=["mse", "rmse", "r2"])
    parser.add_argument("--max-regression", type=float, default=0.0)
    parser.add_argument("--force", type=parse_bool, default=False, help="true: skip the gate")
    parser.add_argument(
        "--rollout-in-job",
        type=parse_bool,
        default=False,
        help="true: this job's rollout step rolls the version out (tag it for the triggers)",
    )
    parser.add_argument(
        "--production-model",
        type=Path,
        default=None,
        help="a folder holding production's model files (Azure ML mounts them): production is "
        "re-scored from it after a data refresh, if it is still production's sha256",
    )
    parser.add_argument("--registration", type=Path, required=True, help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from aml_pipelines.registry.factory import open_registry
    from components.register.register import register_model

    source = args.model_ref if args.registry.startswith("azureml") else None
    try:
        register_model(
            args.model,
            open_registry(args.registry),
            metric=args.metric,
            max_regression=args.max_regression,
            force=args.force,
            rollout_in_job=args.rollout_in_job,
            source=source,
            source_run=run_id(),
            git_commit=git_commit(),
            out_dir=args.registration,
            production_model=args.production_model,
        )
    except GateRefused as exc:
        log.warning("%s", exc)  # an outcome, not a failure of the step: exit 3 says which
        return EXIT_GATE_REFUSED
    except (PipelineError, OSError) as exc:  # OSError: an unwritable registry or output folder
        log.error("registration failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
