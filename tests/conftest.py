"""Suite-wide settings.

Hypothesis' per-example deadline (200 ms) is a timing assertion, and timing belongs in the
benchmarks: on two pytest workers over a loaded 2-core machine, an example that writes and
fsyncs files took 278 ms and failed `test_tags_round_trip` (a fresh clone's `.ci/run`).
"""

from hypothesis import settings

settings.register_profile("aml-rollout", deadline=None)
settings.load_profile("aml-rollout")
