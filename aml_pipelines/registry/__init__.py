"""Model registry: the Protocol (base), local-folder, Azure ML and in-memory backends, factory."""
