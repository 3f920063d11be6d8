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


def test_rows_are_sized_from_the_data_where_the_kernel_computes_the_whole_row():
    from tuneforge.spec.hyperparameters import packed_row_length

    short = [60, 70, 80, 90] * 100
    row, why = packed_row_length(short, 2048, "sdpa")
    assert row == 320 and "4 average examples" in why  # 4 x 75 tokens, to a multiple of 64
    assert packed_row_length(short, 2048, "flash_attention_2")[0] == 2048  # varlen costs per example
    assert packed_row_length(short + [1500], 2048, "eager")[0] == 1536  # never shorter than the longest
    assert packed_row_length([1800, 1900], 2048, "sdpa")[0] == 2048  # capped at max_seq_length
    varied = [random.Random(0).randint(40, 110) for _ in range(400)]
    row = packed_row_length(varied, 2048, "sdpa")[0]
    assert sum(varied) / (len(best_fit_decreasing(varied, row)) * row) > 0.9  # rows of ~4 examples still fill
