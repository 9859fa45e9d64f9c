"""Prometheus as a MetricsProvider: exact per-colour counts since a step began.

The judge wants integers: requests, 5xx errors and a cumulative latency histogram per colour,
counted from `since` to `now`. `rate()` and `increase()` extrapolate and smooth, so this provider
reads the raw cumulative counters instead, with prometheus-api-client:

1. the counter value of every series at `now` (its last sample in the step, so a series marked
   stale by a failed scrape keeps its count), and its baseline: its first sample at or after
   `since` (so no traffic from before the step counts — not the previous step's, not the
   previous rollout's canary's); a series with no sample in the 5 minutes before `since`
   appeared during the step and counts from 0 (Envoy's 5xx series, for one, appears only with
   the first 5xx) — one merely marked stale there by a failed scrape did not. When every
   scrape of a series' target (its `job` and `instance`) failed there (no series of it, its
   `up` 0), or Prometheus scraped nothing then (its storage lost on a restart, or down),
   absence says nothing: the series counts from 0 only if it appeared after Prometheus' first
   scrape of its target in the step, else from its first sample (History). A target with no
   `up` there while others had one is new (a pod created in the step), its series too;
2. `resets(series[window])` at `now`; for the rare series that restarted inside the window, the
   raw samples of the window are fetched (of those series alone) and the increase is summed piece
   by piece (a drop means the counter restarted from 0), which is exact where `increase()` is not.

Per-series deltas are summed per colour, and histogram buckets per `le` (converted to seconds).
The presets also read the newest requests sample's age: one older than STALE_SAMPLE_S is warned
about (Prometheus stores nothing new, so the counts would stay put without a word).

Presets (label values per colour come from `labels`; `match_labels` adds exact matchers to every
series a preset reads, scoping it to one Envoy or mesh on a shared Prometheus):

- `envoy`: `envoy_cluster_upstream_rq_completed`,
  `envoy_cluster_upstream_rq_xx{envoy_response_code_class="5"}` and
  `envoy_cluster_upstream_rq_time_bucket` (milliseconds) by `envoy_cluster_name`. Requests are
  the *completed* ones, not `upstream_rq_total`: Envoy charges `rq_completed` and `rq_xx` together
  for every response, its own included, whereas `rq_total` counts only requests that reached an
  upstream connection — the 503s Envoy answers when a colour's server is dead (connect failure)
  are in `rq_xx` and `rq_completed` but never in `rq_total`, which would read as "no traffic"
  while half the users get errors. In-flight requests, too, count in neither. Only the
  weighted clusters `blue` and `green` are read, so header-pinned traffic (`blue-pinned`,
  `green-pinned`) never enters the canary statistics. Envoy publishes histograms once per stats
  flush (1 s in the local stack) while counters are live; requests not yet in the histogram are
  counted as not slow rather than as slow, so the lag delays latency evidence by one flush and
  never fabricates it.
- `istio`: `istio_requests_total` (5xx by `response_code`) and
  `istio_request_duration_milliseconds_bucket`, `reporter="source"` (the ingress gateway and client
  sidecars), by `destination_service_name` (and `destination_service_namespace` when `namespace` is
  set). Pinned requests reach the same pods through `<app>-<colour>-pinned` Services, so counting
  the weighted Services `<app>-blue` / `<app>-green` keeps A/B traffic out of the canary counts; the
  destination proxy cannot tell the two apart, hence the source reporter.
- `custom`: PromQL templates of raw cumulative counters (`{colour}` → label value; no
  `{window}`: a range function evaluated at `since` covers the window before the step), each
  evaluated at `since` and at `now`, series by series (matched by their labels: a query that
  keeps one series per pod or target counts a pod that goes or comes as what it served in the
  step); a series a failed scrape marked stale there keeps its last value of the 5 minutes
  before (at `now`: of the whole step, so a pod gone long before the tick still counts), a
  series absent at `since` counts from 0, and one that restarted in the step (`resets()` of
  its subquery, or a value of it below its base) is summed piece by piece over its values in
  the step, as the presets' are. The start probe evaluates each query once.
  When every scrape of its target failed before `since`, or Prometheus scraped nothing then,
  a series absent there counts as in the presets (item 1: from its first value in the step,
  from 0 only if it appeared after its target's first), and one whose query dropped `job`
  and `instance`, when Prometheus holds no successful scrape at all, from its first value.
  A `sum(...)` is one series: a pod of it that stops being scraped lowers it, which reads as
  a restart. A query giving no instant vector (`scalar(...)`, a range selector) is an error
  saying what it gives.

Errors are never clamped to the request count. Every error is a request, so when a window
counts more errors than requests (a scrape caught one counter and not yet the other, or a
custom query that counts requests elsewhere), the requests are raised to the errors and the
detail keeps the count before as `requests_raised_to_errors`. Dropping errors would hide a
failing canary, and an Observation error would make the judge wait (Error) through exactly the
outage it must see.

The analysis' `latency.slo_ms` (handed over by `make_metrics`) must be a bound of the latency
histogram: between two, a request is slow only above the next one up, and every message would
name the SLO while measuring that bound; above every bound, nothing would ever be slow. The
bounds are known only once read, so the probe refuses such an SLO when the histogram has series
then, and every reading says it as an error (`_slo_problem`). When the judge counts both
colours' slow requests above a bound of green's (its p99 bucket: `threshold: baseline_p99`,
`compare_bounds`), blue's histogram must have every bound green's has: a reading where it
lacks one is an error naming it (`_bounds_problem`), where blue's requests above it counted
only above its next bound up. With `threshold: slo` the SLO is a bound of each already, and
with latency not judged nothing is compared.

No data (no series, NaN) gives zero counts, so the judge says Inconclusive; an unreachable
Prometheus or a failing query gives `Observation(error=...)` naming the URL, so it says Error —
and so does an answer with warnings, which the API gives when it answers in part (a Thanos
querier that could not reach a store: a series missing at the step's start would count from 0,
one missing at the tick would drop out; "PromQL info:" annotations are no such warning) —
and so do refused credentials (401/403, said as such; after a redirect to another host, which
requests sends no credentials to, said so, naming it), a certificate no trusted CA signed, and a
secret that cannot be read. Authentication (bearer token, basic auth, Azure Monitor managed
Prometheus' Entra ID token) and TLS (`ca_file`, `insecure_skip_verify`, `cert_file`/`key_file` for
mutual TLS) come from the spec through rollout.metrics.prometheus_auth, which also keeps secrets
out of every message this module makes.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import itertools
import json
import logging
import math
import re
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool

from rollout.config import (
    ColourNames,
    LatencyCheck,
    PrometheusMetricsConfig,
    PromQueries,
    slo_bound_problem,
)
from rollout.core.types import Colour, ColourCounts, Observation
from rollout.errors import MetricsError, ProviderUnavailable
from rollout.routers.base import TrafficRouter

if TYPE_CHECKING:
    from rollout.metrics.prometheus_auth import AzureBearerAuth, BasicAuth, BearerAuth

log = logging.getLogger(__name__)

#: How far back before a step's start a series' last sample says it existed (Prometheus'
#: default lookback).
LOOKBACK_S = 300
#: How long after a step's start its first sample (the baseline) is searched for first: longer
#: than any sane scrape interval. A series not scraped in that time is searched for over the step.
BASELINE_SEARCH_S = 60

#: The most times a custom query's subquery evaluates it: over a longer window it is evaluated
#: every few seconds, not each one. Each tick holds every series over the whole step: at one
#: point a second, a 3 h step cost 36× the samples of a 5-minute one (3 M for 300 series,
#: past `--query.max-samples` on a large Prometheus, and a failed tick); 300 keeps every tick's
#: cost that of a 5-minute window, and a pod gone mid-step loses at most step/300 s of its last
#: traffic (36 s of a 3 h step).
MAX_POINTS = 300

#: The most restarted series whose raw samples are asked for one by one (`_raw`).
MAX_EXACT_SERIES = 20

#: A preset's newest requests sample older than this at a tick (2.5 of Prometheus' default 1 min
#: scrape interval) says Prometheus stores no new samples of the data plane — its disk full, or
#: its scrape of it failing — while the counts it still answers stay where they were: a step
#: would wait with nothing said. It is warned about (the counts are still the last known ones,
#: and a managed Prometheus' ingestion lag must not fail a step).
STALE_SAMPLE_S = 150.0

Series = tuple[tuple[str, str], ...]
#: A scrape target, as its series name it: their `job` and `instance` labels.
Target = tuple[str, str]


@dataclass(frozen=True, slots=True)
class History:
    """What Prometheus holds from the LOOKBACK_S before a step, target by target: whether a
    series absent there is new in the step (counts from 0) or merely unseen (from its first
    sample; `_baseline`).

    A target held a successful scrape there (`up` 1, or a sample of a series of it): a series
    of it absent there is new. So is one of a target Prometheus had no `up` of at all while it
    scraped others (a pod created in the step: what it served before its first scrape is the
    step's). One whose scrapes all failed (`up` 0: Envoy ran on, its scrape timed out or was
    refused), or any target when Prometheus scraped nothing (storage lost, Prometheus down),
    says nothing: every series of it would count its whole lifetime. Its series count from
    their first sample, or from 0 if that came after the target's first in the step (`starts`).
    """

    #: Targets whose every scrape in the LOOKBACK_S before `since` failed (`up` 0).
    failed: frozenset[Target]
    #: Targets whose scrapes were looked at (in `failed` or not).
    asked: frozenset[Target]
    #: Whether Prometheus scraped any target successfully then.
    any_scraped: bool
    #: Per target, the time of the first sample in the step of any of its requests series.
    starts: dict[Target, float]
    #: Whether Prometheus was asked if it scraped any target then (`any_scraped` is its
    #: answer, asked once for the step: the requests, errors and buckets readings share it).
    asked_any: bool = False

    def holds(self, series: Series) -> bool:
        """Whether a series absent before the step is thereby new in it."""
        return self.any_scraped and _target(series) not in self.failed


@dataclass(frozen=True, slots=True)
class SeriesSet:
    """Counter series of both colours: a metric selector and the label naming the colour."""

    metric: str
    matchers: tuple[str, ...]
    colour_label: str

    def selector(self, values: Iterable[str]) -> str:
        """PromQL selector for every colour at once (`label=~"blue|green"`)."""
        # re.escape for the regex, then PromQL's string literal (re.escape leaves `"` alone).
        alternatives = "|".join(_promql_string(re.escape(v)) for v in values)
        matchers = [*self.matchers, f'{self.colour_label}=~"{alternatives}"']
        return f"{self.metric}{{{','.join(matchers)}}}"


@dataclass(frozen=True, slots=True)
class Preset:
    """Which series carry requests, 5xx errors and the latency histogram."""

    requests: SeriesSet
    errors: SeriesSet
    latency_bucket: SeriesSet | None
    latency_unit_s: float


def _equal(match_labels: dict[str, str] | None) -> tuple[str, ...]:
    """`label="value"` matchers (the spec's `match_labels`, names validated there)."""
    return tuple(f'{k}="{_promql_string(v)}"' for k, v in (match_labels or {}).items())


def envoy_preset(match_labels: dict[str, str] | None = None) -> Preset:
    """Envoy's per-cluster upstream stats (histogram in milliseconds)."""
    label = "envoy_cluster_name"
    base = _equal(match_labels)
    return Preset(
        requests=SeriesSet("envoy_cluster_upstream_rq_completed", base, label),
        errors=SeriesSet(
            "envoy_cluster_upstream_rq_xx", (*base, 'envoy_response_code_class="5"'), label
        ),
        latency_bucket=SeriesSet("envoy_cluster_upstream_rq_time_bucket", base, label),
        latency_unit_s=0.001,
    )


def istio_preset(
    namespace: str | None = None, match_labels: dict[str, str] | None = None
) -> Preset:
    """Istio's standard telemetry of the weighted Services, as reported by the calling proxy."""
    label = "destination_service_name"
    base: tuple[str, ...] = ('reporter="source"', *_equal(match_labels))
    if namespace:
        base = (*base, f'destination_service_namespace="{_promql_string(namespace)}"')
    return Preset(
        requests=SeriesSet("istio_requests_total", base, label),
        errors=SeriesSet("istio_requests_total", (*base, 'response_code=~"5.."'), label),
        latency_bucket=SeriesSet("istio_request_duration_milliseconds_bucket", base, label),
        latency_unit_s=0.001,
    )


class PrometheusMetrics:
    """MetricsProvider reading per-colour counters from the Prometheus HTTP API."""

    def __init__(
        self,
        url: str,
        *,
        preset: Preset | None = None,
        queries: PromQueries | None = None,
        labels: ColourNames | None = None,
        latency_unit_s: float = 0.001,
        slo_ms: float | None = None,
        compare_bounds: bool = True,
        timeout_s: float = 5.0,
        auth: BearerAuth | BasicAuth | AzureBearerAuth | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
    ) -> None:
        if (preset is None) == (queries is None):
            raise MetricsError("PrometheusMetrics needs exactly one of a preset or custom queries")
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        self.url = url.rstrip("/")
        self.preset = preset
        self.queries = queries
        self.labels = labels or ColourNames()
        self.latency_unit_s = latency_unit_s
        self.slo_ms = slo_ms
        #: Whether the judge compares the colours above a bound of green's (`_bounds_problem`).
        self.compare_bounds = compare_bounds
        self.timeout_s = timeout_s
        self.auth = auth
        # Our own session for `verify` and `cert`: PrometheusConnect's only TLS switch is
        # disable_ssl, and it passes `session.verify` (True, False or a CA file) and
        # `session.cert` (a client certificate for mutual TLS) with every request.
        session = requests.Session()
        session.verify = verify
        session.cert = cert
        # prometheus-api-client hands back `data.result` alone: the warnings are read here.
        session.hooks["response"].append(_refuse_partial_answer)
        # ... and `data.resultType`, when a result is no list of series, from the answer kept.
        self._answer: Any = None
        session.hooks["response"].append(self._keep_answer)
        # ... and its redirect rules (`should_strip_auth`, untyped), for a 401 after a redirect.
        self._session: Any = session
        self._client_cert = cert is not None
        self._stale_warned = False  # one warning per stretch of stale samples
        # No retries: the controller asks again next tick, and "down" must show quickly.
        self._client = PrometheusConnect(
            url=self.url,
            retry=Retry(total=0),
            timeout=timeout_s,
            auth=auth,
            session=session,
        )
        # In place of PrometheusConnect's adapter for the url: the same no-retry policy, each
        # query given `timeout_s` in all (`WholeQueryDeadline`).
        transport = requests.adapters.HTTPAdapter(max_retries=Retry(total=0))
        if cert is not None:
            from rollout.metrics.prometheus_auth import NoPassphraseAdapter, refuse_passphrase

            # ... and a client key that is (or becomes) encrypted is an error, never a prompt.
            transport = NoPassphraseAdapter(refuse_passphrase(cert), max_retries=Retry(total=0))
        session.mount(self.url, WholeQueryDeadline(transport, timeout_s))

    @classmethod
    def from_config(
        cls,
        cfg: PrometheusMetricsConfig,
        router: TrafficRouter | None = None,
        *,
        latency: LatencyCheck | None = None,
    ) -> PrometheusMetrics:
        """Build from the spec's metrics section (the router is not needed) and the analysis'
        latency check (None: the default one), which says the SLO measured against
        (`measured_slo_ms`, refused when no bound) and whether the colours' histograms are
        compared on a bound of green's (`uses_baseline_p99`: `_bounds_problem`).

        Secrets and the CA file are read here: one missing is a ConfigError naming its field.
        """
        from rollout.metrics.prometheus_auth import http_auth, tls_client_cert, tls_verify

        latency = latency or LatencyCheck()
        connection: dict[str, Any] = {
            "labels": cfg.labels,
            "timeout_s": cfg.timeout_s,
            "verify": tls_verify(cfg),
            "cert": tls_client_cert(cfg),
            "auth": http_auth(cfg),
            "slo_ms": latency.measured_slo_ms,
            "compare_bounds": latency.uses_baseline_p99,
        }
        if cfg.preset == "custom":
            unit = 0.001 if cfg.latency_unit == "ms" else 1.0
            return cls(cfg.url, queries=cfg.queries, latency_unit_s=unit, **connection)
        preset = (
            envoy_preset(cfg.match_labels)
            if cfg.preset == "envoy"
            else istio_preset(cfg.namespace, cfg.match_labels)
        )
        return cls(cfg.url, preset=preset, **connection)

    # ----------------------------------------------------------------- MetricsProvider protocol

    def observe(self, since: float, now: float) -> Observation:
        """Per-colour counts between `since` and `now`; never raises for a Prometheus problem."""
        try:
            if self.preset is not None:
                counts, detail = self._observe_preset(self.preset, since, now)
            else:
                assert self.queries is not None
                counts, detail = self._observe_custom(self.queries, since, now)
        except MetricsError as exc:
            return Observation(since=since, at=now, error=str(exc))
        for colour_counts in counts.values():
            bounds_ms = [bound * 1000.0 for bound, _ in colour_counts.latency_buckets]
            if problem := self._slo_problem(bounds_ms):
                return Observation(since=since, at=now, error=problem, detail=detail)
        if self.compare_bounds and (
            problem := self._bounds_problem(counts[Colour.BLUE], counts[Colour.GREEN])
        ):
            return Observation(since=since, at=now, error=problem, detail=detail)
        return Observation(
            since=since,
            at=now,
            blue=counts[Colour.BLUE],
            green=counts[Colour.GREEN],
            detail=detail,
        )

    def history(self, since: float, now: float) -> Observation:
        """Counts before the rollout: the same exact counter deltas, further back in time."""
        return self.observe(since, now)

    def probe(self) -> None:
        """Ask `vector(1)`, with the spec's credentials, TLS and timeout: a Prometheus query API
        answers one sample of 1; a MetricsError says what came instead. Then each custom query,
        once (one Prometheus cannot parse, or that gives no instant vector, is refused before
        anything is deployed), and the latency histogram's bounds, when it has series now: an
        SLO that is none of them is refused (`_slo_problem`)."""
        result = self._query("vector(1)", None)
        values = [item.get("value") for item in result]
        if not (len(values) == 1 and isinstance(values[0], list) and values[0][1:] == ["1"]):
            raise MetricsError(self._not_the_api("vector(1)", "not one sample of 1"))
        latency: list[dict[Series, int]] = []
        now = time.time()
        if self.queries is not None:
            templates = [self.queries.requests, self.queries.errors, self.queries.latency_bucket]
            for template in templates:
                for colour in Colour:
                    if template is not None:
                        found = self._vector(_render(template, self.labels.of(colour)), now)
                        if template is self.queries.latency_bucket:
                            latency.append(found)
        elif self.slo_ms is not None and self.preset and self.preset.latency_bucket:
            selector = self.preset.latency_bucket.selector([self.labels.blue, self.labels.green])
            latency.append(self._vector(f"last_over_time({selector}[{LOOKBACK_S}s])", now))
        for vector in latency:
            bounds_ms = [bound * 1000.0 for bound in _by_le(vector, self.latency_unit_s)]
            if problem := self._slo_problem(bounds_ms):
                raise MetricsError(problem)

    def _slo_problem(self, bounds_ms: list[float]) -> str:
        """Why the analysis' latency SLO cannot be measured on a histogram of these bounds ("":
        it can, or there is no SLO): between two bounds, every check and message would count
        the requests above the next one up while naming the SLO; above all of them, none."""
        if self.slo_ms is None:
            return ""
        unit = ""
        if self.queries is not None:
            unit = (
                f" (metrics.latency_unit is {'ms' if self.latency_unit_s < 1 else 's'}: is it "
                "the unit of the histogram's `le`? `s` for a `_seconds` histogram)"
            )
        problem = slo_bound_problem(self.slo_ms, bounds_ms, unit)
        return f"Prometheus at {self.url}: analysis.latency.slo_ms: {problem}" if problem else ""

    def _bounds_problem(self, blue: ColourCounts, green: ColourCounts) -> str:
        """Why the colours' latency cannot be compared ("": it can): the judge counts both
        colours' slow requests above one bound of green's histogram (its p99 bucket), and a
        blue histogram without it counted blue's above its next bound up, so requests slower
        than the threshold read as not slow (a canary twice as slow as green was promoted)."""
        blue_ms, green_ms = (
            {bound * 1000.0 for bound, _ in counts.latency_buckets if math.isfinite(bound)}
            for counts in (blue, green)
        )
        missing = green_ms - blue_ms
        if not blue_ms or not missing:
            return ""

        def listed(bounds: set[float]) -> str:
            return ", ".join(f"{bound:g}" for bound in sorted(bounds))

        return (
            f"Prometheus at {self.url}: blue's latency histogram has no bound at "
            f"{listed(missing)} ms, which green's has (blue: {listed(blue_ms)} ms; green: "
            f"{listed(green_ms)} ms): blue's requests slower than such a bound would count only "
            "above its next one up, so the colours' latency cannot be compared; give both "
            "colours' histograms the same buckets"
        )

    def close(self) -> None:
        """Close the HTTP session (and an Azure credential's)."""
        self._client.close()
        close = getattr(self.auth, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return f"PrometheusMetrics({self.url!r}, auth={self.auth!r})"

    # ---------------------------------------------------------------------------- the presets

    def _observe_preset(
        self, preset: Preset, since: float, now: float
    ) -> tuple[dict[Colour, ColourCounts], dict[str, Any]]:
        values = [self.labels.blue, self.labels.green]
        requests, history = self._deltas(preset.requests, values, since, now)
        # The requests series say which targets Prometheus holds from before the step (and,
        # for the others, when it first scraped each): that decides for every series.
        errors, _ = self._deltas(preset.errors, values, since, now, given=history)
        buckets = (
            self._deltas(preset.latency_bucket, values, since, now, given=history)[0]
            if preset.latency_bucket is not None
            else {}
        )
        counts: dict[Colour, ColourCounts] = {}
        detail: dict[str, Any] = {
            "source": self.url,
            "queries": {
                "requests": preset.requests.selector(values),
                "errors": preset.errors.selector(values),
                "latency_bucket": preset.latency_bucket.selector(values)
                if preset.latency_bucket
                else None,
            },
        }
        detail["newest_sample_age_s"] = self._newest_sample_age(preset.requests, values, now)
        for colour in Colour:
            value = self.labels.of(colour)
            n = _total(requests, preset.requests.colour_label, value)
            e = _total(errors, preset.errors.colour_label, value)
            histogram = (
                _histogram(
                    buckets, preset.latency_bucket.colour_label, value, preset.latency_unit_s
                )
                if preset.latency_bucket is not None
                else {}
            )
            detail[colour.value] = {
                "requests": n,
                "errors": e,
                "histogram_requests": histogram.get(math.inf, 0),
            }
            counts[colour] = _counts(n, e, histogram, detail[colour.value])
        return counts, detail

    def _newest_sample_age(
        self, series_set: SeriesSet, values: list[str], now: float
    ) -> float | None:
        """Seconds from the newest sample of the colours' requests series to `now` (None: none
        in the lookback, or the question failed: only a hint, the counts are read and decide),
        warned about once per stretch when above STALE_SAMPLE_S."""
        try:
            result = self._query(f"max(timestamp({series_set.selector(values)}))", now)
        except MetricsError:
            return None
        newest = _number(result[0].get("value", [None, "NaN"])[1]) if result else None
        if newest is None:
            return None
        age = round(max(0.0, now - newest), 3)
        if age <= STALE_SAMPLE_S:
            self._stale_warned = False
        elif not self._stale_warned:
            self._stale_warned = True
            log.warning(
                "Prometheus at %s: the newest sample of %s is %.0f s old: Prometheus stores no "
                "new samples of the data plane (is its disk full? see its log) or no longer "
                "scrapes it; the counts stay at their last values, so the step can neither "
                "advance nor roll back",
                self.url,
                series_set.metric,
                age,
            )
        return age

    def _deltas(
        self,
        series_set: SeriesSet,
        values: list[str],
        since: float,
        now: float,
        *,
        given: History | None = None,
    ) -> tuple[dict[Series, int], History]:
        """Exact counter increase per series from the step's first sample to `now`, and the
        History (below) as these series give it.

        The baseline of a series is its first sample at or after `since`, so traffic from before
        the step — the tail of the previous step, or of the previous rollout's canary — never
        counts; what the step loses is the traffic between `since` and that first scrape. The
        first BASELINE_SEARCH_S are searched; a series with no sample there (Prometheus or its
        target was down when the step began) is looked for over the whole step. A series with
        no sample in the LOOKBACK_S before `since` appeared during the step and counts from 0;
        one merely marked stale at `since` (by a failed scrape) did not.

        That holds for a series whose target Prometheus scraped successfully in that time, or
        had no `up` of while it scraped others (a new target; History: as `given` by the
        requests' series set, more targets asked for as needed). For a target whose scrapes all
        failed then, or any when Prometheus scraped nothing (its storage lost, or down for all
        of LOOKBACK_S), counting every series from 0 charged the step with the
        counters' whole history: a series of it first seen after the target's first sample in
        the step appeared during the step and counts from 0, any other from its first sample.
        """
        selector = series_set.selector(values)
        # Range selectors are open on the left: one extra millisecond takes in a sample that
        # lies exactly on `since`.
        span_ms = max(round((now - since) * 1000), 1)
        whole_step = f"{selector}[{span_ms + 1}ms]"
        # The last sample in the step, not `selector` at `now`: a series marked stale by a
        # failed scrape would drop out, the step's counts would fall, and the judge would count
        # them all again when the next scrape brings the series back.
        at_now = self._vector(f"last_over_time({whole_step})", now)
        # Not `selector` at `since`: a failed scrape marks every series of its target stale,
        # and a series stale at `since` would look new and count its whole history.
        existed = self._vector(f"last_over_time({selector}[{LOOKBACK_S}s])", since)
        search_ms = min(span_ms, BASELINE_SEARCH_S * 1000)
        first: dict[Series, tuple[float, int]] = {
            series: samples[0]
            for series, samples in self._matrix(
                f"{selector}[{search_ms + 1}ms]", since + search_ms / 1000
            ).items()
            if samples
        }
        restarted = {
            series
            for series, n in self._vector(f"resets({selector}[{span_ms + 1}ms])", now).items()
            if n > 0
        }
        raw = self._raw(series_set, restarted, span_ms, now)
        history = self._history(since, existed, [s for s in at_now if s not in existed], given)
        unscraped = [s for s in at_now if (s in existed or not history.holds(s)) and s not in first]
        if unscraped and search_ms < span_ms:
            raw.update(self._raw(series_set, [s for s in unscraped if s not in raw], span_ms, now))
            first.update((s, raw[s][0]) for s in unscraped if raw.get(s))
        if given is None:
            history = replace(history, starts=_starts(first.items()))
        deltas: dict[Series, int] = {}
        for series, value in at_now.items():
            baseline = _baseline(series, since, first, history, existed=series in existed)
            if baseline is None:
                deltas[series] = 0  # not scraped since the step began
                continue
            base_t, base = baseline
            if series in restarted:
                later = [v for t, v in raw.get(series, []) if t > base_t]
                deltas[series] = _increase(base, later)
            else:
                deltas[series] = max(value - base, 0)
        return deltas, history

    def _raw(
        self, series_set: SeriesSet, wanted: Iterable[Series], span_ms: int, now: float
    ) -> dict[Series, list[tuple[float, int]]]:
        """The raw samples of the step of the `wanted` series: each asked for by all its labels,
        so one restarted series does not fetch every series' samples on every later tick of the
        step (1,200 bucket series over a long step took seconds, near `timeout_s`); more than
        MAX_EXACT_SERIES at once (a whole deployment restarted) come in one query."""
        wanted = list(wanted)
        if not wanted:
            return {}
        if len(wanted) > MAX_EXACT_SERIES:
            values = [self.labels.blue, self.labels.green]
            return self._matrix(f"{series_set.selector(values)}[{span_ms + 1}ms]", now)
        raw: dict[Series, list[tuple[float, int]]] = {}
        for series in wanted:
            exact = ",".join(f'{k}="{_promql_string(v)}"' for k, v in series)
            found = self._matrix(f"{series_set.metric}{{{exact}}}[{span_ms + 1}ms]", now)
            if series in found:  # (a selector also matches series with more labels)
                raw[series] = found[series]
        return raw

    # ------------------------------------------------------------------------------ custom PromQL

    def _observe_custom(
        self, queries: PromQueries, since: float, now: float
    ) -> tuple[dict[Colour, ColourCounts], dict[str, Any]]:
        templates = {"requests": queries.requests, "errors": queries.errors}
        if queries.latency_bucket is not None:
            templates["latency_bucket"] = queries.latency_bucket
        exprs = {
            (colour, name): _render(template, self.labels.of(colour))
            for colour in Colour
            for name, template in templates.items()
        }
        before = {key: self._held(expr, since, LOOKBACK_S) for key, expr in exprs.items()}
        # Held over the whole step: a pod gone since still counts what it served in it.
        after = {key: self._held(expr, now, now - since) for key, expr in exprs.items()}
        # As for the presets (History): a series absent at `since` is new in the step only if
        # Prometheus scraped its target successfully in the LOOKBACK_S before; the others count
        # from their first value in the step (from 0 only if it came after their target's).
        history = self._history(
            since,
            (s for key in exprs for s in before[key]),
            (s for key in exprs for s in after[key] if s not in before[key]),
        )
        first: dict[tuple[Colour, str], dict[Series, tuple[float, int]]] = {}
        if any(not history.holds(s) for key in exprs for s in after[key] if s not in before[key]):
            first = {key: self._first(expr, since, now, after[key]) for key, expr in exprs.items()}
            requests = [(colour, "requests") for colour in Colour]
            starts = _starts(item for key in requests for item in first[key].items())
            history = replace(history, starts=starts)

        span_ms = max(round((now - since) * 1000), 1)

        def delta(key: tuple[Colour, str]) -> dict[Series, int]:
            found = first.get(key, {})
            bases: dict[Series, tuple[float, int]] = {}
            for series, value in after[key].items():
                if series in before[key]:
                    bases[series] = since, before[key][series]
                else:
                    baseline = _baseline(series, since, found, history, existed=False)
                    bases[series] = (now, value) if baseline is None else baseline
            # As the presets do: a series that restarted in the step is summed piece by piece
            # over its values in the step (a drop is a restart from 0); comparing `since` with
            # `now` lost what it served before the restart.
            step = _subquery(exprs[key], span_ms)
            restarted = {s for s, n in self._vector(f"resets({step})", now).items() if n > 0}
            # A restart between `since` and the subquery's first point is no drop between its
            # points, and its value may have grown back past the base by `now`: a counter that
            # went below its base restarted.
            lowest = self._vector(f"min_over_time({step})", now)
            restarted |= {
                s for s, v in after[key].items() if min(v, lowest.get(s, v)) < bases[s][1]
            }
            points = self._matrix(step, now) if restarted else {}
            deltas: dict[Series, int] = {}
            for series, value in after[key].items():
                base_t, base = bases[series]
                if series in restarted:
                    later = [v for t, v in points.get(series, []) if t > base_t]
                    deltas[series] = _increase(base, [*later, value])
                else:
                    deltas[series] = value - base
            return deltas

        counts: dict[Colour, ColourCounts] = {}
        detail: dict[str, Any] = {"source": self.url, "queries": {}}
        for colour in Colour:
            n = sum(delta((colour, "requests")).values())
            e = sum(delta((colour, "errors")).values())
            histogram: dict[float, int] = {}
            if queries.latency_bucket is not None:
                histogram = _by_le(delta((colour, "latency_bucket")), self.latency_unit_s)
            detail["queries"][colour.value] = [exprs[colour, "requests"], exprs[colour, "errors"]]
            detail[colour.value] = {"requests": n, "errors": e}
            counts[colour] = _counts(n, e, histogram, detail[colour.value])
        return counts, detail

    def _first(
        self, expr: str, since: float, now: float, wanted: Iterable[Series]
    ) -> dict[Series, tuple[float, int]]:
        """The first value in the step of each of `expr`'s series, and when, as `_subquery`
        evaluates it: searched in the first BASELINE_SEARCH_S, then, for a series of `wanted`
        not found there, over the whole step."""
        span_ms = max(round((now - since) * 1000), 1)
        search_ms = min(span_ms, BASELINE_SEARCH_S * 1000)
        found = {
            series: samples[0]
            for series, samples in self._matrix(
                _subquery(expr, search_ms), since + search_ms / 1000
            ).items()
            if samples
        }
        missing = [series for series in wanted if series not in found]
        if missing and search_ms < span_ms:
            whole_step = self._matrix(_subquery(expr, span_ms), now)
            found.update((s, whole_step[s][0]) for s in missing if whole_step.get(s))
        return found

    def _history(
        self,
        since: float,
        existed: Iterable[Series],
        absent: Iterable[Series],
        given: History | None = None,
    ) -> History:
        """The History of the targets of these series (`given`'s, and more): a series with a
        sample in the LOOKBACK_S before `since` says its target was scraped then; for the
        targets of `absent` series no such series speaks for, Prometheus' own `up` series is
        asked (`_up`). Counters born with their first request (prometheus_client's labelled
        children, Istio's) have no series before a quiet step, yet their target's `up` 1 says
        Prometheus holds its history, and a series absent then is new; no `up` of the target
        at all, while Prometheus scraped others, says the target is new."""
        existed, absent = list(existed), list(absent)
        known = {t for s in existed if (t := _target(s)) is not None}
        asked = set(given.asked if given else ()) | known
        unknown = {t for s in absent if (t := _target(s)) is not None and t not in asked}
        up = self._up(since, unknown) if unknown else {}
        failed = set(given.failed if given else ()) | {t for t, value in up.items() if value < 1}
        any_scraped = (
            bool(given and given.any_scraped)
            or bool(existed)
            or any(value >= 1 for value in up.values())
        )
        asked_any = bool(given and given.asked_any)
        if not any_scraped and not asked_any and any(_target(s) not in failed for s in absent):
            any_scraped = bool(self._vector(f"count(max_over_time(up[{LOOKBACK_S}s]) == 1)", since))
            asked_any = True
        starts = given.starts if given else {}
        return History(
            frozenset(failed), frozenset(asked | unknown), any_scraped, starts, asked_any
        )

    def _up(self, since: float, targets: set[Target]) -> dict[Target, int]:
        """The highest `up` in the LOOKBACK_S before `since` of each of `targets` Prometheus
        scraped or tried to then: 1 when a scrape succeeded, 0 when all failed (a failed scrape
        writes `up` 0, and marks the target's series stale). A target absent from the answer
        did not exist then (or Prometheus scraped nothing)."""
        jobs = "|".join(sorted({_promql_string(re.escape(job)) for job, _ in targets}))
        instances = "|".join(sorted({_promql_string(re.escape(i)) for _, i in targets}))
        up = f'up{{job=~"{jobs}",instance=~"{instances}"}}'
        found = self._vector(f"max_over_time({up}[{LOOKBACK_S}s])", since)
        highest: dict[Target, int] = {}
        for series, value in found.items():
            if (target := _target(series)) in targets:
                highest[target] = max(value, highest.get(target, value))
        return highest

    def _held(self, expr: str, at: float, lookback_s: float) -> dict[Series, int]:
        """`expr`'s series at `at`; one that a failed scrape marked stale there (or one whose
        target was not scraped since) keeps its last value of the `lookback_s` before, as
        `_subquery` evaluates it."""
        exact = self._vector(expr, at)  # first: an error names the query as written
        lookback_ms = max(round(lookback_s * 1000), 1000)
        held = self._vector(f"last_over_time({_subquery(expr, lookback_ms)})", at)
        return {**held, **exact}

    # ---------------------------------------------------------------------------------- HTTP API

    def _query(self, query: str, at: float | None) -> list[dict[str, Any]]:
        from prometheus_api_client.exceptions import PrometheusApiClientException

        params = {"time": f"{at:.3f}"} if at is not None else None
        try:
            result: list[dict[str, Any]] = self._client.custom_query(query, params=params)
        except requests.exceptions.SSLError as exc:
            problem = _tls_problem(exc, client_cert=self._client_cert)
            raise ProviderUnavailable(f"Prometheus at {self.url}: {problem}") from exc
        except _PartialAnswer as exc:
            raise MetricsError(
                self._redact(
                    f"Prometheus at {self.url} answered only in part ({exc}): counts read from "
                    "it would be wrong"
                )
            ) from exc
        except requests.exceptions.JSONDecodeError as exc:
            # A 200 that is not JSON (a login page, another service on the port): requests
            # raises it as a RequestException, which read as "unreachable: JSONDecodeError".
            raise MetricsError(self._not_the_api(query, "not JSON")) from exc
        except requests.RequestException as exc:
            if _timed_out(exc):
                # A hung Prometheus (overloaded, stopped) accepts the connection and never
                # answers: "unreachable: ConnectionError" sent the operator to a port that is open.
                raise ProviderUnavailable(
                    f"Prometheus at {self.url} did not answer within {self.timeout_s:g} s "
                    "(metrics.timeout_s)"
                ) from exc
            raise ProviderUnavailable(
                f"Prometheus at {self.url} is unreachable: {_connection_problem(exc)}"
            ) from exc
        except PrometheusApiClientException as exc:
            raise MetricsError(self._redact(self._http_problem(query, str(exc)))) from exc
        except MetricsError as exc:  # a secret that cannot be read now, no Entra ID token
            raise MetricsError(f"Prometheus at {self.url}: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            # JSON without `data.result`: something else listens there.
            raise MetricsError(self._not_the_api(query, "no data.result")) from exc
        if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
            kind = self._result_type()
            if kind in ("scalar", "string"):
                raise MetricsError(self._no_instant_vector(query, f"a {kind}"))
            raise MetricsError(self._not_the_api(query, "data.result is no list of series"))
        if not all(_a_series(item) for item in result):
            # (read unchecked, one raised IndexError or AttributeError out of observe())
            raise MetricsError(self._not_the_api(query, "a series of another shape"))
        return result

    def _keep_answer(self, response: Any, **kwargs: Any) -> Any:
        """requests response hook: keep the answer, for its `data.resultType`."""
        self._answer = response
        return response

    def _result_type(self) -> str | None:
        """The last answer's `data.resultType` (None: it has none)."""
        try:
            kind = self._answer.json()["data"]["resultType"]
        except (AttributeError, ValueError, KeyError, TypeError):
            return None
        return kind if isinstance(kind, str) else None

    def _no_instant_vector(self, query: str, kind: str) -> str:
        """The line for an answer of another type than the instant vector asked for: a custom
        query's doing (`scalar(...)`, a range selector); a preset's queries never give one."""
        if self.queries is None:
            return self._not_the_api(query, f"{kind}, not an instant vector")
        return (
            f"Prometheus at {self.url}: the query {query!r} returns {kind}, not an instant "
            "vector: metrics.queries must each give cumulative counter series (a selector, or an "
            "expression keeping one series per pod)"
        )

    def _http_problem(self, query: str, error: str) -> str:
        """The line for an answer other than 200 (prometheus-api-client's exception text is
        `HTTP Status Code 404 (b'<body>')`): the status, and the error Prometheus gives, if any."""
        found = re.match(r"HTTP Status Code (\d+) \((.*)\)$", error, re.DOTALL)
        if found is None:
            return f"Prometheus at {self.url} rejected {query!r}: {error}"
        status, body = int(found.group(1)), _body_text(found.group(2))
        if status in (401, 403):
            from rollout.metrics.prometheus_auth import AzureBearerAuth

            if self.auth is not None and (elsewhere := self._redirected_without_credentials()):
                return (
                    f"Prometheus at {self.url} redirected the request to {elsewhere}, which "
                    f"refused it (HTTP {status}): credentials are not sent on to another host; "
                    f"set metrics.url to {elsewhere}"
                )
            sent = f"with {self.auth!r}" if self.auth is not None else "without credentials"
            refused = f"Prometheus at {self.url} refused the request {sent} (HTTP {status})"
            if status == 403 and isinstance(self.auth, AzureBearerAuth):
                # A valid token of an identity with no data role on the workspace.
                refused += (
                    ": the identity needs the Monitoring Data Reader role on the Azure Monitor "
                    "workspace (a new role assignment takes minutes to apply)"
                )
            return refused
        said = f" ({body})" if body else ""
        if status == 404:
            # A path under the server's root, a typo'd one, or a server that is not Prometheus.
            return (
                f"Prometheus at {self.url} answered HTTP 404{said}: no Prometheus query API at "
                f"{self.url}/api/v1/query (metrics.url names the server's root)"
            )
        return f"Prometheus at {self.url} answered HTTP {status} to {query!r}{said}"

    def _redirected_without_credentials(self) -> str:
        """Where the last answer came from when a redirect on the way dropped the credentials
        (requests sends no `Authorization` on to another host, port or scheme: its
        `should_strip_auth`), as the root of its URL; "" when none did."""
        answer = self._answer
        history = getattr(answer, "history", None)
        if not history:
            return ""
        urls = [hop.url for hop in history] + [answer.url]
        if not any(self._session.should_strip_auth(a, b) for a, b in itertools.pairwise(urls)):
            return ""
        return str(answer.url).split("/api/v1/", 1)[0]

    def _not_the_api(self, query: str, why: str) -> str:
        return f"Prometheus at {self.url}: not a Prometheus API answer to {query!r} ({why})"

    def _redact(self, text: str) -> str:
        return self.auth.redact(text) if self.auth is not None else text

    def _vector(self, query: str, at: float) -> dict[Series, int]:
        """An instant vector as {series labels: integer value}; NaN and ±Inf are dropped."""
        found: dict[Series, int] = {}
        result = self._query(query, at)
        # (an empty result says its type only in the answer: a range with no sample in it)
        if any("values" in item and "value" not in item for item in result) or (
            not result and self._result_type() == "matrix"
        ):
            raise MetricsError(self._no_instant_vector(query, "a range vector"))
        for item in result:
            value = _number(item.get("value", [None, "NaN"])[1])
            if value is not None:
                found[_labels(item.get("metric", {}))] = round(value)
        return found

    def _matrix(self, query: str, at: float) -> dict[Series, list[tuple[float, int]]]:
        """A range vector as {series labels: (time, integer value) samples in time order}."""
        found: dict[Series, list[tuple[float, int]]] = {}
        for item in self._query(query, at):
            samples = [(float(t), _number(v)) for t, v in item.get("values", [])]
            found[_labels(item.get("metric", {}))] = [
                (t, round(v)) for t, v in samples if v is not None
            ]
        return found


# ---------------------------------------------------------------------------------------- helpers


class WholeQueryDeadline(requests.adapters.BaseAdapter):
    """A requests transport adapter giving each request `deadline_s` in all, its answer read.

    requests' timeout bounds each read of the socket, not the answer: a Prometheus (or a proxy
    before it) dripping its answer, each byte within the timeout, held the tick for as long as it
    dripped — the rollback that tick might decide with it. Its status line, headers, a chunk's
    size line or a gzip header as much as its body: these are read a socket read at a time, deep
    in http.client and urllib3, where no deadline reaches. So a timer (`_Cutoff`) shuts the
    connection's socket down at the deadline instead, wherever the query is then: the read
    blocked in it ends, and the query raises ReadTimeout (the query's "did not answer within").

    Connecting (the name lookup, TCP's and TLS' handshakes) keeps requests' per-step timeout, and
    a connection made after the deadline is cut at once (`_Watched`). With `stream` the deadline
    ends with the head, the body left to the caller.
    """

    def __init__(self, transport: requests.adapters.HTTPAdapter, deadline_s: float) -> None:
        super().__init__()
        self.transport = transport
        self.deadline_s = deadline_s

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        """`transport.send`, the answer's body read (unless `stream`), all by the deadline."""
        with _Cutoff(self.deadline_s) as cutoff:
            try:
                self._watch_pool(request, verify, cert, proxies)
                response = self.transport.send(
                    request, stream=True, timeout=timeout, verify=verify, cert=cert, proxies=proxies
                )
            except Exception as exc:
                if cutoff.passed:  # (what urllib3 made of the cut: a connection closed, ...)
                    raise self._late(request) from exc
                raise
            try:
                if not stream:
                    body = _read(response)
                    # What `Response.content` keeps once read: requests reads no further.
                    response._content = body
                    response._content_consumed = True  # type: ignore[attr-defined]
            except BaseException as exc:
                response.close()  # (the connection goes: half an answer is still on it)
                if cutoff.passed and isinstance(exc, Exception):
                    raise self._late(request) from exc
                raise
            if cutoff.passed:
                # Read to the end the cut made: a head cut short, or a body whose end only the
                # connection's close says. Not the answer.
                response.close()
                raise self._late(request)
        return response

    def close(self) -> None:
        """Close the transport's connections."""
        self.transport.close()

    def _late(self, request: requests.PreparedRequest) -> requests.exceptions.ReadTimeout:
        """The error of a query cut off at the deadline."""
        return requests.exceptions.ReadTimeout(
            f"no whole answer within {self.deadline_s:g} s", request=request
        )

    def _watch_pool(
        self, request: requests.PreparedRequest, verify: bool | str, cert: Any, proxies: Any
    ) -> None:
        """Make the pool `transport.send` takes this request's connection from (the one it gets
        the same way, made now if new: before its first connection) make `_Watched` ones."""
        from urllib3.exceptions import LocationValueError

        try:
            pool = self.transport.get_connection_with_tls_context(
                request, verify, proxies=proxies, cert=cert
            )
        except LocationValueError as exc:  # (as transport.send raises it)
            raise requests.exceptions.InvalidURL(exc, request=request) from exc
        if not isinstance(pool, urllib3.connectionpool.HTTPConnectionPool):
            return
        made = pool.ConnectionCls
        if issubclass(made, urllib3.connection.HTTPConnection) and not issubclass(made, _Watched):
            pool.ConnectionCls = _watched(made)


#: The name of the thread that cuts a query off at its deadline (one per query under way).
DEADLINE_THREAD = "prometheus-query-deadline"


class _Cutoff:
    """One query's deadline: a timer that shuts down the socket the query is on, so that whatever
    read is blocked in it ends (at EOF), however slowly its bytes drip.

    The connection the query goes out on hands its socket over (`_Watched`, through `_CUTOFF`)
    once connected, or as it is taken from the pool; one handed over after the deadline is shut
    down at once. The socket, not the connection: http.client lets go of the socket of an answer
    that ends with the connection's close, which only the answer then holds. `passed` says the
    deadline came. The timer starts on entry and is cancelled and joined on exit: no thread
    outlives its query, and none cuts a connection back in the pool. A connection cut never
    serves again: urllib3's pool finds it dropped (readable: at EOF) before it hands it out, and
    closes it.
    """

    def __init__(self, deadline_s: float) -> None:
        self.passed = False
        self._lock = threading.Lock()
        self._sock: Any = None
        self._timer = threading.Timer(deadline_s, self._expire)
        self._timer.name = DEADLINE_THREAD
        self._timer.daemon = True

    def __enter__(self) -> _Cutoff:
        self._token = _CUTOFF.set(self)
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._timer.join()
        _CUTOFF.reset(self._token)

    def watch(self, sock: Any) -> None:
        """Shut `sock` down at the deadline (now, if it has passed)."""
        with self._lock:
            self._sock = sock
            if self.passed:
                _shut_down(sock)

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            if self._sock is not None:
                _shut_down(self._sock)


#: The cutoff of the query this thread is sending (`WholeQueryDeadline.send`), for the
#: connection it goes out on.
_CUTOFF: contextvars.ContextVar[_Cutoff | None] = contextvars.ContextVar(
    "prometheus_query_cutoff", default=None
)


def _shut_down(sock: Any) -> None:
    """Shut a connection's socket down both ways: a read blocked in it returns at once."""
    # TLS through an HTTPS proxy is urllib3's SSLTransport, over the socket to the proxy.
    under = sock if hasattr(sock, "shutdown") else sock.socket
    with contextlib.suppress(OSError):  # closed meanwhile
        under.shutdown(socket.SHUT_RDWR)


class _Watched(urllib3.connection.HTTPConnection):
    """A urllib3 connection that hands its socket to the cutoff of the query it is taken for
    (`_watched` mixes it into the pool's own class).

    Connecting (the name lookup, TCP's and TLS' handshakes) keeps requests' per-step timeout:
    the socket is handed over once connected (until then ssl may still take over the one it
    wraps), and cut at once if the deadline passed meanwhile.
    """

    def connect(self) -> None:
        super().connect()
        self._hand_over()

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._hand_over()  # (one kept from an earlier query: a new one did as it connected)
        super().request(*args, **kwargs)

    def _hand_over(self) -> None:
        cutoff = _CUTOFF.get()
        if cutoff is not None and self.sock is not None:
            cutoff.watch(self.sock)


#: `_watched`'s classes, one per class of connection (pools come and go: classes would pile up).
_WATCHED: dict[type[urllib3.connection.HTTPConnection], type[_Watched]] = {}


def _watched(made: type[urllib3.connection.HTTPConnection]) -> type[_Watched]:
    """`made` (HTTPConnection, HTTPSConnection, a SOCKS one...) putting itself under cutoffs."""
    if made not in _WATCHED:  # (two threads may both make one: either serves)
        _WATCHED[made] = type(f"Watched{made.__name__}", (_Watched, made), {})
    return _WATCHED[made]


def _read(response: requests.Response) -> bytes:
    """The answer's body, decoded as `Response.content` is; the errors requests' own reading
    raises (bounded by the query's cutoff, not here)."""
    from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

    raw = response.raw
    pieces: list[bytes] = []
    try:
        while piece := raw.read1(64 * 1024, decode_content=True):
            pieces.append(piece)
    except ReadTimeoutError as exc:
        raise requests.exceptions.ReadTimeout(exc, request=response.request) from exc
    except ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except SSLError as exc:
        raise requests.exceptions.SSLError(exc, request=response.request) from exc
    return b"".join(pieces)


class _PartialAnswer(Exception):
    """A 200 whose `warnings` say the data may be partial (the first warning is the message)."""


def _refuse_partial_answer(response: Any, **kwargs: Any) -> Any:
    """requests response hook: raise _PartialAnswer for a query answer with warnings."""
    if response.status_code != 200 or b'"warnings"' not in response.content:
        return response
    try:
        body = response.json()
    except ValueError:
        return response  # not JSON: said by the caller
    warnings = body.get("warnings") if isinstance(body, dict) else None
    real = [
        " ".join(str(w).split()) for w in warnings or [] if not str(w).startswith("PromQL info:")
    ]
    if real:
        raise _PartialAnswer(real[0] if len(real[0]) <= 200 else real[0][:197] + "...")
    return response


def _timed_out(exc: BaseException) -> bool:
    """Whether a requests error was a timeout: with retries off, urllib3 wraps a read timeout in
    a MaxRetryError that requests raises as a plain ConnectionError."""
    from urllib3.exceptions import NewConnectionError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    if isinstance(exc, requests.Timeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    # A refused connection is a NewConnectionError, which urllib3 derives from its timeout.
    return isinstance(reason, Urllib3Timeout) and not isinstance(reason, NewConnectionError)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every error urllib3 and requests wrapped in it (in args, `reason`, causes)."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        pending.extend([*error.args, getattr(error, "reason", None), error.__cause__])


def _connection_problem(exc: BaseException) -> str:
    """Why no connection was made: "connection refused", "host name not found (...)", ... (the
    error's class name when the chain says nothing more)."""
    for error in _causes(exc):
        if isinstance(error, socket.gaierror):
            return f"host name not found ({error.strerror})"
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, OSError) and error.strerror:
            return error.strerror[:1].lower() + error.strerror[1:]
    return type(exc).__name__


def _body_text(raw: str) -> str:
    """The error an answer's body gives, short: Prometheus' JSON `error`, else the first line of
    a text body ("404 page not found"); "" for an HTML page or anything unreadable."""
    try:
        body = ast.literal_eval(raw)
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else ""
    except (ValueError, SyntaxError):
        return ""
    try:
        said = json.loads(text)
    except ValueError:
        said = None
    if isinstance(said, dict):
        text = str(said.get("error", ""))
    elif said is not None or text.lstrip().startswith("<"):
        return ""
    line = text.strip().split("\n", 1)[0].strip()
    return line if len(line) <= 120 else line[:117] + "..."


def _tls_problem(exc: BaseException, *, client_cert: bool) -> str:
    """What went wrong in a TLS handshake, found in urllib3's chain of wrapped errors."""
    from rollout.metrics.prometheus_auth import EncryptedKey

    for error in _causes(exc):
        if isinstance(error, EncryptedKey):
            return str(error)
        if isinstance(error, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate not trusted ({error.verify_message}); "
                "metrics.ca_file names the CA that signed it"
            )
    # A server that wants a client certificate says so in an alert, but in TLS 1.3 it checks
    # the certificate after the client's handshake is done, so the client mostly sees the
    # connection closed under its request (SSLEOFError), not the alert.
    if client_cert:
        hint = "did the server refuse the client certificate in metrics.cert_file?"
    else:
        hint = (
            "a server that asks for a client certificate (mutual TLS) closes the connection so: "
            "metrics.cert_file and key_file name one"
        )
    return f"TLS handshake failed ({type(exc).__name__}); {hint}"


def _number(raw: Any) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _a_series(item: dict[str, Any]) -> bool:
    """Whether `item` is a series as the query API gives it: `metric` labels (names and values
    strings) and a `value` pair (time, value) or `values`, a list of such pairs."""
    metric = item.get("metric", {})
    if not isinstance(metric, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metric.items()
    ):
        return False

    def pair(sample: object) -> bool:
        return isinstance(sample, list) and len(sample) == 2

    if "value" in item and not pair(item["value"]):
        return False
    values = item.get("values", [])
    return isinstance(values, list) and all(pair(sample) for sample in values)


def _labels(metric: dict[str, str]) -> Series:
    # `__name__` is dropped by functions like resets(): leave it out so the keys match.
    return tuple(sorted((k, v) for k, v in metric.items() if k != "__name__"))


def _increase(baseline: int, samples: list[int]) -> int:
    """Sum of increases over raw samples after `baseline`; a drop is a restart from 0."""
    total, previous = 0, baseline
    for value in samples:
        total += value - previous if value >= previous else value
        previous = value
    return total


def _promql_string(text: str) -> str:
    """`text` as the inside of a double-quoted PromQL string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _target(series: Series) -> Target | None:
    """The scrape target a series came from; None for one whose query dropped both labels."""
    labels = dict(series)
    if "job" not in labels and "instance" not in labels:
        return None
    return labels.get("job", ""), labels.get("instance", "")


def _starts(first: Iterable[tuple[Series, tuple[float, int]]]) -> dict[Target, float]:
    """Per target, the time of the first sample in the step of any of its series: when
    Prometheus, holding no history, first scraped it."""
    starts: dict[Target, float] = {}
    for series, (t, _) in first:
        target = _target(series)
        if target is not None:
            starts[target] = min(t, starts.get(target, t))
    return starts


def _baseline(
    series: Series,
    since: float,
    first: dict[Series, tuple[float, int]],
    history: History,
    *,
    existed: bool,
) -> tuple[float, int] | None:
    """Where the step's count of `series` begins, as (time, counter value): (`since`, 0) for a
    series that appeared during the step, else its first sample in the step (None: none).

    While Prometheus holds the history of its target (`history.holds`), a series that did not
    exist before `since` appeared during the step. When it does not, absence says nothing: a
    series appeared during the step only if its first sample came after its target's first
    (`history.starts`); one of no known target (its query dropped `job` and `instance`) counts
    from its first sample, as it cannot be told from a pod scraped a little later than the
    others.
    """
    found = first.get(series)
    if not existed:
        if history.holds(series):
            return since, 0
        target = _target(series)
        starts = history.starts
        if found is not None and target is not None and found[0] > starts.get(target, math.inf):
            return since, 0
    return found


def _subquery(expr: str, window_ms: int) -> str:
    """`expr` evaluated at each whole second of the window, or every few seconds when that is
    more than MAX_POINTS times: a pod gone mid-step is then held at its value up to that many
    seconds before it went, and a first value is found up to that late (traffic lost, never
    counted twice)."""
    step_s = max(1, math.ceil(window_ms / 1000 / MAX_POINTS))
    return f"({expr})[{window_ms}ms:{step_s}s]"


def _render(template: str, value: str) -> str:
    """A custom query for one colour: the value goes inside the template's PromQL string."""
    return template.replace("{colour}", _promql_string(value))


def _total(deltas: dict[Series, int], label: str, value: str) -> int:
    return sum(n for series, n in deltas.items() if dict(series).get(label) == value)


def _by_le(vector: dict[Series, int], unit_s: float) -> dict[float, int]:
    buckets: dict[float, int] = defaultdict(int)
    for series, n in vector.items():
        le = _number(dict(series).get("le"))
        bound = math.inf if dict(series).get("le") == "+Inf" else le
        if bound is None:
            continue
        buckets[bound if math.isinf(bound) else bound * unit_s] += n
    return dict(buckets)


def _histogram(
    deltas: dict[Series, int], label: str, value: str, unit_s: float
) -> dict[float, int]:
    return _by_le({s: n for s, n in deltas.items() if dict(s).get(label) == value}, unit_s)


def _counts(
    requests: int, errors: int, histogram: dict[float, int], detail: dict[str, Any]
) -> ColourCounts:
    """A colour's counts; more errors than requests raises the requests (see the docstring)."""
    if errors > requests:
        detail["requests_raised_to_errors"] = requests
        requests = errors
    return ColourCounts(
        requests=requests, errors=errors, latency_buckets=_align(histogram, requests)
    )


def _align(histogram: dict[float, int], requests: int) -> tuple[tuple[float, int], ...]:
    """Cumulative buckets consistent with `requests` (see the module docstring), +Inf's (every
    request) last: a histogram of that bucket alone is one with no finite bound, which the
    judge tells apart from none."""
    if not histogram:
        return ()
    in_histogram = histogram.get(math.inf, max(histogram.values()))
    unflushed = max(requests - in_histogram, 0)
    return (
        *(
            (bound, min(count + unflushed, requests))
            for bound, count in sorted(histogram.items())
            if math.isfinite(bound)
        ),
        (math.inf, requests),
    )
