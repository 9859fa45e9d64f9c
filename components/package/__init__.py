"""The package component: a registered model version into a deployable package folder."""
