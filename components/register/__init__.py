"""The register component: the evaluation gate and the registration."""
