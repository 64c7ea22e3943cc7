"""SFT vs PSFT on a real small model, side by side: ``python -m psft_plugin.demo`` (``make demo``).

Builds SmolLM2-135M-Instruct and GSM-style math data offline (first run only), trains SFT
(``loss: ce``) and PSFT (``loss: psft``, K = 8) with the same data, order, seed and learning rate
through the real command line of the chosen backend, then scores the base model and both runs
on held-out math (in-domain NLL and entropy) and Wikipedia prose (out-of-domain NLL), prints a
table and writes a plot. About 15 minutes on 2 CPU cores; ``--quick`` is a few-step smoke run.
``--objectives ce,psft,dft`` adds a DFT run (``loss: dft``) to the table and the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Optional

from psft_plugin.demo.report import plot, table, verdict
from psft_plugin.demo.runs import History, Recipe, axolotl_config, launch, mlx_config, mlx_history, torch_history
from psft_plugin.demo.scoring import batches, chat_rows, mlx_forward, score, text_rows, torch_forward
from psft_plugin.objectives import LM_HEAD_CHUNK_KEY

RUN_NAMES = {"ce": "SFT", "psft": "PSFT", "dft": "DFT"}
"""The objectives the demo can train (``--objectives``), and their names in the table and plot."""
DEFAULT_OBJECTIVES = ("ce", "psft")
QUICK = Recipe(
    steps=2, micro_batch=2, eval_every=2, eval_rows=4, score_rows=4, sequence_len=384, refresh_steps=2, warmup_steps=0
)
OOD_ROWS = {True: 2, False: 8}


def eval_subset(valid: Path, rows: int, out: Path) -> Path:
    """The first ``rows`` held-out rows, the set both runs evaluate every ``eval_every`` steps."""
    out.mkdir(parents=True, exist_ok=True)
    subset = out / "valid.jsonl"
    subset.write_text("".join(valid.read_text().splitlines(keepends=True)[:rows]))
    return subset


def parse_objectives(text: str) -> tuple[str, ...]:
    """``"ce,psft,dft"`` -> ``("ce", "psft", "dft")``; raises ``ValueError`` naming the bad entry and the choices."""
    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        if name not in RUN_NAMES:
            raise ValueError(f"`--objectives {text}`: `{name}` is not one of {', '.join(RUN_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"`--objectives {text}` names an objective twice")
    return names


def train_runs(
    backend: str, recipe: Recipe, model_dir: Path, data, out: Path, objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
) -> dict[str, History]:
    """Train each objective in turn (SFT then PSFT by default); return each run's per-step history."""
    histories, valid = {}, eval_subset(data.valid, recipe.eval_rows, out)
    for index, loss in enumerate(objectives, 1):
        name = RUN_NAMES[loss]
        print(f"[demo] {index}/{len(objectives)}: training {name} (loss: {loss}) with {backend} ...", flush=True)
        run_dir = out / loss
        if backend == "torch":
            axolotl = [str(Path(sys.executable).parent / "axolotl"), "train", "--launcher", "python"]
            launch(axolotl, axolotl_config(recipe, loss, model_dir, data.train, valid, run_dir), run_dir)
            histories[name] = torch_history(run_dir)
        else:
            launch(
                [sys.executable, "-m", "psft_plugin.mlx_train", "--config"],
                mlx_config(recipe, loss, model_dir, data.root, run_dir),
                run_dir,
            )
            histories[name] = mlx_history(run_dir)
    return histories


