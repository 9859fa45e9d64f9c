"""State stores: a rollout's status, operator commands and lease (file, memory, kubernetes)."""
