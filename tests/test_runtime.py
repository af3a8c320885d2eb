"""runtime.timed, the one timing loop of the benchmarks and `cgml evaluate`'s MD timing."""
import pytest

from openmm_cgml import runtime


class FakeClock:
    """perf_counter that advances only when the timed work runs (seconds_per_step each)."""

    def __init__(self, seconds_per_step):
        self.now, self.seconds_per_step, self.calls = 0.0, seconds_per_step, []

    def __call__(self):
        return self.now

    def run(self, n):
        self.calls.append(n)
        if len(self.calls) > 50:
            raise RuntimeError(f"timed keeps calling: n = {self.calls[-5:]}")
        self.now += n * self.seconds_per_step


@pytest.mark.parametrize("per_step, expected_n", [(0.8, 2), (0.3, 4), (0.001, 1000), (2.5, 1)])
def test_timed_grows_until_one_call_lasts_min_seconds(monkeypatch, per_step, expected_n):
    clock = FakeClock(per_step)
    monkeypatch.setattr(runtime.time, "perf_counter", clock)
    n, seconds = runtime.timed(clock.run, 1.0)
    assert seconds >= 1.0 and seconds == pytest.approx(n * per_step)
    assert expected_n <= n <= expected_n + 1  # + 1: round-off of n * per_step at the threshold
    # a step just under the minimum once repeated itself forever (n stayed 1)
    assert len(clock.calls) <= 12
