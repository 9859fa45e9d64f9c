"""The Azure ML side: pipeline wiring, local runner, model registry and registration triggers."""
