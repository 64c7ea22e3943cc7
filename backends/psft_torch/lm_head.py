"""Logits-free log-probs inside the model's own forward (``psft_lm_head_chunk_size: N``).

:func:`install_chunked_head` patches two instance attributes of a causal LM (the model under a
PEFT wrapper, if any), as TRL's ``patch_chunked_lm_head`` does for ``forward``:

- the model's ``forward`` accepts ``psft_lm_head_targets`` (``[B, T]``, aligned as in
  :func:`psft_torch.trainer.aligned_targets`) and ``psft_lm_head_entropy``. Without them it is the
  model's own forward, unchanged (generation, plain evaluation, saving). With them it runs the
  model's own forward, during which its output-embeddings module (``lm_head``) only records the
  hidden states it is given and returns an empty ``[B, T, 0]`` tensor; then, still inside the
  forward, the head is applied to the positions that have a target, ``N`` at a time
  (:func:`psft_torch.chunked.head_token_logprobs`), and the output carries ``psft_logp`` and
  ``psft_entropy`` (``[B, T]`` float32) instead of ``logits``.
- the head's ``forward`` does that recording while a targeted forward runs.

Why this shape:

- Data parallel wrappers (DDP, FSDP2, DeepSpeed) wrap the model's ``forward``; the log-probs are
  outputs of that forward, so the wrappers' backward hooks see them.
- Every chunk calls the head *module* (``head(rows)``), also when the backward recomputes it:
  a LoRA adapter or ``modules_to_save`` copy on the head applies (reading ``lm_head.weight``
  would drop it), tied embeddings need nothing special, and ZeRO-3 (or an FSDP2 unit around the
  head) gathers the parameters for each call, inside the call, where they are valid.
- Gathering is a collective, so under a sharded engine every rank must call the head the same
  number of times: the chunk count is all-reduced (max) first and short ranks add zero-valued calls.
- The model's logit transform after the head (Gemma's ``final_logit_softcapping``, Cohere's
  ``logit_scale``, Granite's ``logits_scaling``) is applied to each chunk; on the first targeted
  forward the head returns real logits for a few positions, and the model's own output for them
  is compared with ours, so any other transform stops the run with its name instead of training
  on wrong log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from psft_plugin.objectives import LM_HEAD_CHUNK_KEY
from psft_torch.chunked import chunk_count, head_token_logprobs

TARGETS_KWARG = "psft_lm_head_targets"
ENTROPY_KWARG = "psft_lm_head_entropy"
LOGP_KEY, ENTROPY_KEY = "psft_logp", "psft_entropy"
PROBE_POSITIONS = 8
KNOWN_TRANSFORMS = ("logit_scale", "logits_scaling", "final_logit_softcapping")
_NOT_OUTPUT_TRANSFORMS = ("attn_logit_softcapping", "output_logits", "router_logits")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``forward`` calls the LM head: the model itself, or the one under PEFT."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not callable(getattr(base, "get_output_embeddings", None)) or base.get_output_embeddings() is None:
        raise ValueError(
            f"`{LM_HEAD_CHUNK_KEY}` needs a causal LM with an output-embeddings module (`lm_head`); "
            f"{type(base).__name__} has none. Set `{LM_HEAD_CHUNK_KEY}: 0`."
        )
    return base


def logit_transform(lm: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's own map from ``lm_head`` output to logits, for the transforms we know.

    Same operations in the same order and dtype as the transformers models, so the result is
    bitwise the model's. The first targeted forward checks it against the model (see the module doc).
    """
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    scale = getattr(lm, "logit_scale", None)  # Cohere keeps config.logit_scale as a float attribute
    scale = scale if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None
    divide = getattr(text, "logits_scaling", None)  # Granite
    cap = getattr(text, "final_logit_softcapping", None)  # Gemma 2/3/4

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def _suspects(lm: torch.nn.Module) -> list[str]:
    """Config keys that look like logit transforms (for the error message when the probe fails)."""
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return sorted(
        key
        for key, value in text.to_dict().items()
        if value is not None and ("logit" in key or "softcap" in key) and key not in _NOT_OUTPUT_TRANSFORMS
    )


