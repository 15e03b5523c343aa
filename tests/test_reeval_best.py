"""benchmarks/reeval_best.py: which trials are re-scored, and the table it writes."""

from __future__ import annotations

from bench_modules import load_benchmark

RB = load_benchmark("reeval_best")


def test_markdown_marks_both_picks_and_the_paired_rows():
    paired = {"mean_diff": -0.009, "ci95": [-0.017, -0.002], "t_p": 0.024}
    out = {"run": "r", "command": "c", "top": 2, "confirm_seeds": [101, 102], "settings": {"s": {
        "search_best_trial": 7, "named_trial": 9, "seconds": 12.0,
        "candidates": [{"trial": 7, "search_area": 0.84, "confirmation_area": 0.82, "baseline": None},
                       {"trial": 9, "search_area": 0.83, "confirmation_area": 0.83, "baseline": "all-epsilon"}],
        "held_out": {"re-evaluated": [0.83, 0.83], "optimised": [0.82, 0.82], "lrp-epsilon": [0.83, 0.83]},
        "re-evaluated − lrp-epsilon": dict(paired, mean_diff=0.0), "optimised − lrp-epsilon": paired}}}
    text = RB.markdown(out)
    assert "| 7 | 0.8400 | 0.8200 | named by the search |" in text
    assert "| 9 | 0.8300 | 0.8300 | named after re-scoring (all-epsilon) |" in text
    assert "-0.0090 [-0.0170, -0.0020], p 0.024" in text
