"""Traffic routers: the one place weights are applied (Istio, local Envoy, Azure ML, memory)."""
