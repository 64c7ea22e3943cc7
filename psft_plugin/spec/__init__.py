"""The objectives written once, in NumPy: the reference every backend reproduces."""

from psft_plugin.spec.reference import (
    AGGREGATIONS,
    EPSILON_HIGH,
    EPSILON_HIGH_MIN,
    EPSILON_LOW,
    EPSILON_LOW_RANGE,
    IGNORE_INDEX,
    LOG_RATIO_CLAMP,
    aggregate_weights,
    ce_loss,
    check_hyperparameters,
    dft_loss,
    dft_loss_and_grad,
    psft_loss,
    psft_loss_and_grad,
    token_entropy,
    token_logprobs,
)

__all__ = [
    "AGGREGATIONS",
    "EPSILON_HIGH",
    "EPSILON_HIGH_MIN",
    "EPSILON_LOW",
    "EPSILON_LOW_RANGE",
    "IGNORE_INDEX",
    "LOG_RATIO_CLAMP",
    "aggregate_weights",
    "ce_loss",
    "check_hyperparameters",
    "dft_loss",
    "dft_loss_and_grad",
    "psft_loss",
    "psft_loss_and_grad",
    "token_entropy",
    "token_logprobs",
]
