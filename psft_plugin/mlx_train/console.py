"""mlx-lm 0.32's training console, with PSFT's metrics on each report line.

Built from ``mlx_lm.cli_ui``: the boxed run header, the progress bar (``make_train_progress``)
and report rows like ``TrainUI``'s (iteration, train loss, a trend arrow, tokens/s, trained
tokens), extended with ``nll``, it/s, peak memory and the ``psft/*`` metrics, and laid out to
read in an 80-column terminal. The trainable
share is printed by mlx-lm's own ``print_trainable_parameters``. Colours only on a terminal
(mlx-lm forces them, which fills log files with escape codes).
"""

from __future__ import annotations

import textwrap
import types
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from psft_plugin.metrics import unprefixed

METRIC_LABELS = (
    ("nll", "nll", ".3f"),
    ("clipfrac", "clip", ".3f"),
    ("approx_kl", "kl", ".1e"),
    ("entropy", "ent", ".3f"),
)


def _console() -> Any:
    """mlx-lm's console (its theme, the terminal's width or 120 columns), colours only on a terminal."""
    from mlx_lm.cli_ui import _make_theme
    from rich.console import Console

    return Console(theme=_make_theme(), highlight=False, width=width())


def width() -> int:
    """The console's width in columns: mlx-lm's (the terminal's, ``COLUMNS``, else 120)."""
    from mlx_lm.cli_ui import _terminal_width

    return _terminal_width()


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


def note(log: Callable[[str], None], text: str) -> None:
    """``note: text``, wrapped to the console's width (continuation lines indented)."""
    lines = textwrap.wrap(
        f"note: {text}", width=width(), subsequent_indent="      ", break_long_words=False, break_on_hyphens=False
    )
    for line in lines:
        log(line)


def wrap_parts(parts: Sequence[str], indent: int, columns: int) -> list[str]:
    """``parts`` joined with `` · `` into lines of at most ``columns`` (a part is never split), each indented."""
    lines, line = [], ""
    for part in parts:
        candidate = f"{line} · {part}" if line else part
        if line and indent + len(candidate) > columns:
            lines.append(line)
            candidate = part
        line = candidate
    return [" " * indent + text for text in lines + ([line] if line else [])]


ROW = "  {:>5}  {:>8}  {:>7} {:1}  {:>7}  {:>7}  {:>5}  {:>7}"
"""A report row: iteration, loss (the objective), nll with its trend arrow, tok/s, tokens, it/s, peak GB (65 columns)."""
METRICS_INDENT = 9


class TrainConsole:
    """Progress bar and report lines; also an mlx-lm ``TrainingCallback``.

    Each report is one row of at most 65 columns (``ROW``); the objective's other metrics follow
    on indented lines wrapped to the console's width. The trend arrow follows ``nll`` (what an SFT
    user watches; PSFT's objective sits near -1 and DFT's rises as ``nll`` falls).
    """

    def __init__(self, total_iters: int, start_iteration: int = 0, empty_val_note: str = ""):
        from mlx_lm.cli_ui import make_train_progress

        self.console = _console()
        self.progress = make_train_progress(self.console)
        self.task = self.progress.add_task("train", total=total_iters, completed=start_iteration)
        self.previous_nll: Optional[float] = None
        self.empty_val_note = empty_val_note

    def print_header(self, cfg: types.SimpleNamespace) -> None:
        from mlx_lm.cli_ui import print_header_panel

        print_header_panel(self.console, "psft_plugin.mlx_train", header_rows(cfg))

    def __enter__(self) -> "TrainConsole":
        heading = ROW.format("iter", "loss", "nll", "", "tok/s", "tokens", "it/s", "peak GB")
        self.console.print(f"[ui.heading]{heading}[/ui.heading]")
        self.console.print("[ui.muted]  loss: the objective · nll: -log p per response token, ▼▲ follow it[/ui.muted]")
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def advance(self, iterations: int) -> None:
        self.progress.advance(self.task, iterations)

    def on_train_loss_report(self, info: dict) -> None:
        nll = info.get("psft/nll", info["train_loss"])
        falling = self.previous_nll is None or nll <= self.previous_nll
        arrow, style = ("▼", "green") if falling else ("▲", "yellow")
        self.previous_nll = nll
        row = ROW.format(
            info["iteration"],
            f"{info['train_loss']:.3f}",
            f"{nll:.3f}",
            arrow,
            f"{info['tokens_per_second']:,.0f}",
            f"{info['trained_tokens'] / 1000:.1f}k",
            f"{info['iterations_per_second']:.2f}",
            f"{info['peak_memory']:.3f}",
        )
        self.console.print(row.replace(f"{nll:.3f} {arrow}", f"[bold {style}]{nll:.3f} {arrow}[/bold {style}]", 1))
        for line in wrap_parts(psft_metrics(info), METRICS_INDENT, self.console.width):
            self.console.print(f"[ui.muted]{line}[/ui.muted]")

    def on_val_loss_report(self, info: dict) -> None:
        row = ROW.format(
            info["iteration"], "val", f"{info['val_loss']:.3f}", "", f"{info['val_time']:.2f}s", "", "", ""
        )
        self.console.print(f"[ui.accent]{row.rstrip()}[/ui.accent]")
        if info.get("val_tokens") == 0 and self.empty_val_note:
            note(lambda line: self.console.print(line, markup=False), self.empty_val_note)
            self.empty_val_note = ""  # said once

    def saved(self, checkpoint: Path) -> None:
        self.console.print(f"  [ui.good]save[/ui.good]  [ui.muted]{Path(checkpoint).name}[/ui.muted]")


def psft_metrics(info: dict) -> list[str]:
    """``clip 0.012``, ``ratio 1.000 [0.81, 1.32]``, ``kl 1.2e-04``, ``ent 2.345``, ... from a report's ``psft/*``.

    ``nll`` has its own column in the row; any other metric an objective returns (DFT's
    ``weight_mean``, a third party's) is shown by name.
    """
    parts = [
        f"{label} {info[f'psft/{name}']:{spec}}" for name, label, spec in METRIC_LABELS[1:2] if f"psft/{name}" in info
    ]
    if "psft/ratio_mean" in info:
        parts.append(
            f"ratio {info['psft/ratio_mean']:.3f} [{info['psft/ratio_min']:.2f}, {info['psft/ratio_max']:.2f}]"
        )
    parts += [
        f"{label} {info[f'psft/{name}']:{spec}}" for name, label, spec in METRIC_LABELS[2:] if f"psft/{name}" in info
    ]
    shown = {name for name, _, _ in METRIC_LABELS} | {"ratio_mean", "ratio_min", "ratio_max", "objective", "tokens"}
    parts += [f"{name} {value:.4g}" for name, value in unprefixed(info).items() if name not in shown]
    return parts
