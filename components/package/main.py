"""Entry point of the package component: a registered version in, a package folder out.

The version is named one of two ways, exactly one of which must be given:

- `--registration DIR` (the training pipeline): the register step's registration.json, whose
  sha256 is checked too; the model files come from `--model` when the registry keeps no copy;
- `--model-name N --model-version V` (the deploy pipeline): a version already registered; its
  files come from `--registered-model` (Azure ML mounts `azureml:<name>:<version>` there, or one
  folder down: `package.model_folder`) or the registry's own folder (the local registry).

Neither or both is a clear error (exit 1) before anything is read.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from aml_pipelines.errors import ConfigError, PipelineError
from aml_pipelines.fileio import read_json_object
from components.common import setup_logging

log = logging.getLogger("components.package")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="components.package.main", description=__doc__)
    parser.add_argument("--registration", type=Path, default=None, help="registration.json folder")
    parser.add_argument("--model-name", default=None, help="a registered model's name")
    parser.add_argument("--model-version", type=int, default=None, help="its registered version")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="the model folder, when the registry keeps no local copy (Azure ML)",
    )
    parser.add_argument(
        "--registered-model", type=Path, default=None, help="the registered model's files"
    )
    parser.add_argument("--registry", required=True, help="local:PATH or azureml[:SUB/RG/WS]")
    parser.add_argument("--image-registry", required=True, help="e.g. myacr.azurecr.io")
    parser.add_argument("--mode", default="local", choices=["local", "azureml"])
    parser.add_argument("--package", type=Path, required=True, help="output: package folder")
    return parser.parse_args(argv)  # fmt: skip


def resolve_reference(args: argparse.Namespace) -> tuple[str, int, dict[str, Any] | None]:
    """(name, version, registration record or None) from exactly one way of naming a version."""
    by_name = args.model_name is not None or args.model_version is not None
    if args.registration is not None and by_name:
        raise ConfigError(
            "give either --registration (the register step's output) or "
            "--model-name/--model-version (a registered version), not both"
        )
    if args.model is not None and args.registered_model is not None:
        raise ConfigError("give either --model or --registered-model, not both")
    if args.registration is not None:
        path = args.registration / "registration.json"
        registration = read_json_object(path, required=("name", "version", "sha256"))
        version = registration["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"{path}: version {version!r} is not a registry version")
        return str(registration["name"]), version, registration
    if args.model_name is None or args.model_version is None:
        raise ConfigError(
            "no model version to package: give --registration, or both --model-name and "
            "--model-version"
        )
    if args.model_version < 1:
        raise ConfigError(f"--model-version: {args.model_version} is not a registry version")
    return str(args.model_name), int(args.model_version), None


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from aml_pipelines.registry.factory import open_registry
    from components.package.package import build_package
    from components.register.register import check_case_twin

    try:
        name, number, registration = resolve_reference(args)
        registry = open_registry(args.registry)
        version = registry.get(name, number)
        check_case_twin(registry, name)
        result = build_package(
            version,
            args.package,
            image_registry=args.image_registry,
            model_dir=args.model or args.registered_model,
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
