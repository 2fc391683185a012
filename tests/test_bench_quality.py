"""bench/quality.py's check of the family curve against the line between trained neighbours."""

from __future__ import annotations

import pytest

from bench.quality import chord_gaps, line_check


def row(fraction: float, blocks: list[float]) -> dict:
    return {"fraction": fraction, "blocks": blocks, "loss": sum(blocks) / len(blocks)}


def test_a_budget_that_exports_its_neighbours_sub_model_is_on_the_line_in_size_not_in_budget():
    """Trained 0.5 (exports 0.55 of the parent, loss 4) and the full model (loss 2). Grid budget 0.75 exports
    the 0.5 sub-model again: in budget it is 1 nat above the line (3 there); in size it *is* that point."""
    trained, full = row(0.55, [4.0, 4.2]), row(1.0, [2.0, 2.2])
    res = {"rows": {"0.5": trained}, "grid": {"0.5": trained, "0.75": trained, "0.9": row(0.82, [2.5, 2.7]), "1": full}}
    by_budget = {c["budget"]: c for c in line_check(res, [0.5])}
    by_size = {c["budget"]: c for c in line_check(res, [0.5], x="size")}
    assert by_budget[0.75]["above_line"] == pytest.approx(1.0)
    assert by_size[0.75]["above_line"] == pytest.approx(0.0)
    assert by_size[0.75]["se"] == pytest.approx(0.0)
    # 0.9 exports 0.82 of the parent (loss 2.6): the line is at 4.1 - 2 * 0.4 / 0.5 = 2.5 at budget 0.9, and at
    # 4.1 - 2 * (0.82 - 0.55) / 0.45 = 2.9 at size 0.82
    assert by_budget[0.9]["above_line"] == pytest.approx(0.1)
    assert by_size[0.9]["above_line"] == pytest.approx(-0.3)
    assert by_budget[0.5]["above_line"] == by_size[1.0]["above_line"] == 0.0


def test_chord_gaps_of_a_parabola():
    """Loss (x - 1.2)^2 at sizes 0.5, 0.7, 0.9 and the full model: each inner point lies h1 * h2 below the chord
    of its neighbours (h the distances to them), and that chord's midpoint gap to the curve is a quarter of it
    when the spacing is even."""
    f = lambda x: (x - 1.2) ** 2
    res = {"rows": {f"{b:g}": row(x, [f(x)]) for b, x in ((0.5, 0.5), (0.625, 0.7), (0.75, 0.9))},
           "grid": {"1": row(1.0, [f(1.0)])}}
    gaps = dict(chord_gaps(res, [0.5, 0.625, 0.75]))
    assert gaps[0.625] == pytest.approx(0.2 * 0.2)
    assert gaps[0.75] == pytest.approx(0.2 * 0.1)
    midpoint = (f(0.5) + f(0.7)) / 2 - f(0.6)  # adjacent chord's gap at its middle: a quarter of the outer one's
    assert midpoint == pytest.approx(gaps[0.625] / 4)
