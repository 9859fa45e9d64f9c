"""Run the delivery pipeline on this machine, step by step, with the components' real commands.

The runner builds the same pipeline job that is submitted to Azure ML (`pipeline.build_pipeline`)
and walks its nodes:

1. order the nodes by their `${{parent.jobs.<node>.outputs.<name>}}` references (a topological
   sort; `until` keeps a step and the steps it depends on);
2. bind every output to a folder `<run_dir>/<node>/<output>/`, every input to the pipeline value,
   the upstream output folder, or the component's default; the train, register and package
   folders an earlier run of the folder left are moved to `<run_dir>/previous/` before the
   first step runs (FRESH_STEPS), so no step leaves another run's outputs looking current —
   only run-local's own (_earlier_outputs), and one run at a time per folder (_exclusive);
3. render the component's declared `command` as Azure ML does: `$[[...]]` optional blocks are
   kept only when their inputs are bound, `${{inputs.x}}` / `${{outputs.y}}` are substituted into
   the text, which is then split as a shell would (the YAMLs quote string and path values) —
   every step's, before the first runs, so a value no command line carries stops nothing midway;
4. run each as a subprocess (`python` is this interpreter) in the caller's folder, with the
   component's code folder on PYTHONPATH: a relative path inside the rollout spec is then the
   caller's, as for `aml-rollout rollout ...` (in Azure ML the step runs in the code snapshot,
   where such a path means nothing), with AML_ROLLOUT_RUN_ID `<run id>/<node>` (run_id: the
   folder's own); stream its output line by line with a `[node]` prefix into
   `<run_dir>/<node>/std_log.txt` and the caller's sink, and stop at the first non-zero
   exit with StepFailed(node, exit_code) — except the rollout step's verdicts (3 rolled back,
   5 paused: components/rollout/main.py), which raise RolloutNotPromoted (a StepFailed)
   carrying the outcome, the reason and the ledger from result.json, and the register gate's
   refusal (3), which raises ModelNotRegistered, so that a correct rollback or refusal is
   reported as an outcome and not as a crash. SIGTERM or SIGHUP to the runner stops the running
   step first (_Stopper), then the run (RunTerminated).

azure.ai.ml is imported once, here, to load the components; the steps themselves never import it
(unless they talk to Azure), so a local run costs about one SDK import plus the steps.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aml_pipelines.errors import (
    ComponentError,
    ConfigError,
    ModelNotRegistered,
    RolloutNotPromoted,
    RunTerminated,
    StepFailed,
    describe_exit,
    signal_name,
)
from aml_pipelines.fileio import read_json
from aml_pipelines.pipeline import STEPS, PipelineParams, build_pipeline, is_local_path
from components.common import source_commit
from components.register.main import EXIT_GATE_REFUSED
from components.rollout.main import EXIT_PAUSED, EXIT_ROLLED_BACK

if TYPE_CHECKING:
    from aml_pipelines.registry.local import LocalRegistry

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\$\{\{(inputs|outputs)\.(\w+)\}\}")
_OPTIONAL_BLOCK = re.compile(r"\$\[\[(.*?)\]\]", re.DOTALL)
_PARENT_INPUT = re.compile(r"^\$\{\{parent\.inputs\.(\w+)\}\}$")
_PARENT_OUTPUT = re.compile(r"^\$\{\{parent\.jobs\.(\w+)\.outputs\.(\w+)\}\}$")

Sink = Callable[[str], None]

# The rollout step's exit codes that are verdicts of a rollout that ran, not failures.
ROLLOUT_VERDICTS = {EXIT_ROLLED_BACK: "rolled back", EXIT_PAUSED: "paused for a human decision"}

#: `<run_dir>/.run-id`: the run folder's id (see run_id).
RUN_ID_FILE = ".run-id"

#: `<run_dir>/previous/`: the step folders an earlier run of the folder left there.
PREVIOUS_DIR = "previous"

#: `<run_dir>/previous/.run-local`: marks a previous/ run-local made, the only kind it replaces.
PREVIOUS_MARK = ".run-local"

#: `<run_dir>/.run-local.lock`: locked (flock) by the run-local running there, its PID in it.
LOCK_FILE = ".run-local.lock"

#: What run-local writes in every step folder it makes: tells its folders from a user's.
STEP_LOG = "std_log.txt"

#: The steps whose folders hold only what their run made of its model, moved aside as a run
#: starts. Not the rollout step's: its result folder is the rollout's state store, which a later
#: `--until rollout` resumes (a paused rollout) or judges anew (components/rollout), and which
#: `rollout status --state-dir` reads; what it says is the data plane's, naming its versions.
FRESH_STEPS = ("train", "register", "package")

#: How long a step gets to stop after run-local passed a SIGTERM on, before it is killed.
STOP_GRACE_S = 20.0


@dataclass(frozen=True)
class StepRun:
    """One executed step: its command line, exit code, output folders and duration."""

    name: str
    argv: list[str]
    exit_code: int
    outputs: dict[str, Path]
    seconds: float


@dataclass
class LocalRun:
    """A local run: where it lives and what each step did."""

    run_dir: Path
    steps: dict[str, StepRun] = field(default_factory=dict)

    def output(self, step: str, name: str) -> Path:
        """The folder bound to `step`'s output `name`."""
        return self.steps[step].outputs[name]


