"""`aml-rollout trigger watch|serve`: start deliveries when a model version is registered.

Both commands build the same pieces — a registry, the delivery path, the trigger store and the
dispatcher — and differ only in where versions come from: `watch` polls the registry, `serve`
receives Azure Event Grid's ModelRegistered events. `--delivery` picks the delivery path:

- `engine` (default, aml_pipelines/delivery.py): package here and run the rollout controller in
  this process, against whatever router the spec names;
- `pipeline` (aml_pipelines/azure_delivery.py): submit the deploy pipeline (package → rollout)
  to the Azure ML workspace named by --subscription/--resource-group/--workspace, whose registry
  is the one watched; the job rolls out and writes the registry tags.

`watch --once` exits with the code of the worst outcome of its pass, as `aml-rollout rollout
run` would for that outcome (`once_exit_code`): 0 when every version was promoted (or superseded,
skipped, submitted — or nothing was new), 3 rolled back, 4 a first release's check undecided, 5
failed (a rollout, a first release's check, a version that could not be delivered); 2 is an error
to fix (bad options, the lock held, a router or registry unreachable), as for every command.

Only typer and the stdlib are imported at module level; the rest is imported inside the commands
so that `aml-rollout --help` stays fast.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from aml_pipelines.delivery import DeliveryOutcome
    from aml_pipelines.registry.base import ModelRegistry
    from aml_pipelines.trigger.dispatch import Dispatcher
    from aml_pipelines.trigger.webhook import Filter

trigger_app = typer.Typer(no_args_is_help=True)

DEFAULT_STATE = Path(".aml-rollout") / "trigger"
DEFAULT_SECRET_ENV = "AML_ROLLOUT_TRIGGER_SECRET"  # noqa: S105 (a variable name, not a secret)
MIN_SECRET_CHARS = 16
#: The longest `watch --interval` (a day): a poll further apart is no watch.
MAX_INTERVAL_S = 86400

RegistryOpt = Annotated[
    str,
    typer.Option(
        "--registry",
        help="local, local:PATH or azureml (default: $AML_ROLLOUT_REGISTRY, else local).",
    ),
]
SpecOpt = Annotated[
    str,
    typer.Option(
        "--spec",
        help="Rollout spec (YAML) for every delivery; with --delivery pipeline also a URI "
        "(azureml://datastores/...) the job reads.",
    ),
]
TagOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tag",
        help="KEY=VALUE a version must carry (repeatable; default stage=candidate).",
        show_default=False,
    ),
]
StateOpt = Annotated[
    Path, typer.Option("--state-dir", help="Where the cursor, event ids and locks live.")
]
RolloutStateOpt = Annotated[
    Path | None,
    typer.Option(
        "--rollout-state-dir", help="The rollout engine's state folder (default: the spec's)."
    ),
]
SupersedeOpt = Annotated[
    bool,
    typer.Option(
        "--supersede", help="A newer version aborts the running rollout instead of waiting."
    ),
]
ImageOpt = Annotated[
    str | None,
    typer.Option(
        "--image-registry",
        help="Image registry named in package.json (default: localhost; "
        "amlrollout.azurecr.io with --delivery pipeline).",
        show_default=False,
    ),
]
DeliveryOpt = Annotated[
    str,
    typer.Option(
        "--delivery",
        help="engine: roll out from this process; pipeline: submit the deploy pipeline to "
        "Azure ML (needs --subscription, --resource-group, --workspace).",
    ),
]
SubscriptionOpt = Annotated[
    str | None, typer.Option("--subscription", help="Azure subscription (--delivery pipeline).")
]
ResourceGroupOpt = Annotated[
    str | None, typer.Option("--resource-group", help="Resource group (--delivery pipeline).")
]
WorkspaceOpt = Annotated[
    str | None, typer.Option("--workspace", help="Azure ML workspace (--delivery pipeline).")
]
ComputeOpt = Annotated[
    str,
    typer.Option("--compute", help="Compute cluster for the deploy jobs (--delivery pipeline)."),
]
DELIVERIES = ("engine", "pipeline")


@dataclass(frozen=True)
class DeliveryChoice:
    """How versions are delivered: `engine` here, or `pipeline` jobs in an Azure ML workspace."""

    kind: str = "engine"
    subscription: str | None = None
    resource_group: str | None = None
    workspace: str | None = None
    compute: str = "cpu-cluster"

    def check(self, registry: str, supersede: bool) -> str:
        """Refuse inconsistent options (ConfigError); returns the registry spec to open."""
        from aml_pipelines.errors import ConfigError

        if self.kind not in DELIVERIES:
            raise ConfigError(f"--delivery: {self.kind!r} is not one of {list(DELIVERIES)}")
        if self.kind == "engine":
            return registry
        coordinates = {
            "--subscription": self.subscription,
            "--resource-group": self.resource_group,
            "--workspace": self.workspace,
        }
        if missing := [flag for flag, value in coordinates.items() if not value]:
            raise ConfigError(
                "--delivery pipeline submits jobs to an Azure ML workspace: "
                f"give {', '.join(missing)}"
            )
        if supersede:
            raise ConfigError(
                "--supersede needs --delivery engine: a rollout inside a pipeline job cannot be "
                "aborted cleanly (cancelling the job leaves traffic split)"
            )
        workspace_registry = f"azureml:{self.subscription}/{self.resource_group}/{self.workspace}"
        if registry and registry != workspace_registry:
            raise ConfigError(
                f"--registry {registry!r}: --delivery pipeline deploys registered versions of the "
                f"job's workspace; omit --registry or give {workspace_registry}"
            )
        return workspace_registry


def _setup_logging() -> None:
    """INFO for the trigger's own story, as the pipeline's steps log; the Azure SDKs and httpx
    only what a user acts on (at INFO, azure-core logged every request a watch on an Azure ML
    registry made, headers included, and httpx every notification's webhook URL, its token
    included)."""
    from components.common import setup_logging

    setup_logging()


def _parse_tags(tags: list[str] | None) -> dict[str, str]:
    from aml_pipelines.errors import ConfigError

    if not tags:
        return {"stage": "candidate"}
    parsed = {}
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag {item!r}: expected KEY=VALUE, e.g. stage=candidate")
        parsed[key] = value
    return parsed


def _dispatcher(
    registry_spec: str,
    spec: str,
    state_dir: Path,
    rollout_state_dir: Path | None,
    image_registry: str | None,
    supersede: bool,
    choice: DeliveryChoice,
) -> Dispatcher:
    from aml_pipelines.delivery import Delivery
    from aml_pipelines.registry.factory import open_registry
    from aml_pipelines.trigger.dispatch import Dispatcher
    from aml_pipelines.trigger.store import TriggerStore

    registry_spec = choice.check(registry_spec, supersede)
    delivery: Delivery
    if choice.kind == "pipeline":
        from aml_pipelines import build
        from aml_pipelines.azure_delivery import PipelineDelivery

        client = build.workspace_client(
            choice.subscription or "", choice.resource_group or "", choice.workspace or ""
        )
        registry = open_registry(registry_spec, ml_client=client, must_exist=True)
        delivery = PipelineDelivery(
            client,
            spec,
            state_dir,
            watched=registry,
            compute=choice.compute,
            image_registry=image_registry,
        )
    else:
        from aml_pipelines.delivery import EngineDelivery

        # A mistyped local path would otherwise be an empty registry, polled forever for nothing.
        registry = open_registry(registry_spec or None, must_exist=True)
        delivery = EngineDelivery(
            registry,
            Path(spec),
            state_dir=rollout_state_dir,
            image_registry=image_registry or "localhost",
        )
    return Dispatcher(TriggerStore(state_dir), registry, delivery, supersede=supersede)


def _warn_unknown_models(registry: ModelRegistry, models: Sequence[str]) -> list[str]:
    """Warn about each of `models` the registry holds no version of, naming those it holds.

    Returns the unknown ones. A warning, not an error: a model name exists in a registry only
    from its first registration, so a trigger set up before the first training run is
    legitimate. A typo is what this catches.
    """
    from aml_pipelines.errors import PipelineError

    if not models:
        return []
    try:
        known = registry.names()
    except PipelineError as exc:  # unreachable registry: the first poll or delivery reports it
        logging.getLogger(__name__).warning("could not list the models in %r: %s", registry, exc)
        return []
    if missing := [name for name in models if name not in known]:
        logging.getLogger(__name__).warning(
            "%r has no model %s (it holds: %s); nothing is delivered until one is registered "
            "— check --model",
            registry,
            " or ".join(repr(name) for name in missing),
            ", ".join(known) or "no model yet",
        )
    return missing


def event_filter(models: Sequence[str], tags: dict[str, str], registry: ModelRegistry) -> Filter:
    """`serve`'s filter: the `--model`s, the `--tag`s and, for an Azure ML registry, its
    workspace (an event's version number names a version in its own workspace only)."""
    from aml_pipelines.registry.azureml import AzureMLRegistry
    from aml_pipelines.trigger.webhook import Filter

    workspace = registry.workspace_id if isinstance(registry, AzureMLRegistry) else None
    return Filter(models=tuple(models), tags=tags, workspace=workspace)


def read_secrets(secret_env: str, previous_env: str | None) -> tuple[str, tuple[str, ...]]:
    """`serve`'s secret and, during a rotation, the previous one (read from `previous_env`);
    ConfigError when one is unset or too short. Warns, never naming a secret, of one a URL would
    change, and of a previous secret equal to the current one (no rotation under way)."""
    from aml_pipelines.errors import ConfigError

    log = logging.getLogger(__name__)
    secrets = []
    for option, env, what in (
        ("--secret-env", secret_env, "the shared secret"),
        ("--previous-secret-env", previous_env, "the secret being rotated out"),
    ):
        if env is None:
            continue
        value = os.environ.get(env, "")
        if len(value) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"{option}: set ${env} to {what} "
                f"(at least {MIN_SECRET_CHARS} characters; it is the ?key= of the Event Grid URL)"
            )
        if warning := secret_warning(value, env):
            log.warning("%s", warning)
        secrets.append(value)
    secret, previous = secrets[0], tuple(secrets[1:])
    if secret in previous:
        log.warning(
            "$%s holds the same secret as $%s: no rotation is under way", previous_env, secret_env
        )
    elif previous:
        log.info(
            "accepting the previous secret from $%s too: a rotation is under way; restart "
            "without --previous-secret-env once Event Grid sends the new key",
            previous_env,
        )
    return secret, previous


