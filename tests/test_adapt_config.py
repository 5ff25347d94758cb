import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import build_config
from pipeline.errors import ConfigError


def _err(adapt: dict) -> str:
    with pytest.raises(ConfigError) as e:
        build_config({"data": {"demo": True}, "adapt": adapt})
    return str(e.value)


def test_strategy_options_are_validated_per_strategy():
    assert _err({"strategy": "transfer"}) == (
        "config: adapt.strategy: Input should be 'feature_extraction', 'finetune' or 'lora'"
    )
    assert _err({"strategy": "finetune", "finetune": {"unfreez": 2}}) == "config: adapt.finetune.unfreez: unknown key (check the spelling)"
    assert _err({"strategy": "finetune", "lora": {"rank": 4}}) == "config: adapt: the `lora` section is set but strategy is 'finetune'"
    assert _err({"optimizer": "adam"}) == "config: adapt.optimizer: Input should be 'adamw' or 'sgd'"
    assert _err({"augment": "heavy"}) == "config: adapt.augment: Input should be 'none', 'light' or 'strong'"
    assert "progressive_every needs `unfreeze`" in _err({"strategy": "finetune", "finetune": {"progressive_every": 2}})
    assert "set augment: none" in _err({"feature_extraction": {"head": "logistic_regression"}, "augment": "light"})
    cfg = build_config({"data": {"demo": True}, "adapt": {"strategy": "lora", "lora": {"rank": 4}}})
    assert cfg.adapt.options.rank == 4


def test_optimizer_by_name_lists_the_valid_names():
    from pipeline.training import make_optimizer

    with pytest.raises(ConfigError, match="unknown optimizer 'adam'; valid: adamw, sgd"):
        make_optimizer("adam", [], 0.1, 0.0)


def test_bad_strategy_section_exits_2_naming_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"data": {"demo": True}, "adapt": {"strategy": "lora", "lora": {"rnk": 4}}}))
    r = CliRunner().invoke(cli, ["adapt", str(p)])
    assert r.exit_code == 2
    assert r.output == f"error: {p}: adapt.lora.rnk: unknown key (check the spelling)\n"


def test_help_for_adapt_commands():
    for cmd in (["adapt"], ["efficiency"], ["advise"]):
        r = CliRunner().invoke(cli, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output
    assert "--resume" in CliRunner().invoke(cli, ["adapt", "--help"]).output


def test_config_snapshot_with_every_section_loads_again(tmp_path):
    from pipeline.config import dump_config, load_config

    cfg = build_config({"data": {"demo": True}, "adapt": {"strategy": "lora", "lora": {"rank": 4}}})
    p = tmp_path / "config.yaml"
    p.write_text(dump_config(cfg))
    assert "finetune:" in p.read_text()  # default sections of the other strategies are listed ...
    assert load_config(p) == cfg  # ... and accepted
