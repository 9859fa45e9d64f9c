"""aml-rollout: progressive delivery of Azure ML models, judged live on Prometheus metrics."""

__version__ = "0.1.0"
