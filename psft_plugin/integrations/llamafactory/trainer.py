"""LLaMA-Factory's SFT trainer with the PSFT mixin in front, and its log file with our metrics.

``CustomSeq2SeqTrainer`` keeps everything LLaMA-Factory adds (its optimizers and schedulers,
BAdam, generation at evaluation, the processor callback); the mixin installs the objective as
its ``compute_loss_func`` and serves each optimizer step from the old-policy window
(:mod:`psft_torch.trainer`). The step metrics reach ``Trainer.log`` (console and ``report_to``);
LLaMA-Factory's ``LogCallback`` writes a fixed set of keys to ``trainer_log.jsonl``, so the
trainer makes it a :class:`PSFTLogCallback`, which adds the ``psft/*`` keys.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Mapping

from llamafactory.extras.logging import get_logger
from llamafactory.train.callbacks import LogCallback
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

from psft_plugin.metrics import PREFIX
from psft_torch.trainer import PSFTTrainerMixin

LOG = get_logger("llamafactory.psft_plugin")  # under LLaMA-Factory's logger, so it prints with its lines


class PSFTLogCallback(LogCallback):
    """LLaMA-Factory's ``LogCallback`` whose ``trainer_log.jsonl`` lines also carry the ``psft/*`` metrics."""

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        latest = state.log_history[-1] if state.log_history else {}
        metrics = {key: value for key, value in latest.items() if key.startswith(PREFIX)}
        # The parent hands its line to a writer thread as `self._write_log(output_dir, logs)`; this
        # log's metrics travel bound to that call, so a later log cannot change them.
        self._write_log = partial(self._write_with_metrics, metrics)
        super().on_log(args, state, control, **kwargs)

    def _write_with_metrics(self, metrics: Mapping[str, float], output_dir: str, logs: dict[str, Any]) -> None:
        LogCallback._write_log(self, output_dir, {**logs, **metrics})


class LlamaFactoryPSFTTrainer(PSFTTrainerMixin, CustomSeq2SeqTrainer):
    """``CustomSeq2SeqTrainer`` training the objective of :attr:`psft_config`.

    LLaMA-Factory's workflow builds its trainer with its own keyword arguments only, so the
    configuration travels on the class: :func:`trainer_class` makes one subclass per run.
    """

    psft_config: ClassVar[Mapping[str, Any]] = {}
    instances: ClassVar[int] = 0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        settings = self.configure_psft(self.psft_config)
        type(self).instances += 1
        LOG.info(  # on every rank: each one says what it trains, and on which engine
            "psft-plugin: rank %d trains %s; log-probs: %s, engine: %s",
            self.args.process_index,
            settings.summary(),
            self.psft_logprob_path.name,
            self.psft_engine,
        )
        for callback in self.callback_handler.callbacks:
            if type(callback) is LogCallback:
                # The same instance (its progress state, LlamaBoard's handlers), with our `on_log`.
                callback.__class__ = PSFTLogCallback

    @property
    def psft_engine(self) -> str:
        """The accelerator's engine, e.g. ``MULTI_CPU``, ``DEEPSPEED ZeRO-3``."""
        engine = self.accelerator.distributed_type.value
        if self.is_deepspeed_enabled:
            engine += f" ZeRO-{self.accelerator.state.deepspeed_plugin.zero_stage}"
        return engine


def trainer_class(config: Mapping[str, Any]) -> type[LlamaFactoryPSFTTrainer]:
    """A :class:`LlamaFactoryPSFTTrainer` subclass bound to ``config`` (``{"loss": ..., "psft_*": ...}``)."""
    return type(LlamaFactoryPSFTTrainer.__name__, (LlamaFactoryPSFTTrainer,), {"psft_config": dict(config)})