def secret_warning(secret: str, env: str) -> str | None:
    """Why `secret` may not survive the Event Grid endpoint URL's `?key=`, or None.

    A character a URL carries only percent-encoded changes on the way (`parse_qs` reads a `+`
    as a space; a trailing newline, as a Kubernetes secret made with `echo` has, is dropped or
    mangled), so every request, the subscription handshake first, is a 401 — which Event Grid
    never retries. Names the characters, never the secret.
    """
    from urllib.parse import quote

    unsafe = sorted({c for c in secret if quote(c, safe="-._~") != c})
    if not unsafe:
        return None
    return (
        f"${env} holds {', '.join(map(repr, unsafe))}: characters a URL carries only "
        "percent-encoded (a '+' in ?key= arrives as a space, and the key is refused with a 401, "
        "which Event Grid never retries); percent-encode it in the Event Grid endpoint URL, or "
        "use a secret of letters, digits, '-' and '_' (secrets.token_urlsafe)"
    )


def once_exit_code(phases: Sequence[str]) -> int:
    """`watch --once`'s exit code for the outcomes (`DeliveryOutcome.phase`) of its pass: the
    highest of their codes, which is the worst outcome — failed 5, undecided 4, rolled back 3 —
    and 0 for none (nothing new). Each is `aml-rollout rollout run`'s code for that phase; a
    first release's undecided check is its `bootstrap --check` code; a version closed `missing`
    (not in the registry when its turn came) was not delivered: failed. Superseded, skipped and
    submitted versions (`--delivery pipeline`: the job holds the verdict) are 0."""
    from aml_pipelines.delivery import FAILED, INCONCLUSIVE, ROLLED_BACK
    from aml_pipelines.trigger.store import MISSING
    from rollout.commands.rollout import EXIT_FAILED, EXIT_PAUSED, EXIT_ROLLED_BACK

    codes = {
        ROLLED_BACK: EXIT_ROLLED_BACK,
        INCONCLUSIVE: EXIT_PAUSED,
        FAILED: EXIT_FAILED,
        MISSING: EXIT_FAILED,
    }
    return max((codes.get(phase, 0) for phase in phases), default=0)