@dataclass(frozen=True)
class _Node:
    name: str
    component: Any
    bindings: dict[str, Any]  # input name -> literal, ("parent", input) or ("job", node, output)


@dataclass(frozen=True)
class _Planned:
    """A node ready to run: its command line, output folders and code folder."""

    name: str
    argv: list[str]
    outputs: dict[str, Path]
    code_dir: Path


def default_run_dir(base: Path = Path("runs")) -> Path:
    """`runs/<UTC timestamp>-<short id>` under the current folder."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return base / f"{stamp}-{uuid.uuid4().hex[:6]}"


def _log_sink(line: str) -> None:
    log.info("%s", line)


def run_id(run_dir: Path) -> str:
    """The run folder's own id, `<name>-<12 hex digits>`, made on first use, kept in `.run-id`.

    The steps get it as AML_ROLLOUT_RUN_ID (`<id>/<step>`); the register step tells a re-run of
    itself by it (its versions' `source_run`), so it must be the folder's, not its name, which
    two folders share (`/a/out`, `/b/out`): the second run took production's own model for one
    it had registered itself and rolled it out again. A run folder from before `.run-id` (a step
    folder holding its std_log.txt, no file) keeps its name, which its versions' `source_run`
    holds; a folder merely named like a step (a project's `train/` code) does not make one. Any
    one line is an id (the name may have spaces); an empty or multi-line file is refused.
    """
    path = run_dir / RUN_ID_FILE
    legacy = not path.exists() and any(_step_folder(run_dir / step) for step in STEPS)
    made = run_dir.name if legacy else f"{run_dir.name}-{uuid.uuid4().hex[:12]}"
    try:
        # Created once: a second run of the folder reads the first's id rather than replace it.
        with path.open("x", encoding="utf-8") as fh:
            fh.write(made + "\n")
        return made
    except FileExistsError:
        pass
    # Only the line end is the file's: the name may have spaces (`--run-dir "run 3"`), even
    # around it, and the id must read back as it was made.
    text = path.read_text(encoding="utf-8").rstrip("\r\n")
    if not text.strip() or "\n" in text:
        # Removing it gives the folder a new id: its register step would then take a re-run
        # for another run and register the same model again, as a new version.
        raise ConfigError(
            f"run_dir: {path} is damaged ({text!r}); write back the folder's run id, one line: "
            "the source_run tag, less '/register', of the version it registered (`aml-rollout "
            "registry show NAME VERSION`), or the `local run <id>:` line of its earlier runs"
        )
    return text


def run_local(
    params: PipelineParams | None = None,
    *,
    run_dir: Path | None = None,
    until: str = "package",
    sink: Sink | None = None,
    env: Mapping[str, str] | None = None,
) -> LocalRun:
    """Run the pipeline's steps up to `until` as subprocesses; raise StepFailed on the first error.

    `params.registry` should name a local registry (`local:PATH`; the default `azureml` is what
    the job uses in Azure). Relative paths in `params` are resolved against the current folder.
    `sink` receives every log line, prefixed `[step] ` (default: this module's logger).
    """
    if until not in STEPS:
        raise ConfigError(f"until: {until!r} is not one of {list(STEPS)}")
    params = _absolute(params or PipelineParams(registry="local"))
    if params.package_mode == "azureml" and params.registry.startswith("local:"):
        # The package step would refuse it, after train and register left a version behind.
        raise ConfigError(
            "package_mode: azureml has Azure ML build the image, which needs the workspace "
            "registry (registry=azureml); a local registry packages with package_mode=local"
        )
    if STEPS.index(until) >= STEPS.index("register"):  # a train-only run registers nothing
        _refuse_case_twin(params)
    run_dir = (run_dir or default_run_dir()).resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. --run-dir naming a file: one line, no traceback
        raise ConfigError(f"run_dir {run_dir}: cannot create it: {exc.strerror}") from None
    emit = sink or _log_sink
    _earlier_outputs(run_dir)  # a folder not run-local's: refused before anything is written in it
    with _exclusive(run_dir):
        # Again, under the lock: a run that just ended there may have changed the folder.
        earlier = _earlier_outputs(run_dir)
        run = run_id(run_dir)
        # Stopping before the rollout step, nothing here rolls the version out: the register
        # step must then not tag it as the job's own (`rollout_by`), or no trigger would ever
        # deliver it.
        rolls_out = until == "rollout"
        # Production's files for the gate's re-score, bound as `pipeline submit` binds them
        # (the step gets the folder in its production_model input, as Azure ML mounts it).
        production = _production_folder(params)
        job = build_pipeline(params, rolls_out=rolls_out, production_model=production)
        nodes = _plan(job, until)
        # the pipeline's inputs
        values = {**asdict(params), "rollout_in_job": rolls_out, "production_model": production}
        # Every step's command line before the first runs: a value no command line can carry
        # (a `'`) stopped the run at ITS step, after train and register left a version behind.
        planned = _render_all(nodes, values, run_dir)
        result = LocalRun(run_dir)
        emit(f"local run {run}: {' → '.join(n.name for n in nodes)} in {run_dir}")
        if earlier:
            _move_earlier_outputs(run_dir, earlier, run)
            emit(f"the earlier run's {', '.join(earlier)} moved to {run_dir / PREVIOUS_DIR}")
        commit = source_commit()  # as in Azure ML (build.stamp_source): "-dirty" included
        with _Stopper().installed() as stopper:
            for node in planned:
                _run_step(node, run, params, commit, env, stopper, result, emit)
    return result


@contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """Hold `<run_dir>/LOCK_FILE` (flock) meanwhile; a run-local already holding it: refused.

    Two runs in one folder interleaved silently: the second moved the first's live train/ to
    previous/, then overwrote its outputs. The lock goes with the process (a killed run-local
    holds nothing); its PID is written in the file for the refusal to name.
    """
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise ConfigError(f"run_dir {run_dir}: cannot open {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("utf-8", "replace").strip() or "?"
            raise ConfigError(
                f"run_dir {run_dir} is in use by another run-local (PID {holder}): wait for it "
                "to end or give another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _step_folder(path: Path) -> bool:
    """`path` is a step folder run-local wrote (its std_log.txt in it); not if unreadable."""
    try:
        return path.is_dir() and not path.is_symlink() and (path / STEP_LOG).is_file()
    except OSError:  # is_file() raises EACCES on Python 3.11
        return False


def _earlier_outputs(run_dir: Path) -> list[str]:
    """The FRESH_STEPS folders an earlier run left in `run_dir`, to move to previous/.

    Only run-local's: in a folder without `.run-id` a step-named folder must hold its
    std_log.txt, and the previous/ they replace must be one run-local made (PREVIOUS_MARK,
    or, from before the mark, only step folders). Was: `--run-dir .` in a project root moved
    its `train/` code to previous/, and the next run deleted it, with the user's previous/.
    """
    earlier = [step for step in FRESH_STEPS if os.path.lexists(run_dir / step)]
    if not earlier:
        return []
    ours = (run_dir / RUN_ID_FILE).is_file()
    if not ours and (foreign := [s for s in earlier if not _step_folder(run_dir / s)]):
        raise ConfigError(
            f"run_dir {run_dir} holds {', '.join(f'{step}/' for step in foreign)} that "
            "run-local did not write; give an empty folder or one run-local made"
        )
    previous = run_dir / PREVIOUS_DIR
    if os.path.lexists(previous) and not _previous_folder(previous):
        raise ConfigError(
            f"run_dir {run_dir} holds {PREVIOUS_DIR}/ that run-local did not make, where the "
            f"earlier run's {', '.join(earlier)} would go; move it away or give another --run-dir"
        )
    return earlier


def _previous_folder(path: Path) -> bool:
    """`path` is a previous/ run-local made (marked, or only step folders: from before the mark)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return False
        if (path / PREVIOUS_MARK).is_file():  # raises EACCES on Python 3.11
            return True
        return all(entry.name in FRESH_STEPS and _step_folder(entry) for entry in path.iterdir())
    except OSError:  # unreadable: not known to be run-local's, so not removed
        return False


def _move_earlier_outputs(run_dir: Path, earlier: list[str], run: str) -> None:
    """Move `earlier` (from _earlier_outputs, which checked they and previous/ are run-local's)
    to `<run_dir>/previous/`, an older `previous/` removed first, the new one marked.

    Was: `--until train` (or a run stopped by the gate) left the earlier run's register/ and
    package/ in place, describing the old model version, read by a user or a later step as this
    run's. Every step of this run writes a fresh folder; one it does not reach is absent.
    """
    previous = run_dir / PREVIOUS_DIR
    try:
        if previous.is_dir():
            shutil.rmtree(previous)
        previous.mkdir()
        (previous / PREVIOUS_MARK).write_text(
            f"made by aml-rollout pipeline run-local (run {run}): its next run replaces it\n",
            encoding="utf-8",
        )
        for step in earlier:
            (run_dir / step).rename(previous / step)
    except OSError as exc:
        raise ConfigError(
            f"run_dir {run_dir}: cannot move the earlier run's outputs to {previous}: "
            f"{exc.strerror or exc}"
        ) from None


def _render_all(nodes: list[_Node], values: Mapping[str, Any], run_dir: Path) -> list[_Planned]:
    """Each node's command line, inputs and outputs bound (an output: `<run_dir>/<node>/<name>`)."""
    folders = {
        node.name: {name: run_dir / node.name / name for name in node.component.outputs}
        for node in nodes
    }
    planned = []
    for node in nodes:
        inputs: dict[str, Any] = {}
        for name, spec in node.component.inputs.items():
            bound = node.bindings.get(name)
            if isinstance(bound, tuple) and bound[0] == "parent":
                value = values.get(bound[1])
            elif isinstance(bound, tuple):
                value = folders[bound[1]][bound[2]]
            else:
                value = bound
            if value is None:
                value = spec.default
            if value is None and not spec.optional:
                raise ComponentError(f"step {node.name!r}: required input {name!r} is not bound")
            inputs[name] = value
        outputs = folders[node.name]
        argv = render_command(node.component.command, inputs, outputs)
        code_dir = (Path(node.component.base_path) / (node.component.code or ".")).resolve()
        planned.append(_Planned(node.name, argv, outputs, code_dir))
    return planned


def _run_step(
    node: _Planned,
    run: str,
    params: PipelineParams,
    commit: str | None,
    env: Mapping[str, str] | None,
    stopper: _Stopper,
    result: LocalRun,
    emit: Sink,
) -> None:
    """Run one step and record it in `result`; raise on anything but exit 0."""
    argv, outputs, code_dir = node.argv, node.outputs, node.code_dir
    log_file = result.run_dir / node.name / STEP_LOG
    for folder in outputs.values():
        folder.mkdir(parents=True, exist_ok=True)
    step_env = {
        **({"GIT_COMMIT": commit} if commit else {}),
        **os.environ,
        **(env or {}),
        "AML_ROLLOUT_RUN_ID": f"{run}/{node.name}",
        "PYTHONUNBUFFERED": "1",
    }
    # The step runs in the caller's folder (below), its code from the code folder: not from
    # a `components` or `rollout` package that folder may hold (PYTHONSAFEPATH).
    step_env["PYTHONPATH"] = os.pathsep.join(
        [str(code_dir), *filter(None, [step_env.get("PYTHONPATH")])]
    )
    step_env["PYTHONSAFEPATH"] = "1"
    emit(f"[{node.name}] $ {shlex.join(argv)}")
    started = time.monotonic()
    try:
        # In the caller's folder: a relative path inside the rollout spec (a routes or state
        # file) is then the one `aml-rollout rollout status SPEC` reads there. In the code
        # folder it was another file, in the checkout (or next to site-packages).
        code = _execute(argv, Path.cwd(), step_env, log_file, node.name, emit, stopper)
    except KeyboardInterrupt:
        emit(
            f"[{node.name}] interrupted after {time.monotonic() - started:.1f} s; "
            f"its log: {log_file}"
        )
        _where_the_rollout_is(node, params, emit)
        raise
    step = StepRun(node.name, argv, code, outputs, time.monotonic() - started)
    if stopper.signum is not None:  # whatever the step's code: the run was told to end
        got = signal_name(stopper.signum)
        how = (
            f"killed after {step.seconds:.1f} s: it did not stop within {stopper.grace_s:g} s "
            f"of the SIGTERM passed on (run-local got {got})"
            if stopper.killed
            else f"stopped after {step.seconds:.1f} s (run-local got {got}, passed SIGTERM on; "
            f"the step ended with {describe_exit(code)})"
        )
        emit(f"[{node.name}] {how}; its log: {log_file}")
        _where_the_rollout_is(node, params, emit)
        raise RunTerminated(stopper.signum)
    result.steps[node.name] = step
    if node.name == "rollout" and code in ROLLOUT_VERDICTS:
        verdict = _verdict(code, outputs.get("result"))
        emit(f"[{node.name}] {verdict.outcome} (exit {code}) after {step.seconds:.1f} s")
        raise verdict
    if node.name == "register" and code == EXIT_GATE_REFUSED:
        emit(f"[{node.name}] not registered (exit {code}) after {step.seconds:.1f} s")
        raise ModelNotRegistered(code)
    if code != 0:
        verb = "failed with" if code > 0 else "was"
        emit(f"[{node.name}] {verb} {describe_exit(code)} after {step.seconds:.1f} s")
        raise StepFailed(node.name, code)
    emit(f"[{node.name}] done in {step.seconds:.1f} s")


def _where_the_rollout_is(node: _Planned, params: PipelineParams, emit: Sink) -> None:
    """For a rollout step stopped mid-way, which may leave traffic split: where its state is."""
    if node.name == "rollout":
        emit(
            f"[{node.name}] the rollout's state: aml-rollout rollout status "
            f"{shlex.quote(params.rollout_spec)} --state-dir "
            f"{shlex.quote(str(node.outputs['result']))}"
        )


def _verdict(code: int, result: Path | None) -> RolloutNotPromoted:
    """The rollout's verdict, with the reason and ledger its result.json records (if readable)."""
    record: Any = {}
    if result is not None and (result / "result.json").is_file():
        try:
            record = read_json(result / "result.json")
        except ValueError:
            log.warning("%s is damaged; reporting the exit code alone", result / "result.json")
    if not isinstance(record, dict):
        record = {}
    return RolloutNotPromoted(
        code,
        ROLLOUT_VERDICTS[code],
        str(record.get("reason") or ""),
        str(record.get("ledger") or ""),
    )


def render_command(
    command: str, inputs: Mapping[str, Any], outputs: Mapping[str, Path]
) -> list[str]:
    """The argv Azure ML would run: optional blocks resolved, placeholders substituted.

    As in Azure ML, values are substituted into the command TEXT, which is then split as a shell
    would (shlex): a value with a space stays one argument only where the YAML quotes it, so an
    unquoted one fails here as it would in Azure. `python` becomes this interpreter so the step
    runs in the same environment.
    """

    def keep_block(match: re.Match[str]) -> str:
        inner = match.group(1)
        unbound = [
            name
            for kind, name in _PLACEHOLDER.findall(inner)
            if kind == "inputs" and inputs.get(name) is None
        ]
        return "" if unbound else inner

    template = _OPTIONAL_BLOCK.sub(keep_block, command)

    def substitute(match: re.Match[str]) -> str:
        kind, name = match.groups()
        if kind == "outputs":
            if name not in outputs:
                raise ComponentError(f"command refers to unknown output {name!r}")
            return _unquoted(f"output {name}", str(outputs[name]))
        if name not in inputs:
            raise ComponentError(f"command refers to unknown input {name!r}")
        value = inputs[name]
        if value is None:
            raise ComponentError(f"command needs input {name!r}, which is not bound")
        return _unquoted(name, _render_value(value))

    text = _PLACEHOLDER.sub(substitute, template)
    try:
        argv = shlex.split(text)
    except ValueError as exc:  # e.g. a value with a ' inside a quoted placeholder
        raise ConfigError(f"the command does not parse as a shell line ({exc}): {text}") from None
    if argv and argv[0] == "python":
        argv[0] = sys.executable
    return argv


def _unquoted(name: str, text: str) -> str:
    """`text`, which must hold no `'`: the commands single-quote values, as Azure ML runs them.

    One quote breaks the shell line; two pass, silently dropped (`a'b'c` becomes `abc`), so the
    step would get another value than the one given, here and in Azure ML alike.
    """
    if "'" in text:
        raise ConfigError(
            f"{name}: {text!r} holds a single quote ('), which the step's shell command line "
            "cannot carry (values are single-quoted in it); rename it"
        )
    return text


def _render_value(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"  # as Azure ML renders booleans
    return str(value)


def _absolute(params: PipelineParams) -> PipelineParams:
    """Make every local path absolute first (as in Azure ML, a step gets absolute paths)."""
    changes: dict[str, Any] = {}
    if params.data is not None and not is_local_path(params.data):
        # The train step would read it as a path (`azureml://x` → `azureml:/x`) and fail late.
        raise ConfigError(
            f"data: {params.data} is not a local path: run-local reads a local CSV folder; "
            "data in Azure ML needs `pipeline submit`"
        )
    for key in ("data", "rollout_spec"):
        value = getattr(params, key)
        if value is not None and is_local_path(value):
            if not Path(value).exists():  # as `pipeline build` says it, not train's exit 1 later
                raise ConfigError(f"{key}: local path {value} does not exist")
            changes[key] = str(Path(value).resolve())
    kind, _, path = params.registry.partition(":")
    if kind == "local":
        from aml_pipelines.registry.local import local_root

        changes["registry"] = f"local:{local_root(path)}"
    return replace(params, **changes)


def _local_registry(params: PipelineParams) -> LocalRegistry | None:
    """The LocalRegistry `params.registry` names, None when it is not a local one that exists."""
    kind, _, path = params.registry.partition(":")
    if kind != "local" or not Path(path).is_dir():
        return None
    from aml_pipelines.registry.local import LocalRegistry

    return LocalRegistry(Path(path))


def _refuse_case_twin(params: PipelineParams) -> None:
    """The register step's refusal of a model name differing from a registered one only in
    case, before any step runs: the step refused it after train had run."""
    from components.register.register import check_case_twin

    if (registry := _local_registry(params)) is not None:
        check_case_twin(registry, params.model_name)


def _production_folder(params: PipelineParams) -> str | None:
    """The local registry's folder of the version tagged stage=production (None: there is no
    such version, or the registry is not local)."""
    from components.register.register import production_version

    if (registry := _local_registry(params)) is None:
        return None
    production = production_version(registry, params.model_name)
    return str(production.path) if production is not None and production.path else None


def _plan(job: Any, until: str) -> list[_Node]:
    """The nodes to run, in dependency order, ending with `until` (and only what it needs)."""
    spec = job._to_dict()["jobs"]  # the YAML view: bindings as ${{parent...}} strings
    nodes: dict[str, _Node] = {}
    for name, node in job.jobs.items():
        bindings: dict[str, Any] = {}
        for input_name, value in (spec[name].get("inputs") or {}).items():
            raw = value.get("path") if isinstance(value, dict) else value
            if isinstance(raw, str) and (m := _PARENT_INPUT.match(raw)):
                bindings[input_name] = ("parent", m.group(1))
            elif isinstance(raw, str) and (m := _PARENT_OUTPUT.match(raw)):
                bindings[input_name] = ("job", m.group(1), m.group(2))
            else:
                bindings[input_name] = raw
        nodes[name] = _Node(name, node.component, bindings)

    def upstream(node: _Node) -> set[str]:
        return {b[1] for b in node.bindings.values() if isinstance(b, tuple) and b[0] == "job"}

    needed: list[str] = []

    def visit(name: str, trail: tuple[str, ...] = ()) -> None:
        if name in trail:
            raise ComponentError(f"pipeline has a cycle: {' → '.join((*trail, name))}")
        for parent in sorted(upstream(nodes[name])):
            visit(parent, (*trail, name))
        if name not in needed:
            needed.append(name)

    visit(until)
    return [nodes[name] for name in needed]


class _Stopper:
    """SIGTERM or SIGHUP to run-local (`kill PID`, a CI cancel, a supervisor stopping it).

    Python's default ended run-local at once: the running step was left to run on under PID 1 (a
    rollout moving traffic unwatched) and its std_log.txt lost the lines not yet flushed. Instead
    the step is sent SIGTERM, what Azure ML sends a cancelled job's step (the rollout step stops on
    it as on Ctrl-C, its lease released; the others die of it), and killed if it has not stopped
    `grace_s` later; its output is kept meanwhile, then the run ends
    (RunTerminated). SIGTERM, not SIGHUP, is passed on: the steps stop cleanly on SIGTERM only.
    Between steps the signal ends the run at once. A signal ignored when the run starts (SIGHUP
    under `nohup`) stays ignored, by run-local and its steps.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self, grace_s: float = STOP_GRACE_S) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None  # the first stop signal received
        self.killed = False  # the step did not stop in time
        self._proc: subprocess.Popen[str] | None = None
        self._starting = False
        self._timer: threading.Timer | None = None

    @contextmanager
    def installed(self) -> Iterator[_Stopper]:
        """Handle the stop signals meanwhile (in the main thread: only it can)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        # Under `nohup` SIGHUP is ignored, and stays so: handled, it stopped the run when the
        # terminal closed, and the steps (exec resets a handled signal, keeps an ignored one)
        # died of it.
        previous = {
            signum: signal.signal(signum, self._handle)
            for signum in self.SIGNALS
            if signal.getsignal(signum) is not signal.SIG_IGN
        }
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextmanager
    def watching(self) -> Iterator[Callable[[subprocess.Popen[str]], None]]:
        """While a step starts and runs: a signal is for it. Yields the call that names it."""
        self._starting = True
        try:
            yield self._attach
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._proc, self._starting, self._timer = None, False, None

    def _attach(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        self._starting = False
        if self.signum is not None:  # arrived while it started
            self._stop(proc)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        if self._proc is not None:
            self._stop(self._proc)
        elif not self._starting:
            raise RunTerminated(signum)

    def _stop(self, proc: subprocess.Popen[str]) -> None:
        if self._timer is None:  # once: a second signal changes nothing
            proc.send_signal(signal.SIGTERM)
            self._timer = threading.Timer(self.grace_s, self._kill, [proc])
            self._timer.daemon = True
            self._timer.start()

    def _kill(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            self.killed = True
            proc.kill()


def _execute(
    argv: list[str],
    cwd: Path,
    env: Mapping[str, str],
    log_file: Path,
    name: str,
    emit: Sink,
    stopper: _Stopper | None = None,
) -> int:
    """Run `argv`, each line of its output into `log_file` (as it comes: `tail -f` shows it) and
    to `emit`; its wait status (negative: killed by that signal)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with (
        (stopper or _Stopper()).watching() as attach,
        log_file.open("w", encoding="utf-8", buffering=1) as fh,
        subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as proc,
    ):
        attach(proc)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                fh.write(line)
                emit(f"[{name}] {line.rstrip()}")
        except KeyboardInterrupt:
            # Ctrl-C reached the step too (one process group): keep its last lines — how it
            # stopped — in its log and on screen, then stop the run. A second Ctrl-C cuts this.
            for line in proc.stdout:
                fh.write(line)
                emit(f"[{name}] {line.rstrip()}")
            proc.wait()
            raise
        return proc.wait()
