"""Schedules against hand-computed values at their boundaries, and their argument checks."""

import math

import pytest

from optorch import schedules as S


def values(schedule, steps):
    return [schedule(s) for s in steps]


def approx(xs):
    return pytest.approx(xs, rel=1e-12, abs=1e-15)


def test_constant():
    assert values(S.constant(0.3), [-5, 0, 10**9]) == [0.3, 0.3, 0.3]


def test_linear_warmup():
    s = S.linear_warmup(10, init_value=0.2)
    assert values(s, [-3, 0, 5, 10, 11, 10**6]) == approx([0.2, 0.2, 0.6, 1.0, 1.0, 1.0])
    assert values(S.linear_warmup(0), [0, 5]) == [1.0, 1.0]


def test_cosine_decay():
    s = S.cosine_decay(100, floor=0.1)
    assert values(s, [-1, 0, 50, 100, 150]) == approx([1.0, 1.0, 0.55, 0.1, 0.1])
    assert s(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_linear_warmdown():
    assert values(S.linear_warmdown(8, floor=0.2), [0, 4, 8, 9]) == approx([1.0, 0.6, 0.2, 0.2])


def test_warmup_cosine():
    s = S.warmup_cosine(total_steps=110, warmup_steps=10, floor=0.0)
    assert values(s, [0, 5, 10, 60, 110, 200]) == approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])


def test_warmup_stable_decay():
    s = S.warmup_stable_decay(total_steps=100, warmup_steps=10, decay_fraction=0.2, floor=0.1)
    assert values(s, [0, 10, 50, 80, 90, 100, 101]) == approx([0.0, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1])


def test_rsqrt():
    s = S.rsqrt(warmup_steps=4)
    assert values(s, [0, 2, 4, 16, 36]) == approx([0.0, 0.5, 1.0, 0.5, 1 / 3])
    assert S.rsqrt(0, timescale=3)(9) == pytest.approx(0.5)


def test_join_schedules_counts_from_each_start():
    s = S.join_schedules([S.constant(2.0), S.linear_warmdown(10), S.constant(0.5)], [5, 15])
    assert values(s, [0, 4, 5, 10, 15, 99]) == approx([2.0, 2.0, 1.0, 0.5, 0.5, 0.5])


def test_scaled():
    assert S.scaled(3e-4, S.linear_warmup(2))(1) == pytest.approx(1.5e-4)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: S.warmup_cosine(total_steps=10, warmup_steps=11), "warmup_steps"),
        (lambda: S.warmup_stable_decay(total_steps=10, warmup_steps=9, decay_fraction=0.5), "warmup_steps"),
        (lambda: S.warmup_stable_decay(total_steps=10, decay_fraction=1.5), "decay_fraction"),
        (lambda: S.linear_warmup(-1), "warmup_steps"),
        (lambda: S.linear_warmup(2.5), "warmup_steps"),
        (lambda: S.cosine_decay(10, floor=-0.1), "floor"),
        (lambda: S.constant(float("nan")), "value"),
        (lambda: S.rsqrt(5, timescale=0), "timescale"),
        (lambda: S.join_schedules([S.constant()], [3]), "boundaries"),
        (lambda: S.join_schedules([S.constant()] * 3, [5, 2]), "boundaries"),
        (lambda: S.scaled(-1.0, S.constant()), "value"),
    ],
)
def test_invalid_arguments_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()
