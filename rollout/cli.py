"""The `aml-rollout` command: one entry point, subcommands contributed by each package.

Every module imported here keeps heavy imports (azure.ai.ml, sklearn, fastapi, kubernetes) inside
command bodies, so `aml-rollout --help` stays fast. Errors raised on purpose (RolloutError,
PipelineError) become one red line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from aml_pipelines.cli import pipeline_app, registry_app
from aml_pipelines.errors import PipelineError
from aml_pipelines.trigger.cli import trigger_app
from rollout.commands.manifests import manifests
from rollout.commands.rollout import rollout_app
from rollout.commands.stack import demo, up
from rollout.errors import RolloutError
from scoring.cli import load, serve

EXIT_USER_ERROR = 2

app = typer.Typer(
    name="aml-rollout",
    help="Train, register, package and progressively roll out Azure ML models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.add_typer(
    pipeline_app, name="pipeline", help="Build, validate, submit or run the AML pipeline."
)
app.add_typer(registry_app, name="registry", help="List, show and tag registered model versions.")
app.add_typer(rollout_app, name="rollout", help="Run and steer progressive rollouts.")
app.add_typer(trigger_app, name="trigger", help="Start deliveries when a model is registered.")
app.command("serve", help="Serve a packaged model (the blue or green scoring server).")(serve)
app.command("load", help="Send bounded scoring load to a URL and print per-version counts.")(load)
app.command("demo", help="Run the whole story on the embedded local stack.")(demo)
app.command("up", help="Start the local stack and keep it running; prints the URLs.")(up)
app.command("manifests", help="Render the Kubernetes/Istio bootstrap objects as YAML.")(manifests)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except (RolloutError, PipelineError) as exc:
        # Escaped: messages quote paths and logs, whose `[...]` rich would take as markup (and
        # `:name:` as an emoji: emoji=False).
        Console(stderr=True, soft_wrap=True, emoji=False).print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False
        )
        sys.exit(getattr(exc, "exit_code", EXIT_USER_ERROR))


if __name__ == "__main__":  # python -m rollout.cli, e.g. from a checkout without the script
    main()
