"""MLX backend of psft-plugin: the PSFT loss and an mlx-lm training loop. Never imports torch."""

from psft_mlx.loss import aggregate_weights, ce_loss, dft_loss, psft_loss, token_entropy, token_logprobs

__all__ = ["aggregate_weights", "ce_loss", "dft_loss", "psft_loss", "token_entropy", "token_logprobs"]
