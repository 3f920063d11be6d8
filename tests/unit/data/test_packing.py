import random

import pytest

from tuneforge.data.packing import best_fit_decreasing, real_token_fraction


def test_best_fit_decreasing_packs_every_example_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(2000)]
    rows = best_fit_decreasing(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(2000))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    # Near the lower bound of rows that could possibly hold the tokens.
    assert len(rows) <= sum(lengths) / 512 * 1.02 + 1
    assert best_fit_decreasing(lengths, 512) == rows  # deterministic


def test_best_fit_picks_the_fullest_row_that_fits():
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="cannot be packed"):
        best_fit_decreasing([11], 10)


def test_real_token_fraction():
    assert real_token_fraction([10, 5, 5, 5], 2) == pytest.approx(25 / 30)
    assert real_token_fraction([10, 10], 2, pad_to=20) == pytest.approx(0.5)
