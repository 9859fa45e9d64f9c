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
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from rollout.errors import LocalStackError
from rollout.local.process import Child, StackProcess, free_port

#: Where scripts/ensure-prometheus.sh unpacks the Debian package (relative to the checkout).
CACHED_BINARY = Path(".cache/prometheus/usr/bin/prometheus")
SCRAPE_INTERVAL = "1s"


def prometheus_binary() -> str:
    """Path of the Prometheus binary, or LocalStackError saying how to get one."""
    override = os.environ.get("AML_ROLLOUT_PROMETHEUS")
    if override:
        if not Path(override).is_file():
            raise LocalStackError(f"AML_ROLLOUT_PROMETHEUS={override} is not a file")
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
        self.envoy_admin = envoy_admin
        self.targets_file = targets_file
        self.config_path = self.workdir / "prometheus.yml"

    @property
    def url(self) -> str:
        """The HTTP API base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, ready_timeout_s: float = 60.0) -> PrometheusProcess:
        """Write the config and start Prometheus; returns once `/-/ready` answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.targets_file.exists():
            self.targets_file.parent.mkdir(parents=True, exist_ok=True)
            self.targets_file.write_text("[]", encoding="utf-8")
        config = scrape_config(self.envoy_admin, self.targets_file)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
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
            ready_url=f"{self.url}/-/ready",
            die_with_parent=True,  # nothing to scrape for once the stack's owner is gone
        )
        self._child.start(ready_timeout_s=ready_timeout_s)
        return self
