"""benchmarks/timing.py's alternating order: what the soak's restore and the tokenizer benchmark's
encode comparisons rely on to cancel first-run effects."""

import importlib.util
import os

_TIMING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "timing.py")
_spec = importlib.util.spec_from_file_location("benchmark_timing", _TIMING)
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)  # a script folder, not a package: not put on sys.path for the whole suite


def test_time_alternating_reverses_the_order_every_other_round():
    calls = []

    def case(name):
        def run():
            calls.append(name)
            return f"{name}{calls.count(name)}"  # the n-th result of this case
        return run

    results = timing.time_alternating({"a": case("a"), "b": case("b"), "c": case("c")}, rounds=4)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert results == {name: [f"{name}{i}" for i in range(1, 5)] for name in "abc"}
