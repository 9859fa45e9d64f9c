"""The spec's `state` section: a discriminated union on kind whose errors name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rollout.config import (
    FileStateConfig,
    KubernetesStateConfig,
    MemoryStateConfig,
    spec_from_dict,
)
from rollout.errors import ConfigError
from rollout.state.factory import make_store


def spec(state: Any, name: str = "diabetes") -> Any:
    return spec_from_dict({"name": name, "state": state})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param({}, FileStateConfig, id="no-state-section"),
        pytest.param({"state": {"dir": "x"}}, FileStateConfig, id="no-kind-is-file"),
        pytest.param({"state": {"kind": "memory"}}, MemoryStateConfig, id="memory"),
        pytest.param(
            {"state": {"kind": "kubernetes", "namespace": "ml"}},
            KubernetesStateConfig,
            id="kubernetes",
        ),
    ],
)
def test_the_kind_picks_the_config(data: dict[str, Any], expected: type) -> None:
    assert type(spec_from_dict(data).state) is expected


def test_kubernetes_defaults_and_the_shared_api_fields() -> None:
    state = spec(
        {"kind": "kubernetes", "namespace": "ml", "kubeconfig": "~/k", "context": "aks-prod"}
    ).state
    assert isinstance(state, KubernetesStateConfig)
    assert (state.lease_ttl_s, state.dir, state.in_cluster) == (15, Path(".rollout"), False)
    assert (state.kubeconfig, state.context) == (Path("~/k"), "aks-prod")


def test_file_still_accepts_and_ignores_lease_ttl_s() -> None:
    state = spec({"lease_ttl_s": 30}).state
    assert isinstance(state, FileStateConfig) and state.lease_ttl_s == 30


@pytest.mark.parametrize(
    ("state", "name", "message"),
    [
        pytest.param(
            {"kind": "kubernetes"}, "diabetes", "state.namespace: Field required",
            id="missing-namespace",
        ),
        pytest.param(
            {"kind": "kubernetes", "namespace": "Prod_ML"}, "diabetes",
            "state.namespace: 'Prod_ML' is not a Kubernetes namespace",
            id="bad-namespace",
        ),
        pytest.param(
            {"kind": "kubernetes", "namespace": "ml"}, "churn_model",
            "name: 'churn_model' cannot name Kubernetes objects (with state.kind kubernetes the "
            "rollout lives in ConfigMap aml-rollout-churn_model-status)",
            id="underscore-in-name",
        ),
        pytest.param(
            # The limit said is every store's, not the ConfigMap's own 232
            {"kind": "kubernetes", "namespace": "ml"}, "churn_model",
            "no '.' next to '-' or '.'), at most 200 characters",
            id="underscore-in-name-says-the-limit",
        ),
        pytest.param(
            # Every store's limit (the file store's file names), below the ConfigMap's 232
            {"kind": "kubernetes", "namespace": "ml"}, "a" * 233, "name: at most 200 characters",
            id="name-too-long",
        ),
        pytest.param(
            {"kind": "kubernetes", "namespace": "ml", "lease_ttl_s": 2.5}, "diabetes",
            "state.lease_ttl_s: expected a whole number, got 2.5",
            id="fractional-ttl",
        ),
        pytest.param(
            {"kind": "kubernetes", "namespace": "ml", "lease_ttl_s": 0}, "diabetes",
            "state.lease_ttl_s: Input should be greater than or equal to 1",
            id="zero-ttl",
        ),
        pytest.param(
            {"kind": "kubernetes", "namespace": "ml", "app": "x"}, "diabetes",
            "state.app: unknown field",
            id="a-router-field",
        ),
        pytest.param(
            {"kind": "etcd"}, "diabetes",
            "state.kind: unknown kind 'etcd': one of file, memory, kubernetes",
            id="unknown-kind",
        ),
    ],
)  # fmt: skip
def test_bad_state_config_names_the_field(state: dict[str, Any], name: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        spec(state, name)
    assert message in str(refused.value)


def test_the_name_rule_applies_only_to_the_kubernetes_store() -> None:
    assert spec({"kind": "file"}, "churn_model").name == "churn_model"


def test_unloadable_credentials_are_a_config_error_naming_state(tmp_path: Path) -> None:
    cfg = KubernetesStateConfig(namespace="ml", kubeconfig=tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"^state: cannot load Kubernetes credentials"):
        make_store(cfg, "diabetes")
