"""pxopt.latency: interleaved timing with warm-up, medians and spread (deterministic clock)."""

from __future__ import annotations

import pytest
import torch

from pxopt.errors import ConfigError
from pxopt.latency import Latency, compare_latency, latency_threads


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_models(clock: FakeClock, costs: dict[str, list[float]], log: list[str]):
    """Models that advance the clock by their next cost (seconds) and log each call."""
    iters = {name: iter(c) for name, c in costs.items()}

    def make(name: str):
        def model(x):
            log.append(name)
            clock.now += next(iters[name])
            return x
        return model

    return {name: make(name) for name in costs}


def test_interleaved_after_warmup_with_median_and_quartiles() -> None:
    clock, log = FakeClock(), []
    # 2 warm-up calls each (untimed: 9 s would dominate any statistic), then 5 samples of one call
    costs = {"a": [9.0, 9.0, 0.010, 0.012, 0.011, 0.050, 0.013],
             "b": [9.0, 9.0, 0.020, 0.021, 0.022, 0.023, 0.100]}
    stats = compare_latency(fake_models(clock, costs, log), torch.zeros(1), warmup=2, repeats=5,
                            min_sample_s=0.0, clock=clock, threads=1)
    assert log == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    a, b = stats["a"], stats["b"]
    assert (a.runs, a.number, a.threads) == (5, 1, 1)
    assert a.median_ms == pytest.approx(12.0) and b.median_ms == pytest.approx(22.0)
    assert (a.q1_ms, a.q3_ms) == pytest.approx((11.0, 13.0))
    assert (a.min_ms, a.max_ms) == pytest.approx((10.0, 50.0))
    assert (b.min_ms, b.max_ms) == pytest.approx((20.0, 100.0))
    assert str(a) == "12 ms [11-13]"


def test_inner_loop_sized_from_the_fastest_model() -> None:
    clock, log = FakeClock(), []
    costs = {"fast": [0.001] * 1000, "slow": [0.004] * 1000}
    stats = compare_latency(fake_models(clock, costs, log), torch.zeros(1), warmup=1, repeats=3,
                            min_sample_s=0.01, clock=clock, threads=1)
    assert stats["fast"].number == stats["slow"].number == 10  # 0.01 s / 0.001 s
    assert stats["fast"].median_ms == pytest.approx(1.0) and stats["slow"].median_ms == pytest.approx(4.0)
    assert log.count("fast") == log.count("slow") == 1 + 3 * 10


def test_threads_set_while_timing_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    seen = []
    compare_latency({"m": lambda x: seen.append(torch.get_num_threads())}, torch.zeros(1),
                    threads=3, warmup=1, repeats=2, min_sample_s=0.0)
    assert set(seen) == {3} and torch.get_num_threads() == before
    monkeypatch.setenv("PXOPT_THREADS", "2")
    assert latency_threads(None) == 2 and latency_threads(4) == 4
    monkeypatch.delenv("PXOPT_THREADS")
    assert latency_threads(None) == 1
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        latency_threads(0)
    monkeypatch.setenv("PXOPT_THREADS", "many")
    with pytest.raises(ConfigError, match="PXOPT_THREADS"):
        latency_threads(None)


def test_a_failing_model_restores_threads() -> None:
    before = torch.get_num_threads()

    def broken(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compare_latency({"m": broken}, torch.zeros(1), threads=2)
    assert torch.get_num_threads() == before


def test_single_sample_and_round_trip() -> None:
    t = Latency.from_samples([2.0], number=1, threads=1)
    assert (t.median_ms, t.q1_ms, t.q3_ms) == (2.0, 2.0, 2.0)
    assert Latency(**t.to_dict()) == t
