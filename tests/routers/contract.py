"""The TrafficRouter contract, as one suite every backend runs (memory, envoy, istio, azureml).

Subclass `RouterContract` in a backend's test module and provide a `router` fixture returning a
router with nothing deployed (and, where the backend has header-pinned routes, override
`pinned_routes`). The tests speak only the Protocol, so a backend passes exactly when it behaves
like the others: idempotent calls, weights that round-trip, traffic never sent to an empty colour,
a colour never removed while it takes traffic, pinned routes untouched by `set_weights`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout.core.types import Colour, Release, Weights
from rollout.errors import RouterError
from rollout.routers.base import TrafficRouter
from rollout.routers.memory import MemoryRouter

V1 = Release(model="diabetes", version="1", sha256="1" * 64, image="registry.local/diabetes:1")
ALL_GREEN = Weights.blue_at(0)
SHADOW = Weights.blue_at(0, mirror=5)  # the default plan's shadow step
V2 = Release(model="diabetes", version="2", sha256="2" * 64, image="registry.local/diabetes:2")


def identity(release: Release | None) -> tuple[str, str, str] | None:
    """What every backend must round-trip: model, version, sha256."""
    return None if release is None else (release.model, release.version, release.sha256)


Op = tuple[Any, ...]
OPS = st.one_of(
    st.tuples(st.just("deploy"), st.sampled_from(Colour), st.sampled_from([V1, V2])),
    st.tuples(
        st.just("set_weights"),
        st.sampled_from([0, 1, 10, 50, 100]).map(Weights.blue_at) | st.just(SHADOW),
    ),
    st.tuples(st.just("remove"), st.sampled_from(Colour)),
)


def apply(router: TrafficRouter, op: Op) -> str:
    """Run one call; its outcome as a comparable word."""
    name, *args = op
    try:
        getattr(router, name)(*args)
    except RouterError as exc:
        return type(exc).__name__
    return "ok"


def observe(router: TrafficRouter) -> tuple[Any, ...]:
    return (
        router.get_weights(),
        identity(router.release(Colour.BLUE)),
        identity(router.release(Colour.GREEN)),
    )


class RouterContract:
    """The shared tests. Not collected by itself (no `Test` prefix)."""

    @pytest.fixture
    def router(self) -> TrafficRouter:
        raise NotImplementedError("a backend's test class provides the `router` fixture")

    def pinned_routes(self, router: Any) -> Any:
        """The backend's header-pinned routes as served; None when it has none to inspect."""
        return None

    def fresh_router(self) -> AbstractContextManager[TrafficRouter]:
        """A new router with nothing deployed, cleaned up on exit (for the differential test).

        Override it to have the backend compared call by call with the memory reference.
        """
        pytest.skip("this backend does not offer fresh routers for the differential test")

    # ---------------------------------------------------------------------------- differential
    @settings(
        max_examples=20,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
    )
    @given(ops=st.lists(OPS, max_size=8))
    def test_behaves_like_the_reference_under_any_call_sequence(self, ops: list[Op]) -> None:
        reference = MemoryRouter()
        with self.fresh_router() as router:
            for r in (reference, router):
                self.live(r)
            for op in ops:
                assert apply(router, op) == apply(reference, op), op
                assert observe(router) == observe(reference), op

    @staticmethod
    def live(router: TrafficRouter, weights: Weights = ALL_GREEN) -> TrafficRouter:
        """Green serves V1 (and blue V2 when `weights` sends blue anything), at `weights`."""
        router.deploy(Colour.GREEN, V1)
        if weights.blue or weights.green == 0:
            router.deploy(Colour.BLUE, V2)
        router.set_weights(weights)
        return router

    # ------------------------------------------------------------------------ deploy / release
    def test_is_a_traffic_router(self, router: TrafficRouter) -> None:
        assert isinstance(router, TrafficRouter)

    def test_nothing_is_released_before_deploy(self, router: TrafficRouter) -> None:
        assert router.release(Colour.BLUE) is None
        assert router.release(Colour.GREEN) is None

    def test_deploy_then_release_round_trips_each_colour(self, router: TrafficRouter) -> None:
        router.deploy(Colour.GREEN, V1)
        assert identity(router.release(Colour.GREEN)) == identity(V1)
        assert router.release(Colour.BLUE) is None
        router.deploy(Colour.BLUE, V2)
        assert identity(router.release(Colour.BLUE)) == identity(V2)
        assert identity(router.release(Colour.GREEN)) == identity(V1)

    def test_deploy_is_idempotent(self, router: TrafficRouter) -> None:
        self.live(router)
        router.deploy(Colour.GREEN, V1)
        router.deploy(Colour.GREEN, V1)
        assert identity(router.release(Colour.GREEN)) == identity(V1)
        assert router.get_weights() == Weights.blue_at(0)

    def test_deploy_replaces_the_release_and_leaves_traffic_alone(
        self, router: TrafficRouter
    ) -> None:
        self.live(router, Weights.blue_at(30))
        router.deploy(Colour.BLUE, V1)  # Blue_Green's mirror image: same slot, other release
        assert identity(router.release(Colour.BLUE)) == identity(V1)
        assert router.get_weights() == Weights.blue_at(30)

    # ---------------------------------------------------------------------------------- weights
    @pytest.mark.parametrize(
        "blue",
        [
            pytest.param(0, id="all-green"),
            pytest.param(1, id="one-percent"),
            pytest.param(25, id="quarter"),
            pytest.param(50, id="half"),
            pytest.param(99, id="all-but-one"),
            pytest.param(100, id="all-blue"),
        ],
    )
    def test_weights_round_trip(self, router: TrafficRouter, blue: int) -> None:
        self.live(router, Weights.blue_at(blue))
        assert router.get_weights() == Weights.blue_at(blue)

    def test_set_weights_is_idempotent(self, router: TrafficRouter) -> None:
        self.live(router, Weights.blue_at(10))
        router.set_weights(Weights.blue_at(10))
        router.set_weights(Weights.blue_at(10))
        assert router.get_weights() == Weights.blue_at(10)

    def test_weights_move_both_ways(self, router: TrafficRouter) -> None:
        self.live(router, Weights.blue_at(50))
        router.set_weights(Weights.blue_at(100))
        router.set_weights(Weights.blue_at(0))  # rollback
        assert router.get_weights() == Weights.blue_at(0)

    def test_set_weights_leaves_releases_alone(self, router: TrafficRouter) -> None:
        self.live(router, Weights.blue_at(25))
        router.set_weights(Weights.blue_at(75))
        assert identity(router.release(Colour.GREEN)) == identity(V1)
        assert identity(router.release(Colour.BLUE)) == identity(V2)

    def test_set_weights_leaves_pinned_routes_alone(self, router: TrafficRouter) -> None:
        self.live(router, Weights.blue_at(10))
        before = self.pinned_routes(router)
        if before is None:
            pytest.skip("this backend has no header-pinned routes")
        router.set_weights(Weights.blue_at(60))
        router.set_weights(Weights.blue_at(0))
        assert self.pinned_routes(router) == before

    def test_refuses_traffic_to_a_colour_with_nothing_deployed(self, router: TrafficRouter) -> None:
        self.live(router)  # green only
        with pytest.raises(RouterError, match="blue"):
            router.set_weights(Weights.blue_at(10))
        assert router.get_weights() == Weights.blue_at(0)

    # ----------------------------------------------------------------------------------- mirror
    def test_the_shadow_round_trips_and_ends_when_blue_goes_live(
        self, router: TrafficRouter
    ) -> None:
        self.live(router)
        router.deploy(Colour.BLUE, V2)
        router.set_weights(SHADOW)
        assert router.get_weights() == SHADOW
        router.set_weights(SHADOW)  # idempotent
        assert router.get_weights() == SHADOW
        router.set_weights(Weights.blue_at(10))
        assert router.get_weights() == Weights.blue_at(10)
        router.set_weights(SHADOW)
        router.set_weights(Weights.blue_at(0))  # a rollback from the shadow step
        assert router.get_weights() == Weights.blue_at(0)

    def test_refuses_to_mirror_to_a_blue_with_nothing_deployed(self, router: TrafficRouter) -> None:
        self.live(router)  # green only
        with pytest.raises(RouterError, match="blue"):
            router.set_weights(SHADOW)
        assert router.get_weights() == Weights.blue_at(0)

    def test_a_mirror_leaves_pinned_routes_alone(self, router: TrafficRouter) -> None:
        self.live(router, Weights.blue_at(10))
        before = self.pinned_routes(router)
        if before is None:
            pytest.skip("this backend has no header-pinned routes")
        router.set_weights(SHADOW)
        assert self.pinned_routes(router) == before

    def test_removing_blue_ends_a_mirror_to_it(self, router: TrafficRouter) -> None:
        self.live(router)
        router.deploy(Colour.BLUE, V2)
        router.set_weights(SHADOW)
        router.remove(Colour.BLUE)
        assert router.release(Colour.BLUE) is None
        assert router.get_weights() == Weights.blue_at(0)

    # ----------------------------------------------------------------------------------- remove
    def test_remove_is_idempotent(self, router: TrafficRouter) -> None:
        self.live(router, Weights.blue_at(20))
        router.set_weights(Weights.blue_at(0))
        router.remove(Colour.BLUE)
        router.remove(Colour.BLUE)
        assert router.release(Colour.BLUE) is None
        assert identity(router.release(Colour.GREEN)) == identity(V1)
        assert router.get_weights() == Weights.blue_at(0)

    def test_remove_refuses_a_colour_that_takes_traffic(self, router: TrafficRouter) -> None:
        self.live(router, Weights.blue_at(40))
        with pytest.raises(RouterError, match="blue"):
            router.remove(Colour.BLUE)
        assert identity(router.release(Colour.BLUE)) == identity(V2)
        assert router.get_weights() == Weights.blue_at(40)

    def test_redeploy_after_remove(self, router: TrafficRouter) -> None:
        self.live(router, Weights.blue_at(0))
        router.remove(Colour.BLUE)
        router.deploy(Colour.BLUE, V2)
        router.set_weights(Weights.blue_at(5))
        assert identity(router.release(Colour.BLUE)) == identity(V2)
        assert router.get_weights() == Weights.blue_at(5)

    def test_seed_promotion_sequence(self, router: TrafficRouter) -> None:
        # Blue_0 → Blue_50 → Blue_100 → Blue_Green → Green_100, as the seed's pipeline does it.
        self.live(router)
        router.deploy(Colour.BLUE, V2)
        for blue in (0, 50, 100):
            router.set_weights(Weights.blue_at(blue))
        router.deploy(Colour.GREEN, V2)
        router.set_weights(Weights.blue_at(0))
        router.remove(Colour.BLUE)
        assert identity(router.release(Colour.GREEN)) == identity(V2)
        assert router.release(Colour.BLUE) is None
        assert router.get_weights() == Weights.blue_at(0)
