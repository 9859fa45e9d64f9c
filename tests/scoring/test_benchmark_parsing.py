"""The scoring benchmark reads wrk's report correctly (units, error lines)."""

from __future__ import annotations

import pytest

from benchmarks.scoring import parse_wrk

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:5995/score
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   534.04us    1.03ms  15.04ms   90.20%
    Req/Sec     8.84k     3.90k   14.94k    60.00%
  Latency Distribution
     50%  136.00us
     75%  378.00us
     90%    1.53ms
     99%    4.25ms
  8790 requests in 1.00s, 1.75MB read
Requests/sec:   8765.57
Transfer/sec:      1.75MB
"""


def test_parse_wrk_reads_rate_and_percentiles_in_ms() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.rps == pytest.approx(8765.57)
    assert result.p50_ms == pytest.approx(0.136)
    assert result.p99_ms == pytest.approx(4.25)
    assert (result.non_2xx, result.errors) == (0, 0)


def test_parse_wrk_counts_failures() -> None:
    failing = WRK_OUTPUT.replace("     99%    4.25ms", "     99%    1.20s") + (
        "  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 7\n"
    )
    result = parse_wrk(failing)
    assert result.p99_ms == pytest.approx(1200.0)
    assert (result.non_2xx, result.errors) == (7, 3)
