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
    assert best_fit_decreasing([11, 6, 4, 12], 10, longer_alone=True) == [[3], [0], [1, 2]]


def test_real_token_fraction():
    assert real_token_fraction([10, 5, 5, 5], 2) == pytest.approx(25 / 30)
    assert real_token_fraction([10, 10], 2, pad_to=20) == pytest.approx(0.5)


def test_rows_are_sized_from_the_data_where_the_kernel_computes_the_whole_row():
    from tuneforge.spec.hyperparameters import packed_row_length

    short = [60, 70, 80, 90] * 100
    row, why = packed_row_length(short, 2048, "sdpa")
    assert row == 320 and "4 average examples" in why  # 4 x 75 tokens, to a multiple of 64
    assert packed_row_length(short, 2048, "flash_attention_2")[0] == 2048  # varlen costs per example
    row, why = packed_row_length(short + [1500], 2048, "eager")  # one long example does not stretch every row
    assert row == 320 and "1 longer example in rows of their own" in why
    assert packed_row_length([1800, 1900], 2048, "sdpa")[0] == 2048  # capped at max_seq_length
    varied = [random.Random(0).randint(40, 110) for _ in range(400)]
    row = packed_row_length(varied, 2048, "sdpa")[0]
    assert sum(varied) / (len(best_fit_decreasing(varied, row)) * row) > 0.9  # rows of ~4 examples still fill


def test_sdpa_rows_stop_growing_where_attention_passes_its_share_of_the_matmuls():
    from tuneforge.planner.models import PRESETS
    from tuneforge.spec.hyperparameters import packed_row_length, sdpa_row_cap

    smollm = PRESETS["smollm2-135m"]
    cap = sdpa_row_cap(smollm.active_matmul_params, smollm.hidden_size, smollm.num_layers)
    assert cap == 576  # 0.15 x 2 x 134M / (4 x 576 x 30), to a multiple of 64
    big = PRESETS["llama-3-8b"]
    assert sdpa_row_cap(big.active_matmul_params, big.hidden_size, big.num_layers) > 4000  # big models: long rows pay
    assert sdpa_row_cap(200_000, 64, 2) == 512  # never below MIN_ROW_CAP (tiny test models)
    rng = random.Random(1)
    long_chats = [rng.randint(200, 700) for _ in range(100)]  # ~450 tokens: 4 of them is 1800
    row, why = packed_row_length(long_chats, 2048, "sdpa", row_cap=cap)
    longer = sum(1 for n in long_chats if n > row)
    assert row == 576 and "at most 576 tokens" in why and f"{longer} longer examples in rows of their own" in why
    rows = best_fit_decreasing(long_chats, row, longer_alone=True)
    assert sorted(i for r in rows for i in r) == list(range(100))
    assert all(sum(long_chats[i] for i in r) <= row or len(r) == 1 for r in rows)