def score_models(
    backend: str,
    recipe: Recipe,
    model_dir: Path,
    data,
    out: Path,
    quick: bool,
    histories: dict[str, History],
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES,
) -> dict[str, dict[str, float]]:
    """In-domain and out-of-domain scores of the base model and of every trained run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    in_domain = batches(chat_rows(tokenizer, data.test, recipe.score_rows), tokenizer.pad_token_id)
    ood = batches(text_rows(tokenizer, data.ood_text, OOD_ROWS[quick]), tokenizer.pad_token_id)
    models = {"base": None, **{RUN_NAMES[loss]: out / loss for loss in objectives}}
    rows = {}
    for name, run_dir in models.items():
        print(f"[demo] scoring {name} ...", flush=True)
        if backend == "torch":
            forward = torch_forward(model_dir if run_dir is None else run_dir / "model")
        else:
            forward = mlx_forward(model_dir, None if run_dir is None else run_dir / "adapters")
        inside, outside = score(forward, in_domain), score(forward, ood)
        clipfrac = histories[name].mean("clipfrac") if name in histories else math.nan
        rows[name] = {
            "in_domain_nll": inside["nll"],
            "in_domain_entropy": inside["entropy"],
            "ood_nll": outside["nll"],
            "clipfrac": clipfrac,
        }
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line (``python -m psft_plugin.demo --help``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backend",
        choices=("torch", "mlx"),
        default="torch",
        help="torch: `axolotl train` with the PSFT plugin; mlx: `python -m psft_plugin.mlx_train`",
    )
    parser.add_argument("--quick", action="store_true", help="a few steps on a few rows (smoke test)")
    parser.add_argument("--out", type=Path, default=Path(".cache/demo"), help="runs, scores and the plot go here")
    parser.add_argument(
        "--model",
        type=Path,
        help="a model folder to use instead of SmolLM2-135M-Instruct "
        "(MLX's Linux CPU build runs SmolLM2 ~30x slower than torch: use a Mac, or a tiny model)",
    )
    parser.add_argument(
        "--lm-head-chunk-size",
        type=int,
        default=0,
        metavar="N",
        help=f"train both torch runs with `{LM_HEAD_CHUNK_KEY}: N` (no [B, T, V] logits); "
        "the table should match the default run's within 1e-4",
    )
    parser.add_argument(
        "--objectives",
        default=",".join(DEFAULT_OBJECTIVES),
        metavar="LIST",
        help=f"comma-separated runs, from {', '.join(RUN_NAMES)} (default: SFT vs PSFT); "
        "e.g. ce,psft,dft adds Dynamic Fine-Tuning",
    )
    return parser


def parse_arguments(argv: Optional[list[str]]) -> tuple[argparse.Namespace, tuple[str, ...]]:
    """The parsed arguments and the objectives to train; a bad value exits with the parser's usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        objectives = parse_objectives(args.objectives)
    except ValueError as error:
        parser.error(str(error))
    if args.lm_head_chunk_size < 0 or (args.lm_head_chunk_size and args.backend == "mlx"):
        parser.error("--lm-head-chunk-size must be >= 0, and the MLX trainer supports only 0")
    return args, objectives


def output_dir(args: argparse.Namespace) -> Path:
    """``--out``/``<backend>[-quick][-chunkN]``: one folder per kind of demo run."""
    name = f"{args.backend}-quick" if args.quick else args.backend
    return args.out / (name + (f"-chunk{args.lm_head_chunk_size}" if args.lm_head_chunk_size else ""))


def report(
    rows: dict[str, dict[str, float]], histories: dict[str, History], names: list[str], out: Path, title: str
) -> None:
    """Print the scores' table and each run's verdict against SFT; write and name the plot."""
    picture = plot(histories, out / ("_vs_".join(names).lower() + ".png"), title)
    print(table(rows))
    for name in names:
        if name != "SFT" and "SFT" in rows:
            print(verdict(rows["SFT"], rows[name], name))
    print(f"plot: {picture}")


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    """Train, score and compare the runs; returns the table's rows (``{run: {score: value}}``)."""
    args, objectives = parse_arguments(argv)
    from psft_plugin.assets import demo_data, smollm2

    recipe = dataclasses.replace(QUICK if args.quick else Recipe(), lm_head_chunk_size=args.lm_head_chunk_size)
    out = output_dir(args)
    model_dir, data = args.model or smollm2.build(), demo_data.build_datasets()
    histories = train_runs(args.backend, recipe, model_dir, data, out, objectives)
    rows = score_models(args.backend, recipe, model_dir, data, out, args.quick, histories, objectives)
    title = f"{model_dir.name}, {recipe.steps} steps, K = {recipe.refresh_steps} ({args.backend})"
    report(rows, histories, [RUN_NAMES[loss] for loss in objectives], out, title)
    return rows


if __name__ == "__main__":
    main()