def _stop_on_signals(stop: Any) -> None:
    def handler(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info(
            "%s: stopping; a delivery in progress resumes on the next start",
            signal.Signals(signum).name,
        )
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@trigger_app.command("watch")
def watch(
    model: Annotated[str, typer.Option("--model", help="Model name to watch.")],
    spec: SpecOpt,
    registry: RegistryOpt = "",
    tag: TagOpt = None,
    interval: Annotated[
        float,
        typer.Option("--interval", min=0.1, help="Seconds between registry polls (0.1 to 86400)."),
    ] = 10.0,
    once: Annotated[
        bool,
        typer.Option(
            "--once",
            help="Poll once, deliver what is new, then exit with the worst outcome: 0 promoted "
            "(or nothing new), 3 rolled back, 4 a first release undecided, 5 failed, 2 error.",
        ),
    ] = False,
    supersede: SupersedeOpt = False,
    state_dir: StateOpt = DEFAULT_STATE,
    rollout_state_dir: RolloutStateOpt = None,
    image_registry: ImageOpt = None,
    delivery: DeliveryOpt = "engine",
    subscription: SubscriptionOpt = None,
    resource_group: ResourceGroupOpt = None,
    workspace: WorkspaceOpt = None,
    compute: ComputeOpt = "cpu-cluster",
) -> None:
    """Poll the registry; deliver (package + roll out) each new matching version exactly once."""
    from aml_pipelines.errors import ConfigError
    from aml_pipelines.trigger.watcher import Watcher

    # typer's min lets nan and inf through: nan waits forever (never polls again), inf and
    # anything past threading.TIMEOUT_MAX overflow the wait after the first poll.
    if not (math.isfinite(interval) and interval <= MAX_INTERVAL_S):
        raise ConfigError(
            f"--interval: {interval} is not a number of seconds from 0.1 to {MAX_INTERVAL_S}"
        )
    _setup_logging()
    required = _parse_tags(tag)
    choice = DeliveryChoice(delivery, subscription, resource_group, workspace, compute)
    dispatcher = _dispatcher(
        registry, spec, state_dir, rollout_state_dir, image_registry, supersede, choice
    )
    dispatcher.wait_interval_s = interval
    unknown = _warn_unknown_models(dispatcher.registry, [model])
    watcher = Watcher(
        dispatcher.registry, model, dispatcher, required_tags=required, interval_s=interval
    )
    if not once:
        _stop_on_signals(watcher.stop)
        watcher.run()
        return

    def said(outcome: DeliveryOutcome) -> None:
        # Printed as each version closes: an error on a later one (exit 2) must not hide from a
        # CI log what this pass already delivered.
        typer.echo(f"{outcome.model} v{outcome.version}: {outcome.phase} {outcome.reason}")

    from rollout.commands.stack import EXIT_INTERRUPTED, sigterm_as_interrupt

    try:
        # A cancelled CI job's SIGTERM stops like Ctrl-C, as `rollout run` does: the rollout in
        # progress is kept and its lease released on the way out; the next pass resumes it.
        with sigterm_as_interrupt():
            outcomes = watcher.run(once=True, on_outcome=said)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {_interrupted(dispatcher, model)}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if not outcomes:
        typer.echo(
            f"{model}: " + ("not in the registry" if unknown else "no new version to deliver")
        )
    raise typer.Exit(once_exit_code([outcome.phase for outcome in outcomes]))


def _interrupted(dispatcher: Dispatcher, model: str) -> str:
    """What an interrupted pass leaves: the delivery in progress, which the next one resumes —
    when this pass was delivering it; a started version it was not delivering is another
    process's (this pass waited for the deliver lock), or one an earlier run left."""
    from aml_pipelines.errors import PipelineError
    from aml_pipelines.trigger.store import Step

    try:
        entries = dispatcher.store.load(model).entries
    except PipelineError:  # an unreadable cursor must not hide the interruption
        entries = {}
    open_ = [version for version, entry in entries.items() if entry.step is Step.STARTED]
    if dispatcher.entered is not None and dispatcher.entered[0] == model:
        version = dispatcher.entered[1]
        if version in open_ or not entries:  # not closed since (a failure, then the next one)
            return (
                f"the delivery of {model} v{version} resumes on the next pass (its rollout is kept)"
            )
    if not open_:
        return "nothing was being delivered"
    try:
        with dispatcher.store.lock("deliver", "a delivery on this endpoint").held(blocking=False):
            pass
    except PipelineError:  # held: another process (serve, a watcher) is delivering
        return (
            f"this pass waited for another process delivering on the endpoint ({model} "
            f"v{max(open_)} is started; that process carries it on)"
        )
    return (
        f"nothing of this pass was being delivered; {model} v{max(open_)}, started by an earlier "
        "run, resumes on the next pass"
    )


@trigger_app.command("serve")
def serve(
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0 = free).")],
    spec: SpecOpt,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    secret_env: Annotated[
        str, typer.Option("--secret-env", help="Environment variable holding the shared secret.")
    ] = DEFAULT_SECRET_ENV,
    previous_secret_env: Annotated[
        str | None,
        typer.Option(
            "--previous-secret-env",
            help="During a secret rotation: environment variable holding the previous secret, "
            "accepted too until the Event Grid URL carries the new one (docs/triggers.md).",
        ),
    ] = None,
    registry: RegistryOpt = "",
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Accept only these models (repeatable; default all)."),
    ] = None,
    tag: TagOpt = None,
    supersede: SupersedeOpt = False,
    max_body: Annotated[
        int, typer.Option("--max-body", min=1024, help="Largest accepted body in bytes.")
    ] = 1 << 20,
    ssl_certfile: Annotated[
        str | None, typer.Option("--ssl-certfile", help="TLS certificate (PEM).")
    ] = None,
    ssl_keyfile: Annotated[
        str | None, typer.Option("--ssl-keyfile", help="TLS key (PEM, not encrypted).")
    ] = None,
    state_dir: StateOpt = DEFAULT_STATE,
    rollout_state_dir: RolloutStateOpt = None,
    image_registry: ImageOpt = None,
    delivery: DeliveryOpt = "engine",
    subscription: SubscriptionOpt = None,
    resource_group: ResourceGroupOpt = None,
    workspace: WorkspaceOpt = None,
    compute: ComputeOpt = "cpu-cluster",
) -> None:
    """Receive Azure Event Grid ModelRegistered events; deliver each new version exactly once."""
    from aml_pipelines.trigger.dispatch import DeliveryWorker
    from aml_pipelines.trigger.webhook import WebhookApp, make_server

    _setup_logging()
    secret, previous_secrets = read_secrets(secret_env, previous_secret_env)
    tags = _parse_tags(tag)
    choice = DeliveryChoice(delivery, subscription, resource_group, workspace, compute)
    dispatcher = _dispatcher(
        registry, spec, state_dir, rollout_state_dir, image_registry, supersede, choice
    )
    events = event_filter(model or (), tags, dispatcher.registry)
    _warn_unknown_models(dispatcher.registry, model or [])
    if not model:
        # One spec is one endpoint: a version of any other model would be rolled out on it,
        # replacing what it serves (the judge compares error rates, not what the model is).
        logging.getLogger(__name__).warning(
            "no --model: a version of any model registered in %r is rolled out on the endpoint "
            "of %s, in place of what it serves; name its model with --model (or filter the "
            "Event Grid subscription by subject)",
            dispatcher.registry,
            spec,
        )
    store = dispatcher.store
    with store.lock("serve", f"a webhook server on {state_dir}").held(blocking=False):
        served = set(model or ())
        # Only the models this endpoint serves: the state folder (by default one per working
        # directory) may hold a cursor another trigger accepted for its own spec's endpoint.
        # The worker reconciles the registry first, retrying while it cannot be reached (a
        # restart during an Azure ML outage waits; events are recorded meanwhile).
        worker = DeliveryWorker(
            dispatcher,
            (lambda: [name for name in store.models() if name in served])
            if served
            else store.models,
            reconcile=True,
        )
        app = WebhookApp(
            secret=secret,
            previous_secrets=previous_secrets,
            dispatcher=dispatcher,
            wake=worker.wake,
            event_filter=events,
            max_body=max_body,
        )
        server, sock, url = make_server(
            app, host=host, port=port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile
        )
        worker.start()
        typer.echo(f"listening on {url}?key=<secret from ${secret_env}>", err=False)
        # On SIGINT/SIGTERM uvicorn stops accepting, finishes open requests, then re-raises the
        # signal, so the process ends "terminated by signal". A delivery in progress is cut like
        # a crash and resumes on the next start (see dispatch.py).
        server.run(sockets=[sock])


