"""`aml-rollout rollout ...`: run, validate, status, pause, resume, promote, abort, explain."""

from __future__ import annotations

import typer

rollout_app = typer.Typer(no_args_is_help=True)
