"""The embedded local stack: Envoy, Prometheus, blue/green scoring servers and a load generator.

    with LocalStack(workdir) as stack:            # Envoy + Prometheus up, nothing deployed
        stack.router.deploy(Colour.GREEN, v1)     # green = production (a scoring process)
        load = stack.start_load(rps=100)          # traffic through Envoy's listener
        spec = stack.spec(steps=[10, 50, 100])    # a RolloutSpec wired to this stack
        run_rollout(spec, candidate=v2)           # the real engine; deploys blue itself
    # every process stopped and reaped, every port released

Everything binds 127.0.0.1. Envoy and the scoring servers get ports the OS picks as they bind
(none is chosen first and bound later, when another process may have taken it); Prometheus,
which cannot report such a port, checks that what answers on its port is itself, else moves.
Processes run in their own sessions (see
`rollout.local.process`), so Ctrl-C reaches only this Python process, whose `stop()` (also run
on any error by the context manager) stops, in order: the load, the scoring servers recorded in
`workloads/` (including ones started by a controller that died), Prometheus, Envoy.
If this process is killed hard, Linux stops Envoy, Prometheus and the scoring servers it
started from its main thread (`die_with_parent`); the load generator is a thread and goes too.

A temporary workdir is removed at `stop()`, except after a failed `start()` whose error quotes
and names the failing process's log there: the folder is then kept (and the error says so).

A workdir may be reused (`aml-rollout up --workdir D` twice, or after a crash): `start()` writes
Envoy's config afresh (new ports), stops scoring servers a previous stack left recorded and
forgets which release each colour served; rollout state, ledgers and Prometheus' data stay.

Layout of `workdir`:

    envoy/        envoy.json (bootstrap), routes.json (RDS), endpoints-<colour>.json (EDS), log
    prometheus/   prometheus.yml, data/ (TSDB), log
    workloads/    one <colour>-<port>.proc.json per scoring process, its log, targets.json
    releases.json which release each colour serves (the Envoy router's record)
    state/        rollout status, lease and ledger of specs made by `spec()`
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from rollout.config import (
    AnalysisConfig,
    EnvoyRouterConfig,
    FileStateConfig,
    PrometheusMetricsConfig,
    RolloutSpec,
)
from rollout.core.types import Colour
from rollout.errors import LocalStackError, RouterError
from rollout.local.envoy import EnvoyProcess, envoy_binary
from rollout.local.prometheus import PrometheusProcess, prometheus_binary
from rollout.local.workloads import ScoringProcesses
from rollout.metrics.prometheus import PrometheusMetrics
from rollout.routers.envoy import EnvoyRouter
from rollout.state.file import hold_lock

log = logging.getLogger(__name__)


class LocalStack:
    """Start/stop the local data plane and monitoring; build specs, routers and load for it."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        faults: Mapping[str, float] | None = None,
        keep: bool | None = None,
        envoy_port: int | None = None,
        folder_option: str = "--workdir",
    ) -> None:
        self._temporary = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="aml-rollout-stack-")).resolve()
        # A temporary folder is removed at stop unless `keep`; a given folder is always kept.
        self.keep = (not self._temporary) if keep is None else keep
        self.envoy = EnvoyProcess(self.workdir / "envoy", port=envoy_port)
        self.releases_file = self.workdir / "releases.json"
        # Servers this process starts die with it (Envoy does too); see ScoringProcesses.
        self.workloads = ScoringProcesses(
            self.workdir / "workloads", faults=faults, die_with_parent=True
        )
        self.prometheus = PrometheusProcess(
            self.workdir / "prometheus",
            envoy_admin="",  # Envoy's admin port is known once it started: set in start()
            targets_file=self.workloads.directory / "targets.json",
        )
        self._router: EnvoyRouter | None = None
        self._metrics: PrometheusMetrics | None = None
        self._loads: list[Any] = []
        self._lock_fd: int | None = None
        #: The command's option that chooses the folder, named when it is refused as in use.
        self.folder_option = folder_option

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> LocalStack:
        """Start Envoy and Prometheus (stopping what started if anything fails)."""
        try:  # A missing binary is found before anything runs: it names no log worth keeping.
            envoy_binary()
            prometheus_binary()
        except LocalStackError:
            self.stop()  # nothing started; a temporary folder goes
            raise
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._lock_workdir()  # before anything is touched: a live stack's files are its own
        except OSError as exc:  # a file there, no permission, a read-only place
            why = "it is not a folder" if isinstance(exc, FileExistsError) else exc.strerror
            raise LocalStackError(
                f"cannot keep the stack's files in {self.workdir}: {why or exc}"
            ) from exc
        try:
            self._clear_leftovers()
            self.envoy.start()
            self.prometheus.envoy_admin = f"127.0.0.1:{self.envoy.admin_port}"
            self.prometheus.start()
        except LocalStackError as exc:
            # Kept only when the error names a log in it: deleting it would leave the user a
            # dead path. One that names none (a port taken) is one line, and no folder left.
            if self.keep or str(self.workdir) not in str(exc):
                self.stop()
                raise
            self.keep = True
            self.stop()
            raise LocalStackError(
                f"{exc}\n(the stack did not start; its files and logs are kept in {self.workdir})"
            ) from exc
        # Its own files: a file where a folder goes, a full disk (RouterError: a route or
        # record file, from `write_atomically`).
        except (OSError, RouterError) as exc:
            self.stop()
            raise LocalStackError(
                f"cannot write the stack's files in {self.workdir}: {exc}"
            ) from exc
        except BaseException:
            self.stop()
            raise
        log.info(
            "local stack up: envoy %s (admin %s), prometheus %s, in %s",
            self.envoy.url,
            self.envoy.admin_url,
            self.prometheus.url,
            self.workdir,
        )
        return self

    def _lock_workdir(self) -> None:
        """Hold `<workdir>/.stack.lock` for the stack's life (the kernel drops it if we die).

        A second stack on the same folder would stop the first one's scoring servers and
        rewrite the route files its Envoy watches: it is refused instead, naming the holder.
        """
        fd = hold_lock(self.workdir / ".stack.lock", "")
        if isinstance(fd, str):
            raise LocalStackError(
                f"another local stack runs in {self.workdir} ({fd}): stop it, "
                f"or use another folder ({self.folder_option})"
            )
        self._lock_fd = fd

    def _owns_workdir(self) -> bool:
        """Whether the scoring servers recorded in the folder are this stack's to stop.

        They are when it holds the lock, or can take it now (no stack runs there: what a
        crashed one left is anyone's to clean up). A stack refused at `start()` because another
        runs there must not stop that one's servers on its way out (`up` stops its stack on
        any exit: it once took green down under a live stack, and Envoy answered 503).
        """
        if self._lock_fd is None and self.workdir.is_dir():
            with contextlib.suppress(LocalStackError, OSError):
                self._lock_workdir()
        return self._lock_fd is not None

    def _unlock_workdir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _clear_leftovers(self) -> None:
        """Forget what a previous stack in this workdir left: it served behind another Envoy.

        Envoy starts with fresh routes and no endpoints (see `EnvoyProcess.start`), so:
        scoring servers still recorded in `workloads/` (a controller in another process does
        not tie them to its life) are stopped — nothing can reach them through the new Envoy,
        and Prometheus would go on scraping them; `releases.json` is removed, or the router
        would report a colour as serving a release no endpoint backs and let traffic be sent
        there. The rollout state (statuses, ledgers), Prometheus' data and trained models are
        kept: they are history, not claims about what runs now.
        """
        stopped = self.workloads.stop_all()
        if stopped:
            log.warning(
                "stopped %d scoring server(s) left running by a previous stack in %s",
                stopped,
                self.workdir,
            )
        self.releases_file.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop everything this stack started; safe to call twice and after a partial start.

        Every part runs whatever an earlier one raised (a full disk, a signal); the first
        error is raised once all have run. Was: the first one ended the stop, and Envoy and
        Prometheus ran on, the lock held, the temporary folder kept.
        """
        errors: list[BaseException] = []
        for part in (
            self.stop_loads,
            self._close_clients,
            self._stop_workloads,
            self.prometheus.stop,
            self.envoy.stop,
            self._unlock_workdir,
        ):
            try:
                part()
            except BaseException as exc:  # raised below, once every part ran
                errors.append(exc)
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise errors[0]

    def _close_clients(self) -> None:
        clients, self._router, self._metrics = (self._router, self._metrics), None, None
        for client in clients:
            if client is not None:
                client.close()

    def _stop_workloads(self) -> None:
        if self._owns_workdir():
            # targets.json is not rewritten: no Prometheus reads it once the stack stops (and
            # a full disk must not fail the stop; the next start writes it afresh).
            stopped = self.workloads.stop_all(targets=False)
            if stopped:
                log.debug("stopped %d scoring server(s)", stopped)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------ what it offers

    @property
    def url(self) -> str:
        """Envoy's listener: where clients send /score (pin with `x-api-version`)."""
        return self.envoy.url

    def router_config(self) -> EnvoyRouterConfig:
        """The spec's router section for this stack."""
        return EnvoyRouterConfig(
            admin_url=self.envoy.admin_url,
            routes_file=self.envoy.files.routes,
            releases_file=self.releases_file,
            workloads_dir=self.workloads.directory,
        )

    def metrics_config(self) -> PrometheusMetricsConfig:
        """The spec's metrics section for this stack (Envoy preset)."""
        return PrometheusMetricsConfig(url=self.prometheus.url, preset="envoy")

    @property
    def router(self) -> EnvoyRouter:
        """An Envoy router on this stack, with this stack's scoring processes as workloads."""
        if self._router is None:
            cfg = self.router_config()
            assert cfg.releases_file is not None
            self._router = EnvoyRouter(
                admin_url=cfg.admin_url,
                files=self.envoy.files,
                releases_file=cfg.releases_file,
                workloads=self.workloads,
            )
        return self._router

    @property
    def metrics(self) -> PrometheusMetrics:
        """The Prometheus provider on this stack."""
        if self._metrics is None:
            self._metrics = PrometheusMetrics.from_config(self.metrics_config())
        return self._metrics

    def spec(self, name: str = "local", **fields: Any) -> RolloutSpec:
        """A RolloutSpec wired to this stack; `fields` override (e.g. steps, analysis)."""
        data: dict[str, Any] = {
            "name": name,
            "router": self.router_config(),
            "metrics": self.metrics_config(),
            "analysis": AnalysisConfig(interval_s=1.0),
            "state": FileStateConfig(dir=self.workdir / "state"),
        }
        data.update(fields)
        return RolloutSpec.model_validate(data)

    def start_load(self, rps: float, **options: Any) -> Any:
        """Background load through Envoy (`BackgroundLoad`), stopped with the stack."""
        from scoring.loadgen import BackgroundLoad

        load = BackgroundLoad(f"{self.url}/score", rps=rps, **options).start()
        self._loads.append(load)
        return load

    def stop_loads(self) -> None:
        """Stop every background load started by `start_load`."""
        for load in self._loads:
            try:
                load.stop(timeout=5.0)
            except Exception as exc:  # a failed load must not keep processes alive
                log.warning("load generator ended with %s", exc)
        self._loads.clear()

    def set_fault(self, colour: Colour, error_rate: float, latency_ms: float = 0.0) -> None:
        """Demo knob: turn on the fault injection of `colour`'s live scoring server."""
        endpoint = self.workloads.endpoint_of(colour)
        if endpoint is None:
            raise LocalStackError(f"no scoring server runs as {colour.value}")
        url = f"http://{endpoint.host}:{endpoint.port}/admin/fault"
        try:
            response = httpx.put(
                url, json={"error_rate": error_rate, "latency_ms": latency_ms}, timeout=5
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise LocalStackError(f"cannot set the fault knob at {url}: {exc}") from exc
        log.warning(
            "demo knob: %s now answers %.0f %% of requests with 500", colour.value, error_rate * 100
        )

    def processes(self) -> dict[str, int | None]:
        """PIDs of the stack's processes (for tests and `up`)."""
        found: dict[str, int | None] = {"envoy": self.envoy.pid, "prometheus": self.prometheus.pid}
        for record in self.workloads.records():
            found[f"scoring {record['ref']}"] = int(record["pid"])
        return found
