"""mlx-lm 0.32's training console, with PSFT's metrics on each report line.

Built from ``mlx_lm.cli_ui``: the boxed run header, the progress bar (``make_train_progress``)
and the report rows of ``TrainUI`` (iteration, train loss with its trend arrow, tokens/s,
trained tokens), extended with it/s, peak memory and the ``psft/*`` metrics. The trainable
share is printed by mlx-lm's own ``print_trainable_parameters``. Colours only on a terminal
(mlx-lm forces them, which fills log files with escape codes).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Optional

from psft_plugin.metrics import unprefixed

METRIC_LABELS = (
    ("nll", "nll", ".3f"),
    ("clipfrac", "clip", ".3f"),
    ("approx_kl", "kl", ".1e"),
    ("entropy", "ent", ".3f"),
)


def _console() -> Any:
    """mlx-lm's console (its theme, the terminal's width or 120 columns), colours only on a terminal."""
    from mlx_lm.cli_ui import _make_theme, _terminal_width
    from rich.console import Console

    return Console(theme=_make_theme(), highlight=False, width=_terminal_width())


def header_rows(cfg: types.SimpleNamespace) -> list[tuple[str, str]]:
    """The rows of mlx-lm's ``print_lora_run_header``, plus the objective and its options."""
    kind = cfg.fine_tune_type
    if kind in ("lora", "dora"):
        kind = f"{kind} · {cfg.num_layers} layers · rank {cfg.lora_parameters.get('rank', '?')}"
    elif kind == "full":
        kind = f"full · {cfg.num_layers} layers"
    lr = "schedule" if cfg.lr_schedule else f"{cfg.learning_rate:.1e}"
    options = " · ".join(f"{k.removeprefix('psft_')} {v}" for k, v in cfg.psft.items())
    return [
        ("model", str(cfg.model)),
        ("type", kind),
        ("dataset", str(cfg.data or "hf_dataset")),
        ("optimizer", f"{cfg.optimizer} · lr {lr}"),
        ("batch · iters", f"{cfg.batch_size} · {cfg.iters:,}"),
        ("grad accumulation", str(cfg.grad_accumulation_steps)),
        ("max seq", f"{cfg.max_seq_length:,}"),
        ("loss", f"{cfg.loss}" + (f" · {options}" if options else "")),
    ]


class TrainConsole:
    """Progress bar and report lines; also an mlx-lm ``TrainingCallback``."""

    def __init__(self, total_iters: int, start_iteration: int = 0):
        from mlx_lm.cli_ui import make_train_progress

        self.console = _console()
        self.progress = make_train_progress(self.console)
        self.task = self.progress.add_task("train", total=total_iters, completed=start_iteration)
        self.previous_loss: Optional[float] = None

    def print_header(self, cfg: types.SimpleNamespace) -> None:
        from mlx_lm.cli_ui import print_header_panel

        print_header_panel(self.console, "psft_plugin.mlx_train", header_rows(cfg))

    def __enter__(self) -> "TrainConsole":
        self.console.print(
            "  [ui.heading]iter   train_loss     tok/s     tokens     it/s   peak GB   psft metrics[/ui.heading]"
        )
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def advance(self, iterations: int) -> None:
        self.progress.advance(self.task, iterations)

    def on_train_loss_report(self, info: dict) -> None:
        loss = info["train_loss"]
        arrow, style = ("▼", "green") if self.previous_loss is None or loss <= self.previous_loss else ("▲", "yellow")
        self.previous_loss = loss
        self.console.print(
            f"  [ui.muted]{info['iteration']:>4}[/ui.muted]    [bold {style}]{loss:>5.3f} {arrow}[/bold {style}]    "
            f"[ui.strong]{info['tokens_per_second']:>5,.0f}[/ui.strong]    "
            f"[ui.muted]{info['trained_tokens'] / 1000:>5.1f}k[/ui.muted]    "
            f"{info['iterations_per_second']:>5.2f}    {info['peak_memory']:>6.3f}   {psft_metrics(info)}",
            soft_wrap=True,
        )

    def on_val_loss_report(self, info: dict) -> None:
        self.console.print(
            f"  [ui.muted]{info['iteration']:>4}[/ui.muted]    [ui.accent]val[/ui.accent] "
            f"[ui.strong]{info['val_loss']:>5.3f}[/ui.strong]    [ui.muted]{info['val_time']:.2f}s[/ui.muted]"
        )

    def saved(self, checkpoint: Path) -> None:
        self.console.print(f"  [ui.good]save[/ui.good]  [ui.muted]{Path(checkpoint).name}[/ui.muted]")


def psft_metrics(info: dict) -> str:
    """``nll 1.234 · clip 0.012 · ratio 1.00 [0.81, 1.32] · kl 1.2e-04 · ent 2.345`` from a report's ``psft/*``."""
    parts = [
        f"{label} {info[f'psft/{name}']:{spec}}" for name, label, spec in METRIC_LABELS[:2] if f"psft/{name}" in info
    ]
    if "psft/ratio_mean" in info:
        parts.append(
            f"ratio {info['psft/ratio_mean']:.3f} [{info['psft/ratio_min']:.2f}, {info['psft/ratio_max']:.2f}]"
        )
    parts += [
        f"{label} {info[f'psft/{name}']:{spec}}" for name, label, spec in METRIC_LABELS[2:] if f"psft/{name}" in info
    ]
    # Any other metric an objective returns (DFT's weight_mean, a third party's) is shown by name.
    shown = {name for name, _, _ in METRIC_LABELS} | {"ratio_mean", "ratio_min", "ratio_max", "objective", "tokens"}
    parts += [f"{name} {value:.4g}" for name, value in unprefixed(info).items() if name not in shown]
    return " · ".join(parts)
