"""TRL's chunked log-prob kernel against ours: peak memory, time and exactness, forward + backward.

Why this exists: issue 11 asked to reuse ``trl.trainer.patch_chunked_lm_head`` (built on
``_ChunkedLogProbFunction``) if it serves. Both compute per-token log-probs and entropy from
``[N, H]`` hidden states and a ``[V, H]`` head without ``[N, V]`` logits:

- ``trl``: ``_ChunkedLogProbFunction`` (vocabulary chunks of ``trl_chunk`` entries for all N rows,
  online logsumexp, hand-written backward);
- ``ours``: :func:`psft_torch.chunked.head_token_logprobs` (``chunk`` rows at a time through the
  head, recomputed in the backward);
- ``full``: :func:`psft_torch.token_logprobs_and_entropy` on the full ``[N, V]`` logits (the reference
  for the error columns is the same in float64).

Run as a worker with :data:`psft_plugin.bench.memory.WORKER_ENV` (``python -m
psft_plugin.bench.trl_compare``); prints one JSON list. Needs ``trl`` (installed with Axolotl).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from psft_plugin.bench.memory import torch_peak_bytes

PATHS = ("full", "trl", "ours")
TRL_VOCAB_CHUNK = 8192  # the value TRL's AsyncGRPOTrainer passes


def grid(quick: bool) -> list[dict]:
    """(rows N, hidden H, vocab V) points; our row chunk is 1024, TRL's vocabulary chunk 8192."""
    points = [(512, 64, 8192)] if quick else [(4096, 64, 32768), (4096, 64, 131072), (1024, 512, 131072)]
    return [{"rows": n, "hidden": h, "vocab": v, "chunk": 1024, "trl_chunk": TRL_VOCAB_CHUNK} for n, h, v in points]


def _inputs(point: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(point["rows"], point["hidden"], generator=generator)
    weight = torch.randn(point["vocab"], point["hidden"], generator=generator) / point["hidden"] ** 0.5 * 2
    targets = torch.randint(0, point["vocab"], (point["rows"],), generator=generator)
    return hidden, weight, targets


def _forward(path: str, point: dict, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """``([N] log-probs, [N] entropy)`` of one path."""
    if path == "trl":
        import inspect

        from trl.trainer.utils import _ChunkedLogProbFunction

        # TRL 1.14 added a `bias` argument after `weight` (1.9: forward(ctx, hidden, weight, targets, ...)).
        bias = ("bias",) if "bias" in inspect.signature(_ChunkedLogProbFunction.forward).parameters else ()
        return _ChunkedLogProbFunction.apply(
            hidden, weight, *(None for _ in bias), targets, 1.0, point["trl_chunk"], None, 1.0
        )
    if path == "ours":
        from psft_torch.chunked import head_token_logprobs

        logp, entropy = head_token_logprobs(
            lambda rows: F.linear(rows, weight), hidden[None], targets[None], chunk_size=point["chunk"], entropy=True
        )
        return logp[0], entropy[0]
    from psft_torch import token_logprobs_and_entropy

    logp, entropy = token_logprobs_and_entropy(F.linear(hidden, weight)[None], targets[None])
    return logp[0], entropy[0]


def _runner(path: str, point: dict) -> Callable[[], dict]:
    base = _inputs(point)

    def run() -> dict:
        hidden, weight = (t.clone().requires_grad_(True) for t in base[:2])
        logp, entropy = _forward(path, point, hidden, weight, base[2])
        logp.sum().backward()
        return {
            "logp": logp.detach(),
            "entropy": entropy.detach(),
            "hidden_grad": hidden.grad,
            "weight_grad": weight.grad,
        }

    return run


def _reference(point: dict, rows: int = 256) -> dict:
    """The same quantities in float64, exact formulas, ``rows`` rows at a time (bounded memory).

    d(sum logp)/d logits = onehot - softmax, so grad_h = g @ W and grad_W = g^T @ h.
    """
    hidden, weight, targets = (t.double() if t.is_floating_point() else t for t in _inputs(point))
    out = {"logp": [], "entropy": [], "hidden_grad": [], "weight_grad": torch.zeros_like(weight)}
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        log_softmax = torch.log_softmax(h @ weight.T, -1)
        probs = log_softmax.exp()
        out["logp"].append(log_softmax.gather(-1, t[:, None])[:, 0])
        out["entropy"].append(-(probs * log_softmax).sum(-1))
        grad = probs.neg_().scatter_add_(-1, t[:, None], torch.ones_like(h[:, :1]))
        out["hidden_grad"].append(grad @ weight)
        out["weight_grad"] += grad.T @ h
    return {key: torch.cat(value) if isinstance(value, list) else value for key, value in out.items()}


def measure(quick: bool) -> list[dict]:
    """One row per (point, path): peak bytes, median seconds of forward + backward, max errors vs float64."""
    rows = []
    for point in grid(quick):
        reference = _reference(point)
        for path in PATHS:
            run = _runner(path, point)
            result = run()  # warm-up, and the values checked below
            errors = {f"err_{key}": (result[key].double() - reference[key]).abs().max().item() for key in reference}
            peak = torch_peak_bytes(run)
            seconds = []
            for _ in range(2):
                tic = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - tic)
            rows.append(
                {
                    "path": path,
                    **point,
                    "peak_bytes": peak,
                    "seconds": statistics.median(seconds),
                    **errors,
                    "logits_fp32_bytes": 4 * point["rows"] * point["vocab"],
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    """One line per (point, path)."""
    lines = ["rows  hidden   vocab  path  peak/[N,V]fp32  seconds  max|dlogp|  max|dH|  max|dgrad_h|  max|dgrad_W|"]
    for r in rows:
        lines.append(
            f"{r['rows']:4d} {r['hidden']:7d} {r['vocab']:7d}  {r['path']:4s} "
            f"{r['peak_bytes'] / r['logits_fp32_bytes']:15.2f} {r['seconds']:8.3f} {r['err_logp']:11.2e} "
            f"{r['err_entropy']:8.2e} {r['err_hidden_grad']:13.2e} {r['err_weight_grad']:13.2e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(measure("--quick" in sys.argv)))
