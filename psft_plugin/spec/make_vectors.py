"""Regenerate the shipped test vectors from the NumPy reference.

    python -m psft_plugin.spec.make_vectors            # rewrite psft_plugin/spec/vectors/*.json
    python -m psft_plugin.spec.make_vectors --check    # exit 1 if the committed files are stale

Inputs are drawn with a fixed seed and rounded to float32 (what the backends compute in);
expected values are the float64 reference on those float32 inputs. Cases keep every ratio away
from the clip edges and every log-ratio away from the clamp (ties are measure-zero, docs/objective.md
section 1), so a backend that picks the wrong branch cannot pass by luck.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from psft_plugin.spec.reference import (
    AGGREGATIONS,
    IGNORE_INDEX,
    LOG_RATIO_CLAMP,
    dft_loss_and_grad,
    psft_loss_and_grad,
    token_logprobs,
)

VECTOR_DIR = Path(__file__).with_name("vectors")
SEED = 20250825
EDGE_MARGIN = 1e-3


def _f32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32).astype(np.float64)


def _away_from_edges(log_ratio: np.ndarray, eps_low: float, eps_high: float) -> np.ndarray:
    """Nudge log-ratios that sit within EDGE_MARGIN of a clip edge or of the clamp."""
    edges = np.log([1.0 - eps_low, 1.0 + eps_high]).tolist() + [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]
    out = log_ratio.copy()
    for edge in edges:
        near = np.abs(out - edge) < EDGE_MARGIN
        out[near] = edge + np.where(out[near] >= edge, 1, -1) * 2 * EDGE_MARGIN
    return out


def _case(
    name: str,
    rng: np.random.Generator,
    shape=(3, 7),
    *,
    log_ratio_scale=0.3,
    mask: Optional[np.ndarray] = None,
    advantages: Optional[np.ndarray] = None,
    log_ratio: Optional[np.ndarray] = None,
    **kwargs: Any,
) -> dict[str, Any]:
    eps_low, eps_high = kwargs.get("epsilon_low", 0.2), kwargs.get("epsilon_high", 0.28)
    logp = _f32(-rng.uniform(0.01, 6.0, size=shape))
    if log_ratio is None:
        log_ratio = rng.normal(0.0, log_ratio_scale, size=shape)
    old_logp = _f32(logp - _away_from_edges(log_ratio, eps_low, eps_high))
    # Rounding old_logp to float32 must not move a ratio onto an edge.
    assert np.array_equal(_away_from_edges(logp - old_logp, eps_low, eps_high), logp - old_logp), name
    if mask is None:
        mask = (rng.uniform(size=shape) < 0.8).astype(np.float64)
    if advantages is not None:
        advantages = _f32(advantages)
    loss, grad, metrics = psft_loss_and_grad(logp, old_logp, mask, advantages=advantages, **kwargs)
    return {
        "name": name,
        "logp": logp.tolist(),
        "old_logp": old_logp.tolist(),
        "mask": mask.tolist(),
        "advantages": None if advantages is None else advantages.tolist(),
        "kwargs": kwargs,
        "loss": loss,
        "grad": grad.tolist(),
        "metrics": metrics,
    }


def loss_cases(seed: int = SEED) -> Iterator[dict[str, Any]]:
    """Every PSFT loss vector, in a fixed order."""
    rng = np.random.default_rng(seed)
    for i in range(3):
        yield _case(f"random_{i}", rng, shape=(2 + i, 5 + 3 * i), log_ratio_scale=0.1 + 0.2 * i)
    ragged = np.array(
        [[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 0, 1, 0, 1, 0, 1]],
        dtype=np.float64,
    )
    row_masked = ragged.copy()
    row_masked[2] = 0
    for agg in AGGREGATIONS:
        yield _case(f"ragged_{agg}", rng, shape=(4, 8), mask=ragged, agg=agg)
        yield _case(f"masked_row_{agg}", rng, shape=(4, 8), mask=row_masked, agg=agg)
        yield _case(f"masked_batch_{agg}", rng, shape=(2, 6), mask=np.zeros((2, 6)), agg=agg)
        yield _case(
            f"num_tokens_override_{agg}",
            rng,
            shape=(4, 8),
            mask=ragged,
            agg=agg,
            num_tokens=37.0 if agg == "token-mean" else 6.0,
        )
        yield _case(
            f"mixed_advantages_{agg}",
            rng,
            shape=(4, 8),
            mask=ragged,
            log_ratio_scale=0.5,
            advantages=rng.choice([-1.5, -1.0, -0.25, 0.5, 1.0, 2.0], size=(4, 8)),
            agg=agg,
        )
    edges = np.log(np.array([[0.5, 0.75, 0.79, 0.81, 0.9, 1.0005], [1.1, 1.27, 1.29, 1.5, 2.0, 3.0]]))
    yield _case("both_clip_edges_positive_adv", rng, shape=(2, 6), mask=np.ones((2, 6)), log_ratio=edges)
    yield _case(
        "both_clip_edges_negative_adv",
        rng,
        shape=(2, 6),
        mask=np.ones((2, 6)),
        log_ratio=edges,
        advantages=-np.ones((2, 6)),
    )
    yield _case(
        "both_clip_edges_mixed_adv",
        rng,
        shape=(2, 6),
        mask=np.ones((2, 6)),
        log_ratio=edges,
        advantages=np.array([[1, -1, 1, -1, 1, -1], [-1, 1, -1, 1, -1, 1]]),
    )
    yield _case(
        "asymmetric_epsilons",
        rng,
        shape=(2, 6),
        mask=np.ones((2, 6)),
        log_ratio=edges,
        advantages=np.array([[1, -1, 1, -1, 1, -1], [-1, 1, -1, 1, -1, 1]]),
        epsilon_low=0.05,
        epsilon_high=0.5,
    )
    yield _case(
        "zero_epsilons",
        rng,
        shape=(2, 6),
        mask=np.ones((2, 6)),
        log_ratio=edges,
        advantages=np.array([[1, -1, 1, -1, 1, -1], [-1, 1, -1, 1, -1, 1]]),
        epsilon_low=0.0,
        epsilon_high=0.0,
    )
    extreme = np.array([[-60.0, -25.0, -19.0, 0.0, 19.5, 25.0, 45.0]])
    yield _case(
        "log_ratio_clamp",
        rng,
        shape=(1, 7),
        mask=np.ones((1, 7)),
        log_ratio=extreme,
        advantages=np.array([[1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0]]),
    )
    yield _case("right_after_refresh", rng, shape=(3, 5), log_ratio=np.zeros((3, 5)))


def _dft_case(name: str, logp: np.ndarray, mask: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    logp = _f32(logp)
    loss, grad, metrics = dft_loss_and_grad(logp, None, mask, **kwargs)
    return {
        "name": name,
        "logp": logp.tolist(),
        "mask": mask.tolist(),
        "kwargs": kwargs,
        "loss": loss,
        "grad": grad.tolist(),
        "metrics": metrics,
    }


def dft_cases(seed: int = SEED) -> Iterator[dict[str, Any]]:
    """Every DFT loss vector, in a fixed order (their own random stream: the PSFT vectors stay as they are).

    Log-probs span confident tokens (weight ~1) to unlikely ones (weight ~0), so a backend that
    lets gradient through the weight, or drops it, cannot pass.
    """
    rng = np.random.default_rng(seed + 2)
    for i in range(3):
        shape = (2 + i, 5 + 3 * i)
        yield _dft_case(
            f"random_{i}", -rng.uniform(0.01, 6.0, size=shape), (rng.uniform(size=shape) < 0.8).astype(np.float64)
        )
    ragged = np.array(
        [[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 0, 1, 0, 1, 0, 1]],
        dtype=np.float64,
    )
    row_masked = ragged.copy()
    row_masked[2] = 0
    for agg in AGGREGATIONS:
        yield _dft_case(f"ragged_{agg}", -rng.uniform(0.01, 6.0, size=(4, 8)), ragged, agg=agg)
        yield _dft_case(f"masked_row_{agg}", -rng.uniform(0.01, 6.0, size=(4, 8)), row_masked, agg=agg)
        yield _dft_case(f"masked_batch_{agg}", -rng.uniform(0.01, 6.0, size=(2, 6)), np.zeros((2, 6)), agg=agg)
        yield _dft_case(
            f"num_tokens_override_{agg}",
            -rng.uniform(0.01, 6.0, size=(4, 8)),
            ragged,
            agg=agg,
            num_tokens=37.0 if agg == "token-mean" else 6.0,
        )
    spread = np.log(np.array([[0.999, 0.9, 0.5, 0.1, 1e-3, 1e-9], [0.99, 0.7, 0.3, 0.05, 1e-5, 1e-12]]))
    yield _dft_case("confident_to_unlikely", spread, np.ones((2, 6)))


def logprob_cases(seed: int = SEED) -> Iterator[dict[str, Any]]:
    """``token_logprobs`` vectors: logits of several scales, ignored targets."""
    rng = np.random.default_rng(seed + 1)
    for name, scale, shape in (("small_logits", 1.0, (2, 5, 11)), ("large_logits", 30.0, (3, 4, 17))):
        logits = _f32(rng.normal(0.0, scale, size=shape))
        targets = rng.integers(0, shape[-1], size=shape[:2])
        targets[0, :2] = IGNORE_INDEX
        yield {
            "name": name,
            "logits": logits.tolist(),
            "targets": targets.tolist(),
            "ignore_index": IGNORE_INDEX,
            "logp": token_logprobs(logits, targets).astype(np.float64).tolist(),
        }


def build() -> dict[str, dict[str, Any]]:
    """File name -> content of every vector file."""
    header = {"generator": "python -m psft_plugin.spec.make_vectors", "seed": SEED}
    return {
        "psft_loss.json": {**header, "cases": list(loss_cases())},
        "dft_loss.json": {**header, "cases": list(dft_cases())},
        "token_logprobs.json": {**header, "cases": list(logprob_cases())},
    }


def load(name: str) -> dict[str, Any]:
    """Read one shipped vector file, e.g. ``load("psft_loss.json")``."""
    return json.loads((VECTOR_DIR / name).read_text())


def _close(a: Any, b: Any, tol: float = 1e-12) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol * max(1.0, abs(b))
    return a == b


def stale_files() -> list[str]:
    """Names of shipped vector files that differ from a fresh regeneration."""
    stale = []
    for name, content in build().items():
        path = VECTOR_DIR / name
        if not path.exists() or not _close(json.loads(json.dumps(content)), load(name)):
            stale.append(name)
    return stale


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether the files are up to date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        print("stale: " + ", ".join(stale) if stale else "vectors up to date")
        return 1 if stale else 0
    VECTOR_DIR.mkdir(exist_ok=True)
    for name, content in build().items():
        (VECTOR_DIR / name).write_text(json.dumps(content, indent=1) + "\n")
        print(f"wrote {VECTOR_DIR / name} ({len(content['cases'])} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
