"""`aml-rollout trigger ...`: registry watcher and Event Grid webhook (heavy imports inside)."""

from __future__ import annotations

import typer

trigger_app = typer.Typer(no_args_is_help=True)
