"""Prometheus metrics of one scoring server, on an injected CollectorRegistry.

Names and labels (what the local Prometheus scrapes from each server, job `scoring`, and what
the local-stack e2e tests check Envoy's counts against):

- `scoring_requests_total{colour, model, version, code}`: POST /score requests by HTTP status
  code, 4xx and injected 5xx included (GET /score, the identity, is not a scoring request); 499
  is a client that disconnected before its body arrived.
- `scoring_request_duration_seconds{colour, model, version}`: latency histogram of POST /score,
  measured in the server from the request reaching the app to the answer handed to the transport,
  the wait for the predict thread included (not of a 408 or 499: a body that never arrived
  measures the client, not the model). The
  buckets are fine (0.5 ms steps at the low end) so that a judge given them (a `custom` preset:
  it derives "slow" requests from the bucket just above the baseline's p99) can tell
  sub-millisecond differences apart.

The canary judge's built-in presets (rollout.metrics.prometheus: `envoy`, `istio`) read the
proxy's metrics, not these: the proxy also counts the failures no server answers (a dead
colour's connect failures, the 503s it makes up itself), which a server cannot count.
- `scoring_requests_in_flight{colour}`: gauge.
- `scoring_buffered_body_bytes{colour}`: bytes of /score request bodies held at once, across
  requests (capped by `--max-buffered-body-bytes`: a body that would pass the cap is a 429).
- `scoring_fault_error_rate{colour}`, `scoring_fault_latency_seconds{colour}`: the fault knob,
  0 unless someone turned it on; `scoring_faults_injected_total{colour, kind}`.
- `scoring_model_info{colour, model, version, sha256}`: 1, the identity being served.

A registry per server (never the global default) keeps tests independent and lets the local
stack run blue and green in one process if it wants.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from scoring.model import ModelIdentity

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02,
    0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


class ScoringMetrics:
    """The metric families of one server plus label-bound children for the hot path."""

    def __init__(self, registry: CollectorRegistry, identity: ModelIdentity, colour: str) -> None:
        self.registry = registry
        self.colour = colour
        labels = ("colour", "model", "version")
        self.requests = Counter(
            "scoring_requests_total",
            "Scoring requests by HTTP status code.",
            (*labels, "code"),
            registry=registry,
        )
        self.duration = Histogram(
            "scoring_request_duration_seconds",
            "Time to answer a scoring request, in seconds.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "scoring_requests_in_flight",
            "Scoring requests being processed.",
            ("colour",),
            registry=registry,
        ).labels(colour)
        self.buffered_body = Gauge(
            "scoring_buffered_body_bytes",
            "Bytes of request bodies being buffered at once, across requests.",
            ("colour",),
            registry=registry,
        ).labels(colour)
        self.fault_error_rate = Gauge(
            "scoring_fault_error_rate",
            "Injected error rate of the fault knob (0 = off).",
            ("colour",),
            registry=registry,
        ).labels(colour)
        self.fault_latency = Gauge(
            "scoring_fault_latency_seconds",
            "Latency added by the fault knob (0 = off).",
            ("colour",),
            registry=registry,
        ).labels(colour)
        self.faults = Counter(
            "scoring_faults_injected_total",
            "Faults injected by the fault knob, by kind (error, latency).",
            ("colour", "kind"),
            registry=registry,
        )
        self.info = Gauge(
            "scoring_model_info",
            "The model this server serves (value 1).",
            ("colour", "model", "version", "sha256"),
            registry=registry,
        )
        self._values = (colour, identity.name, identity.version)
        self.info.labels(*self._values, identity.sha256).set(1)
        self.observe_latency = self.duration.labels(*self._values).observe
        self._by_code: dict[int, Counter] = {}
        self.fault_errors = self.faults.labels(colour, "error")
        self.fault_delays = self.faults.labels(colour, "latency")

    def count(self, code: int) -> None:
        """Count one /score answer with status `code`."""
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self.requests.labels(*self._values, str(code))
        child.inc()

    def show_fault(self, error_rate: float, latency_ms: float) -> None:
        """Export the fault knob's setting."""
        self.fault_error_rate.set(error_rate)
        self.fault_latency.set(latency_ms / 1000.0)
