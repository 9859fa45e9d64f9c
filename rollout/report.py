"""The rollout report: one self-contained HTML file with the story of one or more rollouts.

For each rollout (a ledger) it draws, on one time axis:

- blue's weight as Envoy served it, step by step (from the ledger);
- the per-colour 5xx error rate and p99 latency over time, from Prometheus (`query_range` over
  Envoy's weighted clusters: what the judge was fed), when a Prometheus URL is given;
- every decision as a marked vertical line (step passed, promoted, rolled back, failed), its
  reason in the table below and in the marker's tooltip;
- the ticks whose counts were not counted (ledger `not_counted`: the data plane changed under
  the rollout) as a shaded span, and so marked in the table: the weights drawn there are the
  rollout's, not what the data plane served, and the counts are not the candidate's evidence.

The charts are inline SVG written here (no JavaScript, no CDN, no plotting library), so the file
opens anywhere, offline, and diffs as text. `write_report` is what `aml-rollout demo` calls.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rollout.ledger import BOOTSTRAP_EVENTS, event_sentence, iter_ledger, iter_rollouts, windows

log = logging.getLogger(__name__)

#: The report's name for blue's mirrored share (the shadow step).
MIRRORED = "blue mirrored (shadow)"
COLOURS = {"blue": "#1f6feb", "green": "#2da44e", MIRRORED: "#54aeff"}
DECISION_COLOURS = {
    "passed": "#6e7781",
    "promoted": "#2da44e",
    "rolled back": "#cf222e",
    "failed": "#cf222e",
    "operator": "#8250df",
}
WIDTH, HEIGHT, PAD_L, PAD_R, PAD_T, PAD_B = 860, 170, 60, 20, 16, 28
#: Seconds shown before the first and after the last tick.
PAD_S = 2.0

_REQUESTS = (
    "sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_completed"
    '{{envoy_cluster_name=~"blue|green"}}[{w}]))'
)
#: Envoy creates a cluster's 5xx series only with its first 5xx: a clean colour gets `0 * its
#: request rate` (the `or`), so it is drawn at 0 % instead of missing from the chart.
ERROR_RATE = (
    "(sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_xx"
    '{{envoy_cluster_name=~"blue|green",envoy_response_code_class="5"}}[{w}]))'
    f" or 0 * {_REQUESTS}) / {_REQUESTS}"
)
P99_MS = (
    "histogram_quantile(0.99, sum by (envoy_cluster_name, le) "
    '(rate(envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=~"blue|green"}}[{w}])))'
)


@dataclass
class Series:
    """One line on a chart: (epoch seconds, value) points."""

    name: str
    points: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Decision:
    """A marked moment: when, what kind, and why."""

    at: float
    kind: str
    text: str


@dataclass
class Span:
    """A stretch of time shaded on every chart: from the tick before the first of a run of
    ticks to the last of them (what those ticks counted), and why."""

    start: float
    end: float
    text: str


@dataclass
class RolloutStory:
    """What one rollout's section shows."""

    name: str
    start: float
    end: float
    outcome: str
    reason: str
    weights: Series
    decisions: list[Decision]
    error_rate: list[Series] = field(default_factory=list)
    p99_ms: list[Series] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: Percent of live traffic mirrored to blue (the shadow step); no points when never mirrored.
    mirror: Series = field(default_factory=lambda: Series(MIRRORED))
    #: Where the ticks' counts were not counted (a data plane changed under the rollout).
    not_counted: list[Span] = field(default_factory=list)


def story_from_ledger(path: Path) -> RolloutStory:
    """The latest rollout of a ledger: its weights, decisions and per-tick table."""
    return stories_from_ledger(path)[-1]


