"""Helpers of the TRL host tests: the tiny model's trainers in process, and the CLI in a subprocess.

In process: :func:`train` builds TRL's own ``SFTTrainer`` (the oracle) or our ``PSFTTrainer`` on
the tiny model with the same :data:`COMMON` settings and returns the trained weights and the log.
Subprocess: :func:`cli` runs ``psft-trl`` (or ``trl sft``) on a YAML, through ``torchrun`` or
``accelerate launch`` for several processes, with the test-only CPU engine patches of
``tests/cpu_site`` on the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from cli_runs import Run

ROOT = Path(__file__).resolve().parents[2]
CPU_SITE = ROOT / "tests" / "cpu_site"
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
COMMON = dict(
    max_steps=4,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    optim="sgd",
    learning_rate=0.1,
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    seed=0,
    use_cpu=True,
    max_length=128,
    disable_tqdm=True,
    bf16=False,
)
"""Shared by every run: GA 2, 4 optimizer steps, dropout 0 (the tiny model has none), float32.

``bf16=False``: TRL's ``SFTConfig`` turns ``bf16`` on by default, which runs the float32 model's
linear layers under bfloat16 autocast even on CPU. A loss whose gradient differs from TRL's by
float32 rounding (1e-7 relative) then flips bfloat16 roundings (logits 2**-7 apart one step later):
with packing, PSFT K = 1 ended 1.8e-5 from TRL's NLL under autocast, 7e-9 without it (float64: 7e-18).

Plain SGD, so that the weights compare the gradients themselves: Adam's first steps move every
weight by about the learning rate times the sign of its gradient, so float32 rounding in a
near-zero gradient entry becomes a weight difference of up to twice the learning rate (TRL 0.24's
NLL and ours: 6e-4 at lr 1e-3 under AdamW), while a wrong loss scale would hardly show.
"""
ADAM = dict(optim="adamw_torch", learning_rate=1e-2)
"""For the runs that must move the policy enough for the ratio clip to bite."""
PSFT_TRL = (sys.executable, "-m", "psft_plugin.integrations.trl")
"""The CLI (``psft-trl`` is the same ``main``)."""
TRL_SFT = (sys.executable, "-m", "trl.scripts.sft")
"""TRL's own ``trl sft`` script, the oracle (``trl sft`` itself imports every trainer, and TRL 0.24's
DPO trainer needs ``mergekit``, which the hosts line does not install)."""
PROBED_TRL = (sys.executable, "-m", "trl_probe")
"""``psft-trl`` with the engine recorder of ``trl_probe`` (a test-only wrapper)."""
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The tiny model's ChatML with ``{% generation %}`` markers, which ``assistant_only_loss`` needs."""


LAUNCHERS = {
    "torchrun": lambda processes: [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={processes}"],
    "accelerate": lambda processes: [str(BIN / "accelerate"), "launch", "--multi_gpu", f"--num_processes={processes}"],
}
"""The argv before ``-m module`` that starts ``processes`` ranks on this machine."""


def train(trainer_cls: type, config_cls: type, model_dir: Path, dataset: Any, out: Path, **settings: Any):
    """Train in process; returns ``(weights, log_history, trainer)`` with the weights as float32 copies."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if settings.get("assistant_only_loss"):
        tokenizer.chat_template = GENERATION_TEMPLATE
    peft_config = settings.pop("peft_config", None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = config_cls(output_dir=str(out), **{**COMMON, **settings})
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    weights = {name: p.detach().float().clone() for name, p in trainer.model.named_parameters()}
    return weights, trainer.state.log_history, trainer


def cli_config(model_dir: Path, data_dir: Path, directory: Path, **settings: Any) -> dict:
    """A ``trl sft`` YAML for the tiny model and data (``dataset_name``: the folder of jsonl splits)."""
    cfg = dict(
        model_name_or_path=str(model_dir), dataset_name=str(data_dir), output_dir=str(directory / "out"), **COMMON
    )
    cfg.update(settings)
    return {key: value for key, value in cfg.items() if value is not None}


def cli(
    directory: Path,
    cfg: dict,
    command: tuple[str, ...] = PSFT_TRL,
    processes: int = 1,
    env: Optional[dict[str, str]] = None,
    launcher: str = "torchrun",
) -> Run:
    """``<command> --config cfg.yaml`` in a subprocess; several processes (gloo) through ``launcher``.

    ``command``: the argv before ``--config``; for several processes it must start with ``python -m``.
    ``launcher``: ``"torchrun"`` or ``"accelerate"`` (``accelerate launch --multi_gpu``, which on a
    machine without GPUs starts the same gloo ranks, accelerate's ``MULTI_CPU``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full_env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(CPU_SITE), str(HERE), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    )
    argv = [*command, "--config", str(path)]
    if processes > 1:
        assert command[:2] == (sys.executable, "-m"), command
        argv = [*LAUNCHERS[launcher](processes), *argv[1:]]
        if launcher == "torchrun":
            full_env["ACCELERATE_USE_CPU"] = "true"  # accelerate joins torchrun's gloo group on CPU only with it
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=directory, env=full_env, capture_output=True, text=True, timeout=600)
    print(f"{Path(command[-1]).name} {directory.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return Run(directory.name, directory, done.stdout + done.stderr, done.returncode)
