"""``PSFTConfig``'s fields come from the registry; bad input stops with the key and the fix.

No training here: configuration objects, the parser and the CLI's ``main`` on configurations that
must stop before anything is loaded (each returns status 2 and prints the problem, no traceback).
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from transformers import HfArgumentParser
from trl import SFTConfig

from psft_plugin.config import LOSS_OPTION
from psft_plugin.integrations.trl import PSFTConfig, UnsupportedTRLError, check_trl_version, cli
from psft_plugin.options import ConfigError
from psft_plugin.registry import default_registry


def test_every_registered_option_is_a_field_with_its_declared_help():
    fields = {field.name: field for field in dataclasses.fields(PSFTConfig)}
    assert issubclass(PSFTConfig, SFTConfig)
    for key, option in {LOSS_OPTION.key: LOSS_OPTION, **default_registry().options()}.items():
        assert fields[key].default is None and option.help in fields[key].metadata["help"], key


def test_the_parser_reads_the_fields_and_the_resolver_fills_the_defaults(tmp_path):
    parser = HfArgumentParser(PSFTConfig)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--loss", "psft", "--psft_refresh_steps", "3"]
        + ["--psft_loss_agg", "seq-mean-token-sum"]
    )
    psft = default_registry().get("psft").resolve({})
    assert args.psft_refresh_steps == 3 and args.psft_loss_agg == "seq-mean-token-sum"
    assert args.psft_epsilon_high == psft["psft_epsilon_high"] and args.loss_type == "nll"
    ce = PSFTConfig(output_dir=str(tmp_path), use_cpu=True)
    assert ce.loss == LOSS_OPTION.default and ce.psft_refresh_steps is None  # ce reads no PSFT option


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"loss": "psfft"}, ["`loss: psfft`", "did you mean `psft`"]),
        ({"loss": "psft", "psft_epsilon_low": 1.5}, ["`psft_epsilon_low: 1.5`", "< 1.0"]),
        ({"loss": "ce", "psft_refresh_steps": 4}, ["`psft_refresh_steps` has no effect", "`loss: psft`"]),
        ({"loss": "psft", "use_liger_kernel": True}, ["`use_liger_kernel: true`", "psft_lm_head_chunk_size: 1024"]),
        ({"loss": "psft", "loss_type": "chunked_nll"}, ["`loss_type: chunked_nll`", "psft_lm_head_chunk_size: 256"]),
        ({"loss": "psft", "loss_type": "dft"}, ["`loss_type: dft`", "set `loss: dft`"]),
    ],
)
def test_bad_settings_stop_with_the_key_and_the_fix(tmp_path, settings, expected):
    with pytest.raises(ConfigError) as error:
        PSFTConfig(output_dir=str(tmp_path), **settings)
    assert all(part in str(error.value) for part in expected), str(error.value)


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"loss": "psft", "psft_refresh_step": 2}, ["unknown key `psft_refresh_step`", "`psft_refresh_steps`"]),
        ({"loss": "psft", "psft_epsilon_high": -1}, ["`psft_epsilon_high: -1`", ">= 0.0"]),
        ({"loss": "psft", "use_liger_kernel": True}, ["`use_liger_kernel: true`", "use_liger_kernel: false"]),
        ({"loss": "nope"}, ["`loss: nope`", "registered objectives"]),
    ],
)
def test_the_cli_prints_the_problem_and_exits_2(tmp_path, capsys, settings, expected):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "unused", "output_dir": str(tmp_path / "out"), **settings}))
    assert cli.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("psft-trl: invalid configuration") and "Traceback" not in err, err
    assert all(part in err for part in expected), err
    assert not (tmp_path / "out").exists()


def test_trainer_refuses_a_plain_sft_config(tiny_assets, tmp_path):
    from psft_plugin.integrations.trl import PSFTTrainer

    with pytest.raises(ConfigError, match="PSFTTrainer needs a PSFTConfig"):
        PSFTTrainer(
            model=str(tiny_assets[0]), args=SFTConfig(output_dir=str(tmp_path), use_cpu=True), train_dataset=None
        )


def test_trl_outside_the_tested_lines_is_refused_unless_allowed(monkeypatch):
    check_trl_version("1.14.1")
    check_trl_version("0.24.0")
    with pytest.raises(UnsupportedTRLError, match=r"TRL 1\.16\.0 is installed.*PSFT_TRL_ALLOW_UNTESTED=1"):
        check_trl_version("1.16.0")
    monkeypatch.setenv("PSFT_TRL_ALLOW_UNTESTED", "1")
    with pytest.warns(UserWarning, match="1.16.0"):
        check_trl_version("1.16.0")
