"""The rollout component: hands the package to the rollout engine (rollout.api)."""
