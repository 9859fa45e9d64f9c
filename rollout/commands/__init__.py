"""CLI command groups of the rollout package, mounted by `rollout.cli`."""
