"""Deliver a version by submitting the deploy pipeline to Azure ML (`--delivery pipeline`).

The other delivery (`delivery.EngineDelivery`, the default) runs the rollout controller in the
trigger's process. This one hands each version to Azure ML instead: it submits the deploy
pipeline (package → rollout, `pipeline.build_deploy_pipeline`) for the registered version and
returns as soon as Azure ML accepted the job. The job does the rest — packages the registered
model, rolls it out with the engine, and writes the registry tags itself (the rollout step gets
the registry), so the registry follows traffic in both modes.

Exactly once. A version's job gets its name *before* it is submitted, and the name is recorded
durably in `<state_dir>/pipeline-jobs.json` first (`submitting`), then again with its studio URL
once Azure ML accepted it (`submitted`). Delivered again after a crash, the version's recorded
job is looked up: if Azure ML knows it, nothing is submitted; if not (the crash came before Azure
ML accepted it), it is submitted under the same name. The dispatcher then closes the version in
its cursor as `Submitted`, with the job and its URL as the reason — `trigger status` shows them.

One rollout at a time. `current()` reports the last submitted job as an active rollout until
Azure ML says the job ended (Completed, or Failed / Canceled / NotResponding / Paused, all taken as
Failed: azure-ai-ml's own terminal statuses), so the dispatcher submits the next
version only after the previous job is over — never two rollouts on one endpoint. A job whose
status is terminal is remembered as such and not asked again; a job Azure ML does not know (its
submission never landed) is not running either. A job that ended without completing while its
version is not tagged `production` or `rolled-back` in the watched registry (a candidate, or no
stage at all: accepted through another --tag filter) is not over for the endpoint: its
rollout step writes `production` or `rolled-back` whenever the traffic settled, so a version
not so tagged is a rollout held for a human (exit 5), a step that failed or was cancelled
mid-rollout, or a package step that never reached the rollout — the trigger cannot tell which,
and the first two leave traffic split. It is reported Paused, and the next version waits until
a person settles the endpoint and tags the version (`aml-rollout registry tag`).

What this mode cannot do, by construction (see docs/triggers.md, "Where the rollout runs"):
abort (supersede) — cancelling a job kills its controller mid-step and leaves traffic split, so
`abort` refuses; and the trigger does not see the rollout's verdict (a Completed job is a
promotion; a Failed one may be a rollback or an error: the job's `rollout_result` output and the
registry tags say which).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aml_pipelines.delivery import FAILED, SUCCEEDED, DeliveryOutcome, RolloutView, TagChange
from aml_pipelines.errors import ConfigError, ModelNotFound, PipelineError, TriggerError
from aml_pipelines.fileio import write_bytes, write_json
from aml_pipelines.registry.base import ModelRegistry, ModelVersion, Stage

log = logging.getLogger(__name__)

#: The outcome the trigger's cursor records for a version handed to Azure ML.
SUBMITTED = "Submitted"
JOBS_FILE = "pipeline-jobs.json"
SPEC_SNAPSHOT = "spec"  # the local --spec as checked at start, the file each job uploads
DEFAULT_EXPERIMENT = "aml-rollout-deploy"
#: Azure ML job statuses that end a job, and the rollout phase each stands for: azure-ai-ml's
#: own `RunHistoryConstants.TERMINAL_STATUSES` (a test keeps the two equal; importing it here
#: would load all of azure.ai.ml, ~4 s) plus NotFound. A job that is NotResponding or Paused is
#: not a rollout in progress: waiting for it would hold every later version forever.
NOT_FOUND = "NotFound"
JOB_TERMINAL = {
    "Completed": SUCCEEDED,
    "Failed": FAILED,
    "Canceled": FAILED,
    "NotResponding": FAILED,
    "Paused": FAILED,
    NOT_FOUND: FAILED,
}
#: The phase of a job that ended without completing and left its version a candidate: a rollout
#: that may hold traffic split until a person acts (rollout.core.types.Phase.PAUSED).
HELD = "Paused"
_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def job_name(model: str, version: int) -> str:
    """A fresh Azure ML job name for one delivery: readable, unique, valid (`[a-z0-9_-]`)."""
    return f"deploy-{_UNSAFE.sub('-', model.lower()).strip('-')}-v{version}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class JobRecord:
    """The deploy job of one version, as recorded before and after its submission."""

    model: str
    version: int
    job: str
    state: str  # "submitting" (name chosen, not yet accepted) or "submitted"
    seq: int  # order of deliveries: the highest is the endpoint's current one
    url: str = ""
    status: str = ""  # the last Azure ML job status seen
    updated_at: str = ""


class PipelineDelivery:
    """Submit the deploy pipeline for each version; the job packages, rolls out and tags.

    `ml_client` is an azure-ai-ml MLClient on the workspace the jobs run in (and whose registry
    the trigger watches: the job opens it as `registry`, default "azureml" = its own workspace).
    `spec` is the rollout spec the job's rollout step reads: a local file (checked here and
    copied as checked into `state_dir`, the copy uploaded by azure-ai-ml at submission) or a
    URI (`azureml://datastores/...`, `https://...`).
    `watched` is the registry the trigger watches, which the job's rollout step tags: whether a
    job that did not complete left its version a candidate (see the module docstring).
    """

    def __init__(
        self,
        ml_client: Any,
        spec: str | Path,
        state_dir: Path,
        *,
        watched: ModelRegistry,
        compute: str = "cpu-cluster",
        experiment: str = DEFAULT_EXPERIMENT,
        image_registry: str | None = None,
        package_mode: str = "local",
        registry: str = "azureml",
    ) -> None:
        self.ml_client = ml_client
        self.state_dir = Path(state_dir)
        self.spec = _checked_spec(spec, self.state_dir)
        self.watched = watched
        self.compute = compute
        self.experiment = experiment
        self.image_registry = image_registry
        self.package_mode = package_mode
        self.registry = registry
        self._components: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the Delivery protocol

    def current(self) -> RolloutView | None:
        """The last submitted job as a rollout: active until Azure ML says the job ended."""
        record = max(self._load().values(), key=lambda r: r.seq, default=None)
        if record is None:
            return None
        if record.status not in JOB_TERMINAL:
            job = self._get_job(record.job)
            # A job Azure ML does not know never ran (its submission did not land, or it was
            # deleted): nothing runs on the endpoint, and waiting for it would wait forever.
            status = _status(job) if job is not None else NOT_FOUND
            if status != record.status:
                record = self._save(replace(record, status=status))
        phase = JOB_TERMINAL.get(record.status, "Running")
        reason = f"pipeline job {record.job} is {record.status or record.state}"
        left = self._unsettled(record) if phase == FAILED and record.status != NOT_FOUND else None
        if left is not None:
            phase = HELD
            reason += (
                f", and {record.model} v{record.version} is not tagged {Stage.PRODUCTION} or "
                f"{Stage.ROLLED_BACK} ({left}): its "
                "rollout may hold traffic split (held for a human, or stopped mid-step). Settle "
                f"the endpoint (the job's rollout_result and logs say where it stopped), then "
                f"`aml-rollout registry tag {record.model} {record.version} "
                f"stage={Stage.ROLLED_BACK}` (or stage={Stage.PRODUCTION} --replace) lets the "
                "next version go"
            )
        return RolloutView(model=record.model, candidate=record.version, phase=phase, reason=reason)

    def deliver(
        self,
        version: ModelVersion,
        *,
        before_rollout: Callable[[], DeliveryOutcome | None] | None = None,
    ) -> DeliveryOutcome:
        """Submit the deploy pipeline for `version` once; return as soon as Azure ML took it.

        `before_rollout` is not asked: the job packages and rolls out, and the triggers refuse
        --supersede with this delivery (cancelling a job kills its controller mid-step)."""
        record = self._load().get(_key(version.name, version.version))
        if record is not None:
            existing = self._get_job(record.job)
            if existing is not None:
                log.info(
                    "%s v%d: its pipeline job %s was submitted before; not submitting again",
                    version.name,
                    version.version,
                    record.job,
                )
                record = self._save(
                    replace(
                        record,
                        state="submitted",
                        url=getattr(existing, "studio_url", None) or record.url,
                        status=_status(existing) or record.status,
                    )
                )
                return _outcome(record)
            name = record.job  # chosen before a crash that came before Azure ML accepted it
        else:
            name = job_name(version.name, version.version)
        seq = 1 + max((r.seq for r in self._load().values()), default=0)
        self._save(JobRecord(version.name, version.version, name, "submitting", seq))
        submitted = self._submit(version, name)
        record = self._save(
            JobRecord(
                version.name,
                version.version,
                name,
                "submitted",
                seq,
                url=getattr(submitted, "studio_url", None) or "",
                status=_status(submitted),
            )
        )
        log.info("%s v%d: submitted pipeline job %s %s", version.name, version.version, name,
                 record.url)  # fmt: skip
        return _outcome(record)

    def abort(self, reason: str) -> None:
        """Refused: cancelling a job kills its rollout mid-step and leaves traffic split."""
        raise TriggerError(
            f"cannot abort ({reason}): a rollout inside an Azure ML pipeline job cannot be "
            "aborted cleanly; use --delivery engine to supersede"
        )

    def reconcile(self) -> list[TagChange]:
        """Nothing to repair here: the job's rollout step writes the registry tags itself."""
        return []

    def _unsettled(self, record: JobRecord) -> str | None:
        """The job's version's stage in words ("stage=candidate", "no stage") unless it is one
        the rollout step writes once traffic settled, production or rolled-back, or archived
        (production once, replaced since) (read each time: a person's tag is what releases the
        endpoint); None when settled. Not only a candidate: a version accepted through another
        --tag filter never had a stage. A version deleted since is nothing to wait for."""
        try:
            version = self.watched.get(record.model, record.version)
        except ModelNotFound:
            return None
        if version.stage in (Stage.PRODUCTION, Stage.ROLLED_BACK, Stage.ARCHIVED):
            return None
        return f"stage={version.stage}" if version.stage else "no stage"

    # ------------------------------------------------------------------ Azure ML

    def _submit(self, version: ModelVersion, name: str) -> Any:
        from aml_pipelines.build import submit_pipeline
        from aml_pipelines.pipeline import DeployParams, build_deploy_pipeline, load_components

        if self._components is None:
            self._components = load_components()
        params = DeployParams(
            model_name=version.name,
            model_version=version.version,
            registry=self.registry,
            package_mode=self.package_mode,
            rollout_spec=self.spec,
            **({"image_registry": self.image_registry} if self.image_registry else {}),
        )
        job = build_deploy_pipeline(params, compute=self.compute, loaded=self._components)
        job.name = name
        return submit_pipeline(job, self.ml_client, experiment=self.experiment)

    def _get_job(self, name: str) -> Any:
        """The job named `name`, or None when Azure ML does not know it."""
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            return self.ml_client.jobs.get(name)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"reading pipeline job {name} failed: {first}") from exc

    # ------------------------------------------------------------------ records

    @property
    def jobs_path(self) -> Path:
        """Where the submitted jobs are recorded."""
        return self.state_dir / JOBS_FILE

    def _load(self) -> dict[str, JobRecord]:
        try:
            raw = json.loads(self.jobs_path.read_text(encoding="utf-8"))
            return {key: JobRecord(**value) for key, value in raw["jobs"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TriggerError(f"cannot read {self.jobs_path}: {exc}") from exc

    def _save(self, record: JobRecord) -> JobRecord:
        """Record durably (temp + fsync + rename): callers hold the dispatcher's deliver lock."""
        record = replace(record, updated_at=datetime.now(UTC).isoformat(timespec="seconds"))
        records = self._load()
        records[_key(record.model, record.version)] = record
        write_json(self.jobs_path, {"jobs": {k: asdict(v) for k, v in records.items()}})
        return record


def _status(job: Any) -> str:
    """A job's status as Azure ML spells it ("Completed"); azure-ai-ml may hand an enum."""
    status = getattr(job, "status", None)
    return str(getattr(status, "value", status) or "")


def _key(model: str, version: int) -> str:
    return f"{model}:{version}"


def _outcome(record: JobRecord) -> DeliveryOutcome:
    where = f": {record.url}" if record.url else ""
    return DeliveryOutcome(
        record.model, record.version, SUBMITTED, f"pipeline job {record.job}{where}"
    )


def _checked_spec(spec: str | Path, state_dir: Path) -> str:
    """A URI as is. A local file must exist and be a valid rollout spec (caught before Azure);
    what is submitted is a copy of it as checked, in `state_dir`/spec/: azure-ai-ml reads the
    file at each submission, and a watcher runs for days — an edit made meanwhile went to the
    next job unchecked (a typo then failed the job's rollout step after its package step, its
    version left a candidate that held the endpoint). The engine delivery, too, rolls out the
    spec it checked when the trigger started."""
    text = str(spec)
    if re.match(r"^(azureml|https?):", text):
        return text
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"--spec: {path} not found")
    from rollout.api import load_spec

    load_spec(path)  # rollout.errors.ConfigError names the bad field
    data = path.read_bytes()
    # Named by its content: triggers sharing a state folder (several models on one endpoint,
    # or a second watcher refused as already running) each keep their own spec, whatever its
    # file name; the job still uploads a file of the user's name.
    snapshot = state_dir / SPEC_SNAPSHOT / hashlib.sha256(data).hexdigest()[:16] / path.name
    try:
        if not snapshot.is_file():
            write_bytes(snapshot, data)
    except OSError as exc:
        raise ConfigError(
            f"--state-dir {state_dir}: cannot keep a copy of --spec there ({exc.strerror or exc})"
        ) from None
    load_spec(snapshot)  # the copy: an edit racing this start is not submitted unchecked
    return str(snapshot.resolve())