def stories_from_ledger(path: Path) -> list[RolloutStory]:
    """One story per rollout the ledger holds, oldest first.

    A rollout run again with `--restart` appends to the same ledger; drawn as one story, a
    rollback and the promotion after it read as one rollout whose outcome was the last one's.
    The ledger is read one line at a time (`iter_ledger`): the records are not held, their rows.
    A bootstrap's lines (`bootstrap`, `first-check`) are no rollout's: a ledger holding nothing
    else is refused, as an empty one is (`explain` tells them). A ValueError, in one line, for a
    ledger of nothing to tell or of a line of another shape (edited by hand, another tool's).
    """
    name = path.name.removesuffix(".ledger.jsonl").removesuffix(".memory")  # a dry run's too
    records = (r for r in iter_ledger(path) if "at" in r)
    try:
        told = [_story(name, piece) for piece in iter_rollouts(records)]
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        # As `explain` says it: one line, not a traceback.
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(
            f"{path}: a line is not a ledger record this version can tell ({what})"
        ) from exc
    if not told:
        raise ValueError(f"{path}: no ticks in this ledger")
    stories = [story for story, bootstrapped in told if not bootstrapped]
    if not stories:
        raise OnlyBootstrap(
            f"{path}: no rollout in this ledger, only a bootstrap's lines "
            "(`aml-rollout rollout explain` tells them)"
        )
    for at in (t for story in stories for t in (story.start, story.end)):
        try:  # as the report will draw them: a time out of any calendar's range is one line too
            datetime.fromtimestamp(at, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise ValueError(f"{path}: a line's time `at` is no time ({exc})") from exc
    return stories


class OnlyBootstrap(ValueError):
    """A ledger holding a bootstrap's lines and no rollout."""


#: The outcome of a rollout that has not ticked (its start line alone): the phase it is in.
NOT_TICKED = "Initializing"
#: The outcomes drawn as a failure; an unfinished rollout's (Progressing, Paused...) is not one.
FAILURES = ("RollingBack", "RolledBack", "Failed")


def _story(name: str, records: Iterable[dict[str, Any]]) -> tuple[RolloutStory, bool]:
    """One rollout's story, and whether it is a bootstrap's lines (no rollout's)."""
    weights = Series("blue")
    mirror = Series(MIRRORED)
    decisions: list[Decision] = []
    rows = []
    spans: list[Span] = []
    previous: dict[str, Any] = {}
    first: dict[str, Any] = {}
    phased: dict[str, Any] = {}  # the last record with a phase
    for _, record, following in windows(records):
        first = first or record
        phased = record if "phase" in record else phased
        at = float(record["at"])
        uncounted = record.get("not_counted")
        if uncounted:
            if previous.get("not_counted") and spans:
                spans[-1].end = at  # the same run of ticks
            else:
                why = f"{uncounted} ({record['drift']})" if record.get("drift") else uncounted
                spans.append(Span(float(previous.get("at", at)), at, f"not counted: {why}"))
        if "weight" in record:
            weights.points.append((at, float(record["weight"])))
            mirror.points.append((at, float(record.get("mirror", 0))))
        actions = record.get("actions") or []
        reason = str(record.get("reason", ""))
        # The start tick (the one leaving Initializing) sets the first weights: no decision.
        started = record.get("phase_before") == "Initializing"
        if any(a.get("type") == "set_weights" for a in actions) and not started:
            decisions.append(Decision(at, _kind(reason, record), reason))
        if "event" in record:  # no tick: a row of empty cells said nothing of what happened
            said = event_sentence(record, checked=following.get("event") == "first-check")
            rows.append({"at": at, "event": said})
            previous = record
            continue
        counts = record.get("counts") or {}
        if not isinstance(counts, dict):  # of another shape (edited by hand): a `?` each
            counts = {"blue": "?", "green": "?"}
        rows.append(
            {
                "at": at,
                "phase": record.get("phase", ""),
                "weight": record.get("weight", ""),
                # Before its first judgement (the first tick), what the tick did.
                "verdict": record.get("verdict") or _did(actions),
                # None: the tick read no metrics (the first, the promotion's last, an error).
                "blue": counts.get("blue") if counts else None,
                "green": counts.get("green") if counts else None,
                "reason": reason,
                "decided": bool(actions),
                "not_counted": bool(uncounted),
            }
        )
        previous = record
    last = previous
    # The outcome is the phase its last tick decided; a line after it (a controller stopped
    # before it applied that tick's actions) says what happened last, as `explain` says it.
    reason = phased.get("reason", "") if phased else "the rollout has not ticked yet"
    if "event" in last and last.get("event") != "start":
        reason = event_sentence(last)
    story = RolloutStory(
        name=name,
        start=float(first["at"]),
        end=float(last["at"]),
        outcome=str(phased.get("phase", NOT_TICKED)),
        reason=str(reason),
        weights=weights,
        mirror=mirror if any(v for _, v in mirror.points) else Series(mirror.name),
        decisions=decisions,
        rows=rows,
        not_counted=spans,
    )
    return story, first.get("event") in BOOTSTRAP_EVENTS


def _did(actions: list[dict[str, Any]]) -> str:
    """What a tick's deploys and removals did (`deployed blue`), else that it judged nothing."""
    done = [
        f"{'deployed' if a['type'] == 'deploy' else 'removed'} {a.get('colour', '?')}"
        for a in actions
        if a.get("type") in ("deploy", "remove")
    ]
    return ", ".join(done) or "not judged yet"


def _kind(reason: str, record: dict[str, Any]) -> str:
    text = reason.lower()
    if "rolled back" in text or record.get("phase") in ("RollingBack", "RolledBack"):
        return "rolled back"
    if record.get("phase") == "Failed":  # blue's deploy failed for good: blue back to 0 %
        return "failed"
    if record.get("phase") in ("Promoting", "Finalising", "Succeeded"):
        return "promoted"
    if record.get("commands"):  # an operator's `set-weight`: no step passed there
        return "operator"
    return "passed"


def add_prometheus(story: RolloutStory, url: str, *, step_s: float = 1.0) -> None:
    """Fill the error-rate and p99 series from Prometheus (a warning, not a failure, if down)."""
    from prometheus_api_client import PrometheusConnect

    start = datetime.fromtimestamp(story.start - PAD_S, UTC)
    end = datetime.fromtimestamp(story.end + PAD_S, UTC)
    window = "5s"
    try:
        with PrometheusConnect(url=url) as prom:
            errors = prom.custom_query_range(
                ERROR_RATE.format(w=window), start_time=start, end_time=end, step=f"{step_s:g}s"
            )
            p99 = prom.custom_query_range(
                P99_MS.format(w=window), start_time=start, end_time=end, step=f"{step_s:g}s"
            )
    except Exception as exc:  # the report still tells the story from the ledger
        log.warning(
            "report: cannot read Prometheus at %s (%s); charts from the ledger only", url, exc
        )
        return
    story.error_rate = _series(errors, scale=100.0)
    story.p99_ms = _series(p99, scale=1.0)


def _series(result: list[dict[str, Any]], *, scale: float) -> list[Series]:
    out = []
    for item in result:
        name = item.get("metric", {}).get("envoy_cluster_name", "?")
        points = []
        for t, v in item.get("values", []):
            value = float(v)
            if math.isfinite(value):
                points.append((float(t), value * scale))
        out.append(Series(name, points))
    return sorted(out, key=lambda s: s.name)


# ---------------------------------------------------------------------------------------- SVG


def _chart(
    title: str,
    unit: str,
    series: Sequence[Series],
    start: float,
    end: float,
    decisions: Sequence[Decision],
    *,
    y_max: float | None = None,
    step: bool = False,
    spans: Sequence[Span] = (),
) -> str:
    origin = start  # "+N s" labels count from the rollout's first tick
    start, end = start - PAD_S, end + PAD_S
    span = max(end - start, 1.0)
    series = [Series(s.name, [(t, v) for t, v in s.points if start <= t <= end]) for s in series]
    values = [v for s in series for _, v in s.points]
    top = y_max if y_max is not None else max([*values, 0.0]) * 1.15 or 1.0
    inner_w, inner_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def x(t: float) -> float:
        return PAD_L + (t - start) / span * inner_w

    def y(v: float) -> float:
        return PAD_T + inner_h - min(v, top) / top * inner_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{PAD_L}" y="11" class="t">{html.escape(title)}</text>',
    ]
    for i in range(5):
        v = top * i / 4
        parts.append(
            f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="g"/>'
            f'<text x="{PAD_L - 6}" y="{y(v) + 4:.1f}" class="a" text-anchor="end">'
            f"{_fmt(v)}{html.escape(unit)}</text>"
        )
    for i in range(6):
        t = start + span * i / 5
        parts.append(
            f'<text x="{x(t):.1f}" y="{HEIGHT - 8}" class="a" text-anchor="middle">'
            f"{t - origin:+.0f} s</text>"
        )
    for sp in spans:
        left, right = x(max(sp.start, start)), x(min(sp.end, end))
        parts.append(
            f'<rect x="{left:.1f}" y="{PAD_T}" width="{max(right - left, 2.0):.1f}" '
            f'height="{inner_h}" class="n"><title>{html.escape(sp.text)}</title></rect>'
        )
    for d in decisions:
        colour = DECISION_COLOURS.get(d.kind, "#6e7781")
        parts.append(
            f'<line x1="{x(d.at):.1f}" x2="{x(d.at):.1f}" y1="{PAD_T}" y2="{PAD_T + inner_h}" '
            f'stroke="{colour}" stroke-dasharray="4 3"><title>{html.escape(d.text)}</title></line>'
        )
    for s in series:
        if not s.points:
            continue
        pts = []
        previous: float | None = None
        for t, v in s.points:
            if step and previous is not None:
                pts.append(f"{x(t):.1f},{y(previous):.1f}")
            pts.append(f"{x(t):.1f},{y(v):.1f}")
            previous = v
        colour = COLOURS.get(s.name, "#8250df")
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(pts)}">'
            f"<title>{html.escape(s.name)}</title></polyline>"
        )
    legend_x = WIDTH - PAD_R - 10
    for i, s in enumerate([s for s in series if s.points]):
        colour = COLOURS.get(s.name, "#8250df")
        parts.append(
            f'<text x="{legend_x}" y="{PAD_T + 12 + 14 * i}" class="a" text-anchor="end" '
            f'fill="{colour}">{html.escape(s.name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.2g}"


# --------------------------------------------------------------------------------------- HTML

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:900px;
color:#1f2328}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em} svg{width:100%;height:auto;margin:.3em 0}
.t{font-size:12px;font-weight:600} .a{font-size:10px;fill:#57606a} .g{stroke:#d0d7de}
table{border-collapse:collapse;font-size:12px;width:100%} td,th{border-bottom:1px solid #d0d7de;
padding:2px 6px;text-align:left;vertical-align:top} tr.d{background:#fff8c5}
tr.e td{color:#57606a;font-style:italic}
.n{fill:#eaeef2} td.n{color:#57606a}
.ok{color:#2da44e;font-weight:600} .bad{color:#cf222e;font-weight:600}
"""


def render_html(stories: Sequence[RolloutStory], *, title: str, notes: Sequence[str] = ()) -> str:
    """The whole report as one HTML string."""
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    out += [f"<p>{html.escape(n)}</p>" for n in notes]
    for story in stories:
        style = " class='ok'" if story.outcome == "Succeeded" else ""
        style = " class='bad'" if story.outcome in FAILURES else style
        out.append(f"<h2>{html.escape(story.name)}: ")
        out.append(f"<span{style}>{html.escape(story.outcome)}</span></h2>")
        out.append(f"<p>{html.escape(story.reason)}</p>")
        started = datetime.fromtimestamp(story.start, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        out.append(f"<p>started {started}, {story.end - story.start:.1f} s. Dashed lines: ")
        out.append(
            "decisions (grey: step passed, green: promotion, red: rollback or failure, purple: "
            "weight set by an operator).</p>"
        )
        if story.not_counted:
            out.append(
                "<p>Shaded: ticks whose counts were not counted as the candidate's evidence — "
                "the data plane changed under this rollout (another rollout, or a hand edit). "
                "The weights drawn there are the rollout's, not what the data plane served; "
                "the table marks those ticks.</p>"
            )
        out.append(
            _chart(
                "blue weight (served; mirrored: copies whose answers nobody gets)", " %",
                [story.weights, story.mirror], story.start, story.end,
                story.decisions, y_max=100.0, step=True, spans=story.not_counted,
            )
        )  # fmt: skip
        if story.error_rate:
            out.append(
                _chart(
                    "5xx error rate per colour (Envoy, 5 s window)", " %", story.error_rate,
                    story.start, story.end, story.decisions, spans=story.not_counted,
                )
            )  # fmt: skip
        if story.p99_ms:
            out.append(
                _chart(
                    "p99 latency per colour (Envoy, 5 s window)", " ms", story.p99_ms,
                    story.start, story.end, story.decisions, spans=story.not_counted,
                )
            )  # fmt: skip
        out.append(
            "<table><tr><th>+s</th><th>phase</th><th>blue %</th><th>verdict</th>"
            "<th>blue req/err</th><th>green req/err</th><th>reason</th></tr>"
        )
        for row in story.rows:
            if "event" in row:
                out.append(
                    f"<tr class='e'><td>{row['at'] - story.start:.1f}</td>"
                    f"<td colspan='6'>{html.escape(row['event'])}</td></tr>"
                )
                continue
            # A tick's counts left out of the evidence read as evidence in a column of counts.
            cell, mark = ("<td class='n'>", " not counted") if row["not_counted"] else ("<td>", "")
            blue, green = (_counts(row[colour], mark) for colour in ("blue", "green"))
            out.append(
                f"<tr class='{'d' if row['decided'] else ''}'>"
                f"<td>{row['at'] - story.start:.1f}</td><td>{html.escape(str(row['phase']))}</td>"
                f"<td>{html.escape(str(row['weight']))}</td>"
                f"<td>{html.escape(str(row['verdict']))}</td>"
                f"{cell}{blue}</td>{cell}{green}</td>"
                f"<td>{html.escape(str(row['reason']))}</td></tr>"
            )
        out.append("</table>")
    out.append("</body></html>")
    return "".join(out)


def _counts(counts: Any, mark: str) -> str:
    """A count cell: `requests/errors`, a dash for a tick that read no metrics, or `?` for
    counts of another shape (a ledger edited by hand: `explain` reads past them too)."""
    if counts is None:
        return "—"
    if not isinstance(counts, dict):
        return f"?{mark}"
    said = f"{counts.get('requests', '')}/{counts.get('errors', '')}"
    return f"{html.escape(said)}{mark}"


def write_report(
    path: Path,
    ledgers: Sequence[Path],
    *,
    prometheus_url: str | None = None,
    title: str = "aml-rollout report",
    notes: Sequence[str] = (),
) -> Path:
    """Render the ledgers (plus Prometheus series when a URL is given) to `path`. A ledger of
    a bootstrap alone (a state folder's first release) is left out with a warning, unless no
    other holds a rollout either (OnlyBootstrap)."""
    stories = []
    for ledger in ledgers:
        try:
            told = stories_from_ledger(ledger)
        except OnlyBootstrap as exc:
            if len(ledgers) == 1:
                raise
            log.warning("%s: left out of the report", exc)
            continue
        for story in told:
            if prometheus_url:
                add_prometheus(story, prometheus_url)
            stories.append(story)
    if ledgers and not stories:
        raise OnlyBootstrap(f"{', '.join(map(str, ledgers))}: no rollout in these ledgers")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(stories, title=title, notes=notes), encoding="utf-8")
    return path
