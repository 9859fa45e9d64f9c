"""`aml-rollout pipeline ...` and `aml-rollout registry ...` (heavy imports inside commands)."""

from __future__ import annotations

import typer

pipeline_app = typer.Typer(no_args_is_help=True)
registry_app = typer.Typer(no_args_is_help=True)
