"""Axolotl 0.21: `loss:` without the `plugins:` line, through the real ``axolotl train``.

0.21 loads psft-plugin for every config from its ``axolotl.plugins`` entry point. Five runs of
the tiny model, none listing the plugin (4 steps, micro-batch 2, accumulation 2, ragged rows):

- ``plain``: neither ``loss`` nor a ``psft_*`` key; ``hidden``: the same with our entry point
  hidden (``PSFT_TEST_HIDE_AXOLOTL_ENTRY_POINT``, see ``tests/cpu_site``), i.e. Axolotl as if we
  were not installed. They must train identical weights: we stay out of the way;
- ``psft``: ``loss: psft`` alone trains PSFT (windows, clipping, ``psft/*`` metrics);
- ``ce`` and ``toy``: ``loss: ce`` and a third-party objective (CE under another name, found
  through the ``psft_plugin.objectives`` entry-point group) both train through our trainer: equal
  weights, and different from Axolotl's own CE, which averages micro-batch means (~7e-5 here).
"""

from __future__ import annotations

import textwrap

import pytest
from axolotl_runs import config, train
from cli_runs import RunPool
from safetensors.torch import load_file

pytestmark = [pytest.mark.e2e, pytest.mark.axolotl_line("0.21")]

PSFT_KEYS = ("psft_epsilon_low", "psft_epsilon_high", "psft_refresh_steps", "psft_warmup_steps", "psft_loss_agg")
BARE = dict(
    plugins=None,
    curriculum_sampling=True,
    max_steps=4,
    learning_rate=1e-2,
    micro_batch_size=2,
    gradient_accumulation_steps=2,
    dataset_num_proc=1,
    loss=None,
    **{key: None for key in PSFT_KEYS},
)
LOADED = "Plugin loaded successfully: psft_plugin.integrations.axolotl.PSFTPlugin"
TRAINS_US = "psft-plugin: training loss="

TOY_OBJECTIVE = """
    from psft_plugin import Objective, hookimpl
    from psft_plugin.objectives import AGGREGATION_OPTION


    @hookimpl
    def psft_plugin_objectives():
        return [Objective(name="toy-ce", description="cross-entropy under another name",
                          implementations={"torch": "psft_torch.loss:ce_loss"}, options=(AGGREGATION_OPTION,))]
"""


def install_toy_objective(root) -> str:
    """A distribution declaring ``toy-ce`` in the objectives entry-point group; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "toy_objective.py").write_text(textwrap.dedent(TOY_OBJECTIVE))
    info = root / "toy_objective-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-objective\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[psft_plugin.objectives]\ntoy-ce = toy_objective\n")
    return str(root)


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    model_dir, data_dir = tiny_assets
    root = tmp_path_factory.mktemp("bare")
    toy_path = install_toy_objective(root / "toy")
    pool = RunPool(workers=2)

    def job(name, env=None, **overrides):
        cfg = config(model_dir, data_dir, root / name, **{**BARE, **overrides})
        return lambda: train(root / name, cfg, name=name, env=env)

    pool.submit("plain", job("plain"))
    pool.submit("hidden", job("hidden", env={"PSFT_TEST_HIDE_AXOLOTL_ENTRY_POINT": "1"}))
    pool.submit("psft", job("psft", loss="psft", psft_refresh_steps=2))
    pool.submit("ce", job("ce", loss="ce"))
    pool.submit("toy", job("toy", loss="toy-ce", env={"PYTHONPATH": toy_path}))
    yield pool
    pool.close()


def _weights(run) -> dict:
    return load_file(str(run.output_dir / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    return max((a[key] - b[key]).abs().max().item() for key in a)


def test_a_config_that_does_not_ask_for_us_trains_untouched(runs):
    plain, hidden = runs.result("plain").check(), runs.result("hidden").check()
    assert LOADED in plain.output and LOADED not in hidden.output  # the entry point loaded us, or not
    assert TRAINS_US not in plain.output
    assert _max_diff(_weights(plain), _weights(hidden)) == 0.0
    assert [set(step) for step in plain.steps()] == [set(step) for step in hidden.steps()]
    assert not any(key.startswith("psft/") for step in plain.steps() for key in step)


def test_loss_psft_alone_trains_psft(runs):
    psft = runs.result("psft").check()
    assert "psft-plugin: training loss=psft" in psft.output
    steps = psft.steps()
    assert len(steps) == 4
    assert [i for i, step in enumerate(steps) if step["psft/ratio_min"] == step["psft/ratio_max"] == 1.0] == [0, 2]
    assert max(step["psft/clipfrac"] for step in steps) > 0


def test_loss_ce_and_a_third_party_objective_alone_train_through_our_trainer(runs):
    plain, ce, toy = (runs.result(name).check() for name in ("plain", "ce", "toy"))
    assert "psft-plugin: training loss=ce" in ce.output and "psft-plugin: training loss=toy-ce" in toy.output
    assert all("psft/nll" in step for step in ce.steps() + toy.steps())
    assert _max_diff(_weights(toy), _weights(ce)) == 0.0
    difference = _max_diff(_weights(ce), _weights(plain))
    print(f"our token-mean CE vs Axolotl's mean of micro-batch means: max |dw| = {difference:.3g}")
    assert difference > 1e-5  # deterministic runs: the same loss path gives exactly 0
