"""Helpers to run a backend against the shipped vectors."""

from psft_plugin.spec.make_vectors import load

LOSS_CASES = load("psft_loss.json")["cases"]
LOGPROB_CASES = load("token_logprobs.json")["cases"]
DFT_CASES = load("dft_loss.json")["cases"]
DFT_METRICS = ("nll", "weight_mean", "tokens")
METRICS = ("clipfrac", "ratio_mean", "ratio_min", "ratio_max", "approx_kl", "nll", "tokens")
# fp32 backends against a float64 reference on float32 inputs: relative 1e-6 of each value's
# scale (the clamp case reaches ~1e8), the bound.
TOLERANCE = 1e-6


def max_rel_err(actual, expected) -> float:
    import numpy as np

    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = np.maximum(1.0, np.abs(expected))
    return float(np.max(np.abs(actual - expected) / scale, initial=0.0))
