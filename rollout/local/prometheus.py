"""The local stack's Prometheus: Debian's binary as a child process, generated config, 1 s scrape.

The binary is `$AML_ROLLOUT_PROMETHEUS`, else `prometheus` on PATH, else the unpacked Debian
package in `.cache/prometheus/usr/bin/prometheus` (`scripts/ensure-prometheus.sh` puts it there
without root). No PyPI wheel ships Prometheus.

Scrape jobs (every second, so the judge sees a change within about 1.5 s):

- `envoy`: Envoy's admin `/stats/prometheus` (per-cluster request, 5xx and latency series: what
  the rollout is judged on);
- `scoring`: each scoring server's `/metrics`, found through `targets.json` written by
  `rollout.local.workloads` (file service discovery, reloaded on change). The targets carry
  `colour` and `version` labels, which the servers' own series carry too: `honor_labels` keeps
  one `colour`/`version` instead of adding `exported_colour`/`exported_version` duplicates.

Data lives in the stack's directory; `stop()` then `start()` keeps it (the e2e test that stops
Prometheus mid-step restarts it on the same TSDB and port).

Prometheus cannot listen on port 0 and say where, so a port not given is chosen here and may be
taken by another process (a parallel test's server) before Prometheus binds it. Two checks
make that a retry, never a stack talking to the wrong server: Prometheus exiting with "address
already in use", or the server answering on the port not being this one (its
`/api/v1/status/flags` must name our config file: another Prometheus answers `/-/ready` too).
Either way the first start moves to another free port, up to `PORT_ATTEMPTS` times; a given
port, and a restart (clients know the port by then), fail with the reason instead.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from rollout.errors import LocalStackError
from rollout.local.process import (
    Child,
    StackProcess,
    binary_override,
    free_port,
    wait_ready,
    wrong_server,
)

log = logging.getLogger(__name__)

#: Where scripts/ensure-prometheus.sh unpacks the Debian package (relative to the checkout).
CACHED_BINARY = Path(".cache/prometheus/usr/bin/prometheus")
SCRAPE_INTERVAL = "1s"
#: Free ports tried by a first start before it gives up (each taken by another process first).
PORT_ATTEMPTS = 3


def prometheus_binary() -> str:
    """Path of the Prometheus binary, or LocalStackError saying how to get one."""
    override = binary_override("AML_ROLLOUT_PROMETHEUS")
    if override:
        return override
    on_path = shutil.which("prometheus")
    if on_path:
        return on_path
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        cached = base / CACHED_BINARY
        if cached.is_file():
            return str(cached)
    raise LocalStackError(
        "Prometheus not found: run `make prometheus` (scripts/ensure-prometheus.sh), "
        "`sudo apt-get install prometheus`, or set AML_ROLLOUT_PROMETHEUS=/path/to/prometheus"
    )


def scrape_config(envoy_admin: str, targets_file: Path) -> dict[str, object]:
    """The prometheus.yml of the local stack."""
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "envoy",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [envoy_admin]}],
            },
            {
                "job_name": "scoring",
                # The servers label their own series with colour and version; the targets carry
                # the same labels (so process_* series say which server they are). Without
                # honor_labels every clash is renamed exported_colour / exported_version.
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
            },
        ],
    }


class PrometheusProcess(StackProcess):
    """One Prometheus on 127.0.0.1:`port` scraping the stack every second."""

    stop_grace_s = 10.0  # it flushes its TSDB head on SIGTERM

    def __init__(
        self,
        workdir: Path,
        *,
        envoy_admin: str,
        targets_file: Path,
        port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        #: Whether a start may move to another port: not a given one, nor once clients know it.
        self._may_move = port is None
        self.envoy_admin = envoy_admin
        self.targets_file = targets_file
        self.config_path = self.workdir / "prometheus.yml"

    @property
    def url(self) -> str:
        """The HTTP API base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, ready_timeout_s: float = 60.0) -> PrometheusProcess:
        """Write the config and start Prometheus; returns once `/-/ready` answers, from it.

        LocalStackError when it cannot start, or when another process holds a port it may not
        move from (see the module docstring).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.targets_file.exists():
            self.targets_file.parent.mkdir(parents=True, exist_ok=True)
            self.targets_file.write_text("[]", encoding="utf-8")
        config = scrape_config(self.envoy_admin, self.targets_file)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._start_on_port(ready_timeout_s)
            except _PortTaken as exc:
                if not self._may_move or attempt == PORT_ATTEMPTS:
                    raise LocalStackError(
                        f"prometheus cannot listen on 127.0.0.1:{self.port}: the port is held by "
                        f"another process ({exc})"
                    ) from None
                taken, self.port = self.port, free_port()
                log.warning("prometheus: port %d was taken (%s); trying %d", taken, exc, self.port)
                continue
            self._may_move = False
            return self
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _start_on_port(self, ready_timeout_s: float) -> None:
        """Start on `self.port`; _PortTaken when another server has it."""
        self._child = Child(
            "prometheus",
            [
                prometheus_binary(),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            log_path=self.workdir / "prometheus.log",
            ready=self._wait_ready,
            die_with_parent=True,  # nothing to scrape for once the stack's owner is gone
        )
        try:
            self._child.start(ready_timeout_s=ready_timeout_s)
        except LocalStackError as exc:
            self._child = None
            message = str(exc)
            if "address already in use" in message or "something else answers" in message:
                raise _PortTaken(message) from None
            raise

    def _wait_ready(self, timeout_s: float, alive: Callable[[], bool]) -> None:
        """`/-/ready` answers, and the server answering is this Prometheus."""
        wait_ready(f"{self.url}/-/ready", timeout_s=timeout_s, alive=alive)
        url = f"{self.url}/api/v1/status/flags"
        try:
            config_file = httpx.get(url, timeout=5.0).json()["data"]["config.file"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise LocalStackError(wrong_server(url, f"no Prometheus flags: {exc!r}")) from None
        if config_file != str(self.config_path):
            raise LocalStackError(wrong_server(url, f"a Prometheus reading {config_file}"))


class _PortTaken(LocalStackError):
    """Another process holds the port Prometheus was to listen on."""
