"""State stores: a rollout's status, queued operator commands and lease (file, memory)."""
