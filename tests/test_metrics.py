"""psft_plugin.metrics: the names, reductions and prefix both backends log with (no framework)."""

import pytest

from psft_plugin.metrics import PREFIX, combine, combine_steps, prefixed, reduction, step_reduction, unprefixed


def test_reductions_by_name_any_other_name_is_a_token_weighted_mean():
    assert [reduction(n) for n in ("ratio_min", "ratio_max", "objective", "tokens", "nll", "my_metric")] == [
        "min",
        "max",
        "sum",
        "sum",
        "mean",
        "mean",
    ]
    assert [step_reduction(n) for n in ("ratio_min", "ratio_max", "objective", "my_metric")] == [
        "min",
        "max",
        "mean",
        "mean",
    ]


def test_combine_weights_means_by_tokens_and_leaves_tokenless_parts_out():
    parts = [
        {"tokens": 1, "nll": 2.0, "my_metric": 10.0, "ratio_min": 0.9, "ratio_max": 1.1, "objective": -0.25},
        {"tokens": 3, "nll": 4.0, "my_metric": 20.0, "ratio_min": 0.8, "ratio_max": 1.3, "objective": -0.75},
        {"tokens": 0, "nll": 0.0, "my_metric": 99.0, "ratio_min": 0.1, "ratio_max": 9.0, "objective": 0.0},
        {"tokens": 2, "nll": 1.0},
    ]  # an SFT part: no ratio metrics
    combined = combine(parts)
    assert combined["tokens"] == 6 and combined["objective"] == pytest.approx(-1.0)
    assert combined["nll"] == pytest.approx((2 + 12 + 2) / 6)
    assert combined["my_metric"] == pytest.approx((10 + 60) / 4)
    assert (combined["ratio_min"], combined["ratio_max"]) == (0.8, 1.3)
    assert combine([{"tokens": 0, "nll": 0.0}]) == {"tokens": 0.0}


def test_steps_of_one_log_line_keep_extremes_and_average_the_rest():
    steps = [
        {"psft/ratio_min": 0.9, "psft/ratio_max": 1.1, "psft/my_metric": 1.0, "psft/objective": -1.0},
        {"psft/ratio_min": 0.7, "psft/ratio_max": 1.2, "psft/my_metric": 3.0},
    ]
    assert combine_steps(steps) == {
        "psft/ratio_min": 0.7,
        "psft/ratio_max": 1.2,
        "psft/my_metric": 2.0,
        "psft/objective": -1.0,
    }


def test_prefix_round_trip_leaves_the_token_weight_out():
    assert prefixed({"tokens": 5.0, "nll": 1.5, "my_metric": 2.0}) == {f"{PREFIX}nll": 1.5, f"{PREFIX}my_metric": 2.0}
    assert unprefixed({"train_loss": 0.1, "psft/nll": 1.5, "psft/my_metric": 2.0}) == {"nll": 1.5, "my_metric": 2.0}
