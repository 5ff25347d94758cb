import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import PipelineConfig, load_config


def _write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def test_misspelled_key_names_the_field_and_exits_2(tmp_path, tiny_data):
    path = _write(tmp_path, {"data": {"root": str(tiny_data)}, "distill": {"temprature": 3}})
    r = CliRunner().invoke(cli, ["run", path])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {path}: distill.temprature: unknown key (check the spelling)"
    assert "Traceback" not in r.output


def test_every_problem_gets_one_line(tmp_path):
    path = _write(tmp_path, {"data": {"root": "x", "batch_size": 0}, "adapt": {"epochs": "many"}, "bogus": 1})
    r = CliRunner().invoke(cli, ["adapt", path])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()[1:]
    assert sorted(l.split(": ")[1] for l in lines) == ["adapt.epochs", "bogus", "data.batch_size"]


def test_not_yaml_and_missing_file(tmp_path):
    r = CliRunner().invoke(cli, ["run", _write(tmp_path, "data: [unclosed")])
    assert r.exit_code == 2 and "not valid YAML" in r.output
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and r.output.strip() == (f"error: config file not found: {tmp_path / 'nope.yaml'} "
                                                     "(give a YAML config or a folder of class sub-folders)")


def test_data_root_is_relative_to_the_config_file(tmp_path):
    path = _write(tmp_path, {"data": {"root": "images"}})
    assert load_config(path).data.root == (tmp_path / "images").resolve()


def test_validate_section_alias_round_trips():
    cfg = PipelineConfig.model_validate({"data": {"demo": True}, "validate": {"min_agreement": 0.99}})
    assert cfg.validate_.min_agreement == 0.99
    assert cfg.model_dump(by_alias=True)["validate"]["min_agreement"] == 0.99
