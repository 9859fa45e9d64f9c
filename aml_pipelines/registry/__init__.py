"""Model registry: one Protocol, a local folder backend and an Azure ML backend."""
