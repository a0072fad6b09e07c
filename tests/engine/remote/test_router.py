"""The router alone: least outstanding, prefix affinity, health, ejection and recovery, on a fake clock."""

from __future__ import annotations

import pytest

from deepserve.engine.remote.router import Router


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(n: int = 2, **kwargs) -> tuple[Router, Clock]:
    clock = Clock()
    return Router([f"up{i}:8000" for i in range(n)], clock=clock, **kwargs), clock


def test_least_outstanding_requests_wins_and_ties_go_to_the_first_listed():
    router, _ = make(3)
    a, b, c = router.upstreams
    assert router.pick() is a
    router.started(a)
    assert router.pick() is b
    router.started(b)
    assert router.pick() is c
    router.started(c)
    router.started(a)
    assert router.pick() is b  # a: 2, b: 1, c: 1
    router.ended(a)
    router.ended(a)
    assert router.pick() is a
    assert [u.num_requests for u in router.upstreams] == [2, 1, 1]


def test_short_prompts_have_no_affinity_key():
    router, _ = make(affinity_chars=100)
    assert router.affinity_key("x" * 99) is None
    assert router.affinity_key("x" * 100 + "tail") == "x" * 100
    assert make(affinity_chars=0)[0].affinity_key("x" * 10_000) is None


def test_a_shared_long_prefix_lands_on_one_upstream_even_when_it_is_busier():
    router, _ = make(4, affinity_chars=64, affinity_max_excess=4)
    prefix = "You are a helpful assistant. " * 4
    keys = [router.affinity_key(prefix + f"question {i}") for i in range(6)]
    assert len(set(keys)) == 1
    first = router.pick(keys[0])
    for key in keys[1:4]:
        chosen = router.pick(key)
        assert chosen is first  # the same upstream, though others have nothing in flight
        router.started(chosen)
    assert first.outstanding == 3


def test_different_prefixes_spread_over_upstreams():
    router, _ = make(4, affinity_chars=32)
    chosen = {router.pick(router.affinity_key(f"{i:04d}" + "p" * 40)).index for i in range(64)}
    assert chosen == {0, 1, 2, 3}  # rendezvous hashing uses every upstream


def test_affinity_yields_to_load_at_the_configured_excess():
    router, _ = make(2, affinity_chars=8, affinity_max_excess=2)
    key = router.affinity_key("same prefix, long enough")
    home = router.pick(key)
    other = next(u for u in router.upstreams if u is not home)
    router.started(home)
    assert router.pick(key) is home  # excess 1 < 2
    router.started(home)
    assert router.pick(key) is other  # excess 2: the least loaded one takes it


def test_leaving_upstream_moves_only_its_own_keys():
    router, _ = make(3, affinity_chars=8)
    keys = [router.affinity_key(f"{i:03d}-prefix-padding") for i in range(60)]
    before = {k: router.pick(k).index for k in keys}
    gone = router.upstreams[1]
    after = {k: router.pick(k, exclude=[gone]).index for k in keys}
    for k in keys:
        if before[k] != 1:
            assert after[k] == before[k]
        else:
            assert after[k] != 1


def test_consecutive_failures_eject_then_the_upstream_comes_back_half_open():
    router, clock = make(2, eject_after=3, eject_s=30)
    a, b = router.upstreams
    router.failed(a)
    router.failed(a)
    assert router.pick() is a  # two failures: still in
    router.succeeded(a)
    assert a.consecutive_failures == 0
    for _ in range(3):
        router.failed(a)
    assert router.pick() is b and a.num_failures == 5
    assert router.snapshot()[0]["ejected"] is True
    clock.now += 29.9
    assert router.pick() is b
    clock.now += 0.2
    assert router.pick() is a  # half-open: tried again
    router.failed(a)  # one more failure ejects it again at once
    assert router.pick() is b
    clock.now += 31
    assert router.pick() is a
    router.succeeded(a)
    clock.now += 1
    router.failed(a)
    assert router.pick() is a  # recovered: the count starts over


def test_health_probes_take_upstreams_out_and_bring_ejected_ones_back():
    router, _ = make(2, eject_after=1, eject_s=3600)
    a, b = router.upstreams
    router.record_health(a, False)
    assert router.pick() is b and router.any_available
    router.record_health(b, False)
    assert router.pick() is None and not router.any_available
    router.record_health(a, True)
    assert router.pick() is a
    router.failed(a)  # ejected for an hour...
    assert router.pick() is None
    router.record_health(a, True)  # ...unless a probe proves it answers again
    assert router.pick() is a and a.consecutive_failures == 0


def test_excluded_upstreams_are_not_picked_again_for_the_same_request():
    router, _ = make(3)
    a, b, c = router.upstreams
    assert router.pick(exclude=[a]) is b
    assert router.pick(exclude=[a, b]) is c
    assert router.pick(exclude=[a, b, c]) is None


def test_a_router_needs_an_upstream():
    with pytest.raises(ValueError):
        Router([])
