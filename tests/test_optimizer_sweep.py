"""The optimizer sweep's protocol: grids extend until the best rate is inside, and seed statistics."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import curves  # noqa: E402  (the sweep's flag-free core: importing optimizer_sweep would define absl flags)


@pytest.mark.parametrize("losses, expected", [
    ({1e-3: 2.0, 2e-3: 1.9, 4e-3: 1.8}, 8e-3),   # best at the top edge: go higher
    ({1e-3: 1.7, 2e-3: 1.9, 4e-3: 2.0}, 5e-4),   # best at the bottom edge: go lower
    ({1e-3: 2.0, 2e-3: 1.7, 4e-3: 1.9}, None),   # bracketed
    ({1e-3: 2.0, 2e-3: 1.9, 4e-3: math.nan}, None),  # the top rate diverged: bracketed from above
    ({1e-3: 2.0, 2e-3: 1.9, 4e-3: 1.8, 8e-3: 1.7}, None),  # at the size limit
])
def test_next_rate_extends_the_grid_beyond_the_edge_holding_the_best(losses, expected):
    got = curves.next_rate(losses, max_rates=4)
    assert got == pytest.approx(expected) if expected else got is None


def test_spread_reports_mean_min_max_of_the_seeds_that_reached():
    assert curves.spread([10.0, None, 14.0]) == {"mean": 12.0, "min": 10.0, "max": 14.0, "reached": 2, "of": 3}
    assert curves.spread([None, None])["reached"] == 0


def test_cached_run_computes_once_per_key_and_survives_a_line_cut_by_a_kill(tmp_path):
    path, calls = str(tmp_path / "runs.jsonl"), []

    def compute(value):
        def run():
            calls.append(value)
            return {"final_loss": value}
        return run

    assert curves.cached_run(path, "a", compute(1.0)) == {"final_loss": 1.0}
    assert curves.cached_run(path, "a", compute(9.0)) == {"final_loss": 1.0}  # from the file
    with open(path, "a") as f:
        f.write('{"key": "b", "run": {"final_lo')  # a write cut short
    assert curves.cached_run(path, "b", compute(2.0)) == {"final_loss": 2.0}
    assert curves.cached_run(path, "b", compute(9.0)) == {"final_loss": 2.0}
    assert calls == [1.0, 2.0]
