"""Peak memory of the log-prob path (forward + backward) against sequence length and vocabulary.

Three paths, each from hidden states ``[1, T, H]`` and an LM head ``[V, H]``:

- ``naive``: ``log_softmax(logits).gather(targets)``, autograd keeps the log_softmax output;
- ``ours``: :func:`token_logprobs` of the backend on the full logits;
- ``chunked``: :func:`chunked_token_logprobs`, never holding ``[T, V]`` float32 logits.

Run as a worker, one backend per process (``python -m psft_plugin.bench.logprob torch``),
with :data:`psft_plugin.bench.memory.WORKER_ENV` set; it prints one JSON list.
"""

from __future__ import annotations

import json
import sys
from typing import Callable

from psft_plugin.bench.memory import mlx_peak_bytes, torch_peak_bytes

HIDDEN = 64
PATHS = ("naive", "ours", "chunked")


def grid(quick: bool) -> list[dict]:
    """(seq_len, vocab, chunk) points: a sequence sweep, a vocabulary sweep and a chunk sweep."""
    if quick:
        return [
            {"seq_len": t, "vocab": v, "chunk": c}
            for t, v, c in ((256, 4096, 64), (512, 4096, 64), (256, 8192, 64), (256, 4096, 128))
        ]
    points = [(t, 32768, 256) for t in (512, 1024, 2048, 4096)]
    points += [(1024, v, 256) for v in (8192, 65536, 131072)]
    points += [(2048, 32768, c) for c in (64, 1024)]
    return [{"seq_len": t, "vocab": v, "chunk": c} for t, v, c in points]


def _torch_runner(path: str, point: dict, device: str) -> Callable[[], None]:
    import torch

    from psft_torch import token_logprobs
    from psft_torch.chunked import chunked_token_logprobs

    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(1, point["seq_len"], HIDDEN, generator=generator).to(device).requires_grad_(True)
    weight = (torch.randn(point["vocab"], HIDDEN, generator=generator) * 0.1).to(device).requires_grad_(True)
    targets = torch.randint(0, point["vocab"], (1, point["seq_len"]), generator=generator).to(device)

    def run() -> None:
        if path == "chunked":
            logp = chunked_token_logprobs(hidden, weight, targets, chunk_size=point["chunk"])
        elif path == "ours":
            logp = token_logprobs(hidden @ weight.T, targets)
        else:
            logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
        logp.sum().backward()
        hidden.grad = weight.grad = None

    return run


def _mlx_runner(path: str, point: dict) -> Callable[[], None]:
    import mlx.core as mx

    from psft_mlx import token_logprobs
    from psft_mlx.chunked import chunked_token_logprobs

    mx.random.seed(0)
    hidden = mx.random.normal((1, point["seq_len"], HIDDEN))
    weight = mx.random.normal((point["vocab"], HIDDEN)) * 0.1
    targets = mx.random.randint(0, point["vocab"], (1, point["seq_len"]))
    mx.eval(hidden, weight, targets)

    def loss(h: mx.array, w: mx.array) -> mx.array:
        if path == "chunked":
            return chunked_token_logprobs(h, w, targets, chunk_size=point["chunk"]).sum()
        if path == "ours":
            return token_logprobs(h @ w.T, targets).sum()
        logits = h @ w.T
        log_softmax = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.take_along_axis(log_softmax, targets[..., None], axis=-1).sum()

    def run() -> None:
        mx.eval(mx.grad(loss, argnums=(0, 1))(hidden, weight))

    return run


def measure(backend: str, quick: bool, device: str = "cpu") -> list[dict]:
    """One row per (point, path): peak bytes and that point's ``[T, V]`` float32 size."""
    rows = []
    for point in grid(quick):
        for path in PATHS:
            run = _torch_runner(path, point, device) if backend == "torch" else _mlx_runner(path, point)
            run()  # warm-up: first calls allocate thread pools and caches
            peak = torch_peak_bytes(run, device) if backend == "torch" else mlx_peak_bytes(run)
            rows.append(
                {
                    "backend": backend,
                    "path": path,
                    **point,
                    "peak_bytes": peak,
                    "logits_fp32_bytes": 4 * point["seq_len"] * point["vocab"],
                }
            )
    return rows


if __name__ == "__main__":
    backend, quick = sys.argv[1], "--quick" in sys.argv
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
    print(json.dumps(measure(backend, quick, device)))
