"""PyTorch backend of psft-plugin: the PSFT loss and a trainer mixin for transformers.

Never imports mlx.
"""

from psft_torch.loss import aggregate_weights, ce_loss, psft_ce_weights, psft_loss, token_entropy, token_logprobs

__all__ = ["aggregate_weights", "ce_loss", "psft_ce_weights", "psft_loss", "token_entropy", "token_logprobs"]
