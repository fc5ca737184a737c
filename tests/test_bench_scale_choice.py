"""bench_real's scale chooser: the best scale on validation, widened past an end only where the score climbs there."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_real.py"


def _choose_scale():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench_real_for_scales", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._choose_scale


def test_the_grid_widens_toward_a_climbing_end_and_never_on_a_flat_score(capsys):
    choose = _choose_scale()
    tried: list[float] = []

    def score(peak: float):  # noqa: ANN202
        def at(scale: float) -> float:
            tried.append(scale)
            return -abs(scale - peak)

        return at

    assert choose(score(1.0), [0.5, 1.0, 2.0]) == 1.0 and tried == [0.5, 1.0, 2.0]  # inside: nothing more
    tried.clear()
    assert choose(score(4.0), [0.5, 1.0, 2.0]) == 4.5 and tried == [0.5, 1.0, 2.0, 3.0, 4.5, 6.75]
    tried.clear()
    assert choose(score(0.3), [0.5, 1.0, 2.0]) == 0.3333 and tried[3:] == [0.3333, 0.2222]
    tried.clear()
    assert choose(lambda s: tried.append(s) or 0.8, [0.5, 1.0, 2.0]) == 0.5 and tried == [0.5, 1.0, 2.0]  # flat
    assert "validation mean" in capsys.readouterr().out
