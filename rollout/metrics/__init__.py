"""Metrics providers: per-colour counts for the judge (Prometheus, static/simulated)."""
