"""The blue/green model server, its Azure ML scoring script, and the load generator.

It ships inside the model package (components/package copies it), so it stands alone: it imports
nothing from rollout, aml_pipelines, components or azure (an import-linter contract). See
docs/scoring.md; `create_app` in scoring.app is the entry point for servers.
"""
