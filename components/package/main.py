"""Entry point of the package component: registered version in, package folder out."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aml_pipelines.errors import PipelineError
from components.common import read_json, setup_logging

log = logging.getLogger("components.package")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="components.package.main", description=__doc__)
    parser.add_argument("--registration", type=Path, required=True, help="registration.json folder")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="the model folder, when the registry keeps no local copy (Azure ML)",
    )
    parser.add_argument("--registry", required=True, help="local:PATH or azureml[:SUB/RG/WS]")
    parser.add_argument("--image-registry", required=True, help="e.g. myacr.azurecr.io")
    parser.add_argument("--mode", default="local", choices=["local", "azureml"])
    parser.add_argument("--package", type=Path, required=True, help="output: package folder")
    return parser.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from aml_pipelines.registry.factory import open_registry
    from components.package.package import build_package

    try:
        registration = read_json(args.registration / "registration.json")
        registry = open_registry(args.registry)
        version = registry.get(registration["name"], int(registration["version"]))
        result = build_package(
            version,
            args.package,
            image_registry=args.image_registry,
            model_dir=args.model,
            registration=registration,
            mode=args.mode,
            ml_client=getattr(registry, "ml_client", None),
        )
    except (PipelineError, OSError, KeyError) as exc:
        log.error("packaging failed: %s", exc)
        return 1
    log.info("package for %s written to %s", result.image, result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
