"""Learning-rate schedule shapes: linear warmup, then constant / cosine / exponential / step.

Expected values are written out by hand from what each schedule promises (README,
hypermodel/schedules.py docstring), for a peak of 1e-3 over 110 steps with 10 warmup
steps (so the decay spans steps 10..110).
"""

import numpy as np
import pytest

from hypermodel.schedules import WarmupSchedule

PEAK, TOTAL, WARMUP = 1e-3, 110, 10


def rates(kind, steps, total=TOTAL, warmup=WARMUP):
    schedule = WarmupSchedule(PEAK, kind, total_steps=total, warmup_steps=warmup)
    return np.array([float(schedule(step)) for step in steps])


@pytest.mark.parametrize("kind", ["constant", "cosine", "exponential", "step"])
def test_warmup_rises_linearly_to_the_peak(kind):
    warm = rates(kind, range(WARMUP + 1))
    assert 0.0 <= warm[0] <= 1.0001e-4  # starts near zero: at most one increment of peak / 10 steps
    np.testing.assert_allclose(np.diff(warm[:WARMUP]), 1e-4, rtol=1e-4)  # equal increments of peak / 10
    assert warm[WARMUP] == pytest.approx(1e-3, rel=1e-5)  # the peak when the decay starts
    assert warm.max() == pytest.approx(1e-3, rel=1e-5)  # and never overshoots it


def test_constant_stays_at_the_peak():
    np.testing.assert_allclose(rates("constant", [10, 11, 60, 109, 110, 500]), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(rates("constant", [0, 50, 99], warmup=0, total=100), 1e-3, rtol=1e-5)


def test_cosine_is_half_the_peak_at_mid_decay_and_zero_at_the_end():
    start, quarter, mid, three_quarters, end, after = rates("cosine", [10, 35, 60, 85, 110, 200])
    assert start == pytest.approx(1e-3, rel=1e-5)
    assert quarter == pytest.approx(8.5355339e-4, rel=1e-4)  # (1 + cos 45°) / 2 = 0.8536
    assert mid == pytest.approx(5e-4, rel=1e-4)
    assert three_quarters == pytest.approx(1.4644661e-4, rel=1e-3)  # (1 + cos 135°) / 2 = 0.1464
    assert end == pytest.approx(0.0, abs=1e-9)
    assert after == pytest.approx(0.0, abs=1e-9)  # stays there past the planned end
    curve = rates("cosine", range(10, 111))
    assert np.all(np.diff(curve) <= 1e-12)  # never rises during the decay


def test_exponential_ends_at_one_percent_of_the_peak():
    start, mid, end, after = rates("exponential", [10, 60, 110, 300])
    assert start == pytest.approx(1e-3, rel=1e-5)
    assert mid == pytest.approx(1e-4, rel=1e-3)  # geometric: half way down two decades is one decade
    assert end == pytest.approx(1e-5, rel=1e-3)
    assert after == pytest.approx(1e-5, rel=1e-3)
    curve = rates("exponential", range(10, 111))
    ratios = curve[1:] / curve[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)  # a constant factor per step
    assert ratios[0] < 1


def test_step_divides_by_ten_at_half_and_again_at_three_quarters():
    # Decay progress 0.49, 0.50, 0.74, 0.75, 1.0 of the 100 decay steps.
    before_half, at_half, before_three_quarters, at_three_quarters, end = rates("step", [59, 60, 84, 85, 110])
    assert before_half == pytest.approx(1e-3, rel=1e-5)
    assert at_half == pytest.approx(1e-4, rel=1e-4)
    assert before_three_quarters == pytest.approx(1e-4, rel=1e-4)
    assert at_three_quarters == pytest.approx(1e-5, rel=1e-4)
    assert end == pytest.approx(1e-5, rel=1e-4)


def test_without_warmup_the_first_step_is_the_peak():
    for kind in ("constant", "cosine", "exponential", "step"):
        assert rates(kind, [0], warmup=0, total=100)[0] == pytest.approx(1e-3, rel=1e-5), kind


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="linear"):
        WarmupSchedule(1e-3, "linear", total_steps=10)


def test_schedule_survives_a_config_round_trip():
    schedule = WarmupSchedule(PEAK, "cosine", total_steps=TOTAL, warmup_steps=WARMUP)
    again = WarmupSchedule.from_config(schedule.get_config())
    steps = [0, 5, 10, 60, 110]
    np.testing.assert_allclose([float(again(s)) for s in steps], [float(schedule(s)) for s in steps], rtol=1e-7)


def test_end_at_moves_the_end_of_the_decay_and_keeps_the_warmup():
    schedule = WarmupSchedule(PEAK, "cosine", total_steps=TOTAL, warmup_steps=WARMUP)
    schedule.end_at(60)  # the decay now spans steps 10..60
    warm, mid, end, after = (float(schedule(step)) for step in (5, 35, 60, 110))
    assert warm == pytest.approx(6e-4, rel=1e-5)  # step 5 of the warmup: 6 / 10 of the peak, as before
    assert mid == pytest.approx(5e-4, rel=1e-4)  # half way through the shorter decay
    assert end == pytest.approx(0.0, abs=1e-9)
    assert after == pytest.approx(0.0, abs=1e-9)
    assert schedule.get_config()["total_steps"] == 60  # a saved model records the decay it ran
    schedule.end_at(3)  # never inside the warmup: the decay keeps at least one step
    assert float(schedule(WARMUP)) == pytest.approx(1e-3, rel=1e-5)
