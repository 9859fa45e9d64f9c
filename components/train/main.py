"""Entry point of the train component: parse the command line, train, log. No logic here."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aml_pipelines.errors import PipelineError
from components.common import setup_logging

log = logging.getLogger("components.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="components.train.main", description=__doc__)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", type=Path, default=None, help="CSV file or folder of CSVs")
    parser.add_argument("--target", default=None, help="target column of the CSV data")
    parser.add_argument("--model-dir", type=Path, required=True, help="output: model folder")
    parser.add_argument("--metrics-dir", type=Path, default=None, help="output: metrics.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from components.train.train import TrainParams, train

    try:
        params = TrainParams(alpha=args.alpha, test_fraction=args.test_fraction, seed=args.seed)
        result = train(
            args.model_dir,
            name=args.model_name,
            params=params,
            data=args.data,
            target=args.target,
            metrics_dir=args.metrics_dir,
        )
    except (PipelineError, OSError) as exc:  # OSError: an unreadable file, an unwritable output
        log.error("training failed: %s", exc)
        return 1
    log.info("model folder written to %s", result.model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
