"""``loss: dft`` through the real ``axolotl train`` CLI on the tiny model (no mocks).

Two runs, started together: ``loss: ce`` and ``loss: dft``, same data, order and seed (4 optimizer
steps of 2 x 2 ragged chat rows, lr 1e-2). The DFT run must train DFT: its first step's logged
objective and mean token weight are recomputed here from the initial weights on the same rows
(Axolotl's prepared dataset, in order), and its weights end elsewhere than CE's.
"""

import json
import math

import pytest
import torch
from axolotl_runs import config, train
from cli_runs import RunPool
from safetensors.torch import load_file

# DFT trains through the same trainer hooks as PSFT, which run on the 0.19 line too.
pytestmark = [pytest.mark.e2e, pytest.mark.axolotl_line("0.21")]
PSFT_ONLY_KEYS = ("psft_epsilon_low", "psft_epsilon_high", "psft_refresh_steps", "psft_warmup_steps")
STEPS = 4
COMMON = dict(
    curriculum_sampling=True,
    max_steps=STEPS,
    learning_rate=1e-2,
    micro_batch_size=2,
    gradient_accumulation_steps=2,
    dataset_num_proc=1,
    save_strategy="steps",
    save_steps=STEPS,
    **{key: None for key in PSFT_ONLY_KEYS},
)
FIRST_STEP_ROWS = 4  # micro-batch 2 x accumulation 2
# The printed log line has 4 significant digits; the checkpoint's log history keeps what Axolotl
# stored, rounded to AXOLOTL_METRIC_NDIGITS decimals (5 by default).
FULL_DIGITS = {"AXOLOTL_METRIC_NDIGITS": "10"}


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    model_dir, data_dir = tiny_assets
    root = tmp_path_factory.mktemp("dft")
    pool = RunPool(workers=2)
    for loss in ("ce", "dft"):
        cfg = config(model_dir, data_dir, root / loss, **COMMON, loss=loss)
        pool.submit(loss, lambda loss=loss, cfg=cfg: train(root / loss, cfg, name=loss, env=FULL_DIGITS))
    yield pool
    pool.close()


def _logged_steps(run) -> list[dict[str, float]]:
    """The training log entries of the final checkpoint's ``trainer_state.json``, one per step."""
    state = json.loads((run.output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def _first_step_by_hand(model_dir, prepared_dir) -> tuple[float, float, float]:
    """``(DFT objective, mean p, NLL)`` of the initial model on the first step's rows, in float64 sums."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    import psft_torch
    from psft_torch.trainer import IGNORE_INDEX, aligned_targets

    (dataset_dir,) = [path for path in prepared_dir.iterdir() if path.is_dir()]
    rows = load_from_disk(str(dataset_dir)).select(range(FIRST_STEP_ROWS))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    logp, mask = [], []
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            targets = aligned_targets(labels)
            logp.append(psft_torch.token_logprobs(model(ids).logits, targets)[0].double())
            mask.append(targets[0] != IGNORE_INDEX)
    logp = torch.cat(logp)[torch.cat(mask)]
    prob = logp.exp()
    return (-prob * logp).mean().item(), prob.mean().item(), -logp.mean().item()


def test_loss_dft_trains_dft_through_axolotl_train(runs, tiny_assets):
    ce, dft = runs.result("ce").check(), runs.result("dft").check()
    assert "psft-plugin: training loss=dft" in dft.output
    objective, weight, nll = _first_step_by_hand(tiny_assets[0], dft.directory / "prepared")
    steps, ce_steps = _logged_steps(dft), _logged_steps(ce)
    first = steps[0]
    print(
        f"axolotl train, loss: dft, step 1: logged objective {first['psft/objective']:.7f} vs by hand "
        f"{objective:.7f}; weight_mean {first['psft/weight_mean']:.7f} vs {weight:.7f}; nll {nll:.5f}"
    )
    assert first["psft/objective"] == pytest.approx(objective, rel=1e-5)
    assert first["psft/weight_mean"] == pytest.approx(weight, rel=1e-5)
    assert first["psft/nll"] == pytest.approx(nll, rel=1e-5)
    assert ce_steps[0]["psft/nll"] == pytest.approx(first["psft/nll"], rel=1e-7)  # same rows, same weights
    assert ce_steps[0]["psft/objective"] == pytest.approx(nll, rel=1e-5)  # CE's objective is the NLL
    for step in steps:
        assert 0 < step["psft/objective"] < min(step["psft/nll"], 1 / math.e)  # -p log p < -log p and <= 1/e
        assert math.exp(-step["psft/nll"]) <= step["psft/weight_mean"] < 1  # Jensen: mean p >= exp(mean log p)
        assert step["loss"] == pytest.approx(step["psft/objective"], abs=2e-3)  # the host's loss is DFT's (4 digits)
        assert not any(key in step for key in ("psft/clipfrac", "psft/ratio_mean"))  # no old policy
    assert len(steps) == len(dft.steps()) == STEPS
    a, b = load_file(str(ce.output_dir / "model.safetensors")), load_file(str(dft.output_dir / "model.safetensors"))
    difference = max((a[key] - b[key]).abs().max().item() for key in a)
    print(f"axolotl train: DFT vs CE weights after 4 steps: max |dw| = {difference:.3g}")
    assert difference > 1e-3
