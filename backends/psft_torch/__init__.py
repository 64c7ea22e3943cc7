"""PyTorch backend of psft-plugin: the PSFT loss and a trainer mixin for transformers.

Never imports mlx.
"""

from psft_torch.loss import (
    aggregate_weights,
    ce_loss,
    dft_loss,
    psft_ce_weights,
    psft_loss,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)

__all__ = [
    "aggregate_weights",
    "ce_loss",
    "dft_loss",
    "psft_ce_weights",
    "psft_loss",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
