"""The built-in objectives, registered as pluggy hook implementations.

``ce``, ``psft`` and ``dft`` live in their own plugin objects so that each can be declared under its own
name in the ``psft_plugin.objectives`` entry-point group, like any third-party objective.
"""

from __future__ import annotations

from psft_plugin.hookspecs import hookimpl
from psft_plugin.objective import Objective
from psft_plugin.options import Option
from psft_plugin.spec import AGGREGATIONS, EPSILON_HIGH, EPSILON_HIGH_MIN, EPSILON_LOW, EPSILON_LOW_RANGE

AGGREGATION_OPTION = Option(
    "psft_loss_agg",
    "token-mean",
    "how per-token losses are averaged over the optimizer step",
    loss_arg="agg",
    type=str,
    choices=AGGREGATIONS,
)

REFRESH_KEY = "psft_refresh_steps"
WARMUP_KEY = "psft_warmup_steps"

PSFT_OPTIONS = (
    Option(
        "psft_epsilon_low",
        EPSILON_LOW,
        "lower clip: ratio floor is 1 - eps (acts only where advantages < 0)",
        loss_arg="epsilon_low",
        ge=EPSILON_LOW_RANGE[0],
        lt=EPSILON_LOW_RANGE[1],
    ),
    Option(
        "psft_epsilon_high",
        EPSILON_HIGH,
        "upper clip: ratio ceiling is 1 + eps",
        loss_arg="epsilon_high",
        ge=EPSILON_HIGH_MIN,
    ),
    Option(REFRESH_KEY, 8, "optimizer steps per old-policy refresh (K); 1 makes PSFT equal SFT", type=int, ge=1),
    Option(WARMUP_KEY, 0, "plain SFT optimizer steps before PSFT starts", type=int, ge=0),
    AGGREGATION_OPTION,
)

LM_HEAD_CHUNK_KEY = "psft_lm_head_chunk_size"

TRAINER_OPTIONS = (
    Option(
        LM_HEAD_CHUNK_KEY,
        0,
        "tokens per LM-head chunk: N > 0 applies the LM head to N response tokens at a "
        "time, so no [B, T, V] logits exist (forward or backward); 0 builds the full logits (torch trainer only)",
        type=int,
        ge=0,
    ),
)
"""Options the trainer reads for every objective (built-in or third-party), not passed to any loss.

They change how the per-token log-probs are computed, not what is optimised, so they belong to the
trainer rather than to one objective: the registry lists them with every objective's own options.
"""

CE = Objective(
    name="ce",
    description="plain cross-entropy (SFT), averaged over the optimizer step's response tokens",
    implementations={
        "numpy": "psft_plugin.spec:ce_loss",
        "torch": "psft_torch.loss:ce_loss",
        "mlx": "psft_mlx.loss:ce_loss",
    },
    options=(AGGREGATION_OPTION,),
)

PSFT = Objective(
    name="psft",
    description="Proximal SFT: clipped importance ratio against an old policy refreshed every K steps",
    implementations={
        "numpy": "psft_plugin.spec:psft_loss",
        "torch": "psft_torch.loss:psft_loss",
        "mlx": "psft_mlx.loss:psft_loss",
    },
    options=PSFT_OPTIONS,
    uses_old_policy=True,
)

DFT = Objective(
    name="dft",
    description="Dynamic Fine-Tuning (Wu et al., arXiv 2508.05629): cross-entropy with each token's loss "
    "weighted by its detached probability, -stopgrad(p) * log p",
    implementations={
        "numpy": "psft_plugin.spec:dft_loss",
        "torch": "psft_torch.loss:dft_loss",
        "mlx": "psft_mlx.loss:dft_loss",
    },
    options=(AGGREGATION_OPTION,),
)


class _Provides:
    """A plugin object answering ``psft_plugin_objectives`` with one objective."""

    def __init__(self, objective: Objective):
        self.objective = objective

    @hookimpl
    def psft_plugin_objectives(self) -> list[Objective]:
        return [self.objective]


ce = _Provides(CE)
psft = _Provides(PSFT)
dft = _Provides(DFT)
BUILTIN_PLUGINS = {"ce": ce, "psft": psft, "dft": dft}
