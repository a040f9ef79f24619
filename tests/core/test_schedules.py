import pytest

from gen3d.schedules import check_schedule, schedule_value


def test_constant_and_linear_forms():
    assert schedule_value(0.5, 100, 1000) == 0.5
    assert schedule_value([1.0, 3.0, 100], 50, 1000) == pytest.approx(2.0)  # [v0, v1, end]
    assert schedule_value([100, 1.0, 3.0, 200], 50, 1000) == 1.0  # before start
    assert schedule_value([100, 1.0, 3.0, 200], 150, 1000) == pytest.approx(2.0)
    assert schedule_value([100, 1.0, 3.0, 200], 500, 1000) == 3.0


def test_fraction_positions_follow_the_run_length():
    s = [0.0, 0.98, 0.02, 1.0]  # float positions: fractions of max_steps
    assert schedule_value(s, 0, 500) == pytest.approx(0.98)
    assert schedule_value(s, 250, 500) == pytest.approx(0.5)
    assert schedule_value(s, 500, 500) == pytest.approx(0.02)
    assert schedule_value(s, 1000, 2000) == pytest.approx(0.5)


def test_piecewise():
    s = [0, 0.0, 10, 1.0, 20, 0.0]
    assert schedule_value(s, 5, 100) == pytest.approx(0.5)
    assert schedule_value(s, 15, 100) == pytest.approx(0.5)
    assert schedule_value(s, 30, 100) == 0.0


@pytest.mark.parametrize("bad", [[1, 2], [1, 2, 3, 4, 5], "x", [1, "a", 3]])
def test_invalid_schedules(bad):
    with pytest.raises(ValueError):
        check_schedule(bad, "min_step_percent")