@dataclass
class _Call:
    """What the head saw during one targeted forward."""

    probe: bool
    hidden: Optional[torch.Tensor] = None
    raw: Optional[torch.Tensor] = None
    calls: int = 0


def _max_chunks(count: int, device: torch.device) -> int:
    """The largest chunk count over all ranks (one small all-reduce)."""
    total = torch.tensor([count], device=device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    return int(total.item())


class ChunkedHead:
    """The patch installed on one causal LM by :func:`install_chunked_head`."""

    def __init__(self, lm: torch.nn.Module, chunk_size: int, balance_chunks: bool):
        self.lm, self.head = lm, lm.get_output_embeddings()
        self.chunk_size, self.balance_chunks = chunk_size, balance_chunks
        self.transform = logit_transform(lm)
        self.checked = False
        self._call: Optional[_Call] = None
        self._model_forward, self._head_forward = lm.forward, self.head.forward
        patch = self

        def model_forward(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return patch.forward(*args, **kwargs)

        def head_forward(module: torch.nn.Module, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return patch.record(hidden, *args, **kwargs)

        # MethodType (not a closure): accelerate's autocast wrapper re-binds `forward.__func__`. The
        # original signature is kept: transformers.Trainer drops dataset columns it does not name.
        for module, patched, original in (
            (lm, model_forward, self._model_forward),
            (self.head, head_forward, self._head_forward),
        ):
            module.forward = types.MethodType(functools.wraps(getattr(original, "__func__", original))(patched), module)

    def remove(self) -> None:
        """Restore both original forwards."""
        for module, original in ((self.lm, self._model_forward), (self.head, self._head_forward)):
            if getattr(original, "__self__", None) is module and original.__func__ is type(module).forward:
                del module.forward  # it was the class's method: drop the instance attribute
            else:
                module.forward = original
        del self.lm._psft_chunked_head

    @staticmethod
    def forward_kwargs(targets: torch.Tensor, entropy: bool) -> dict[str, Any]:
        """The model-call keyword arguments that ask for chunked log-probs of ``[B, T]`` targets."""
        return {TARGETS_KWARG: targets, ENTROPY_KWARG: entropy}

    def record(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The head's forward: the real one, except inside a targeted model forward."""
        call = self._call
        if call is None:
            return self._head_forward(hidden, *args, **kwargs)
        call.calls += 1
        if call.calls == 1:
            call.hidden = hidden
            if call.probe:
                with torch.no_grad():
                    call.raw = self._head_forward(hidden[:1, :PROBE_POSITIONS], *args, **kwargs)
                return call.raw
        return hidden.new_zeros(*hidden.shape[:-1], 0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; with :data:`TARGETS_KWARG`, log-probs instead of logits."""
        targets, entropy = kwargs.pop(TARGETS_KWARG, None), bool(kwargs.pop(ENTROPY_KWARG, False))
        if targets is None:
            return self._model_forward(*args, **kwargs)
        call = self._call = _Call(probe=not self.checked)
        try:
            outputs = self._model_forward(*args, **kwargs)
        finally:
            self._call = None
        self._check(call, outputs, targets)
        chunks = chunk_count(targets, self.chunk_size)
        if self.balance_chunks and torch.distributed.is_available() and torch.distributed.is_initialized():
            chunks = _max_chunks(chunks, targets.device)
        logp, ent = head_token_logprobs(
            lambda rows: self.transform(self.head(rows)),
            call.hidden,
            targets,
            chunk_size=self.chunk_size,
            entropy=entropy,
            chunks=chunks,
        )
        fields = {key: value for key, value in outputs.items() if key != "logits" and key in _fields(outputs)}
        return with_logprob_fields(type(outputs))(**fields, **{LOGP_KEY: logp, ENTROPY_KEY: ent})

    def _check(self, call: _Call, outputs: Any, targets: torch.Tensor) -> None:
        """Stop with the reason when the forward did not go through the head as expected."""
        name = type(self.lm).__name__
        if not hasattr(outputs, "items"):
            raise RuntimeError(
                f"`{LM_HEAD_CHUNK_KEY}`: {name} returned a {type(outputs).__name__}, not a ModelOutput "
                f"(`return_dict=False`?); call it with return_dict=True or set `{LM_HEAD_CHUNK_KEY}: 0`"
            )
        if call.calls != 1:
            raise RuntimeError(
                f"`{LM_HEAD_CHUNK_KEY}`: {name}'s forward called its LM head {call.calls} times (expected once); a fused "
                f"kernel replaced it (cut_cross_entropy, Liger) or the model has extra heads. Set `{LM_HEAD_CHUNK_KEY}: 0`."
            )
        if call.hidden.shape[:2] != targets.shape:
            raise RuntimeError(
                f"`{LM_HEAD_CHUNK_KEY}`: the LM head got {tuple(call.hidden.shape[:2])} positions but the "
                f"labels cover {tuple(targets.shape)} (`logits_to_keep`?); pass every position"
            )
        if call.probe:
            self._probe(call.raw, outputs.get("logits"))

    def _probe(self, raw: torch.Tensor, logits: Optional[torch.Tensor]) -> None:
        """Compare our transform of the head's output with the model's logits for the same positions."""
        ours = self.transform(raw)
        same = (
            logits is not None
            and logits.shape == ours.shape
            and torch.allclose(ours.float(), logits.float(), rtol=1e-3, atol=1e-3)
        )
        if not same:
            gap = (
                "shapes differ"
                if logits is None or logits.shape != ours.shape
                else f"max |difference| {(ours.float() - logits.float()).abs().max().item():.3g}"
            )
            raise RuntimeError(
                f"`{LM_HEAD_CHUNK_KEY}`: {type(self.lm).__name__} changes its logits after the LM head in a way the chunked "
                f"path does not reproduce ({gap}; it applies {', '.join(KNOWN_TRANSFORMS)}; this config sets "
                f"{', '.join(_suspects(self.lm)) or 'no such key'}). Set `{LM_HEAD_CHUNK_KEY}: 0` for this model."
            )
        self.checked = True


@functools.lru_cache(maxsize=None)
def with_logprob_fields(output_type: type) -> type:
    """``output_type`` (a ModelOutput dataclass) with ``psft_logp`` and ``psft_entropy`` as dataclass fields.

    Fields, not extra keys: FSDP2 registers its pre-backward hook (which all-gathers the root's
    parameters, the LM head's included) only on the grad-requiring tensors it finds in a dataclass
    output's *fields*. With the log-probs stored as extra keys the hook never fired, and the
    backward's recomputation of a chunk met the head's weight still sharded ("mixed torch.Tensor
    and DTensor", root with ``reshard_after_forward: true``).
    """
    if not dataclasses.is_dataclass(output_type):
        return output_type  # a plain mapping: keys are all there is
    return dataclasses.make_dataclass(
        f"{output_type.__name__}WithLogprobs",
        [(LOGP_KEY, Optional[torch.Tensor], None), (ENTROPY_KEY, Optional[torch.Tensor], None)],
        bases=(output_type,),
        namespace={"__module__": __name__},
    )


def _fields(outputs: Any) -> set[str]:
    """Constructor fields of a ModelOutput dataclass (all keys for a plain mapping)."""
    names = getattr(type(outputs), "__dataclass_fields__", None)
    return set(names) if names is not None else set(outputs.keys())


def install_chunked_head(model: torch.nn.Module, chunk_size: int, balance_chunks: bool = False) -> ChunkedHead:
    """Patch ``model`` (or the causal LM under its PEFT wrapper) for chunked log-probs; idempotent.

    ``balance_chunks``: all-reduce the number of head calls across ranks (needed under ZeRO-3 and
    FSDP, where every call gathers parameters collectively).
    """
    lm = causal_lm(model)
    existing = getattr(lm, "_psft_chunked_head", None)
    if existing is not None:
        existing.chunk_size, existing.balance_chunks = chunk_size, balance_chunks
        return existing
    lm._psft_chunked_head = ChunkedHead(lm, chunk_size, balance_chunks)
    return lm._psft_chunked_head


def remove_chunked_head(model: torch.nn.Module) -> None:
    """Undo :func:`install_chunked_head` (a no-op when it was never installed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    existing = getattr(base, "_psft_chunked_head", None)
    if existing is not None:
        existing.remove()