@trigger_app.command("status")
def status(
    model: Annotated[
        str | None, typer.Option("--model", help="Only this model (default: every model).")
    ] = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Show what the triggers accepted and how each delivery ended (the cursors)."""
    from rich.console import Console
    from rich.table import Column, Table
    from rich.text import Text

    from aml_pipelines.errors import TriggerError
    from aml_pipelines.trigger.store import TriggerStore

    store = TriggerStore(state_dir)
    if model and model not in (held := store.models()):
        # An error, as `registry show` of an unknown model: "no trigger state in DIR" for a
        # mistyped --model sent the user looking for another --state-dir.
        raise TriggerError(
            f"no trigger state for model {model!r} in {state_dir} "
            f"({'it holds: ' + ', '.join(held) if held else 'it holds none'})"
        )
    table = Table(
        *(Column(h, no_wrap=True) for h in ("model", "version", "step", "outcome", "attempts")),
        Column("reason", overflow="fold"),  # the long one folds, the rest stay whole
    )
    for name in [model] if model else store.models():
        for entry in sorted(store.load(name).entries.values(), key=lambda e: e.version):
            table.add_row(
                name,
                str(entry.version),
                entry.step.value,
                entry.outcome or "-",
                str(entry.attempts),
                # As written: a reason quotes paths and errors, whose `[...]` is no markup.
                Text(entry.reason or "-"),
            )
    if table.row_count:
        Console().print(table)
    else:
        typer.echo(f"no trigger state in {state_dir}")
