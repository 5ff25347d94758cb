"""Data as users have it: CSV / JSON Lines manifests instead of class folders, a data folder
instead of a YAML file, and `--set key=value` overrides on every command that reads a config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import build_config, load_config
from pipeline.data import make_split
from pipeline.errors import ConfigError, DataError
from tests.conftest import tiny_config_dict, write_tiny_folder


def _images(root: Path) -> list[tuple[str, str]]:
    return sorted((p.relative_to(root).as_posix(), p.parent.name) for p in root.rglob("*.png"))


def _write_csv(path: Path, rows, header=("path", "label")) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_tiny_folder(tmp_path / "imgs", per_class=10)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_and_manifest_of_the_same_images_give_the_same_split_json(folder, tmp_path, fmt):
    rows = _images(folder)[::-1]  # the manifest's row order must not matter
    if fmt == "csv":
        manifest = _write_csv(folder / "labels.csv", rows)
    else:
        manifest = folder / "labels.jsonl"
        manifest.write_text("".join(json.dumps({"path": p, "label": c}) + "\n" for p, c in rows))
    for seed in (0, 3):
        a = make_split(folder, 0.2, 0.2, seed)
        b = make_split(folder, 0.2, 0.2, seed, manifest=manifest)
        a.save(tmp_path / "a.json")
        b.save(tmp_path / "b.json")
        assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert len(b.train) + len(b.val) + len(b.test) == 30


def test_manifest_split_column_keeps_the_users_split(folder, tmp_path):
    rows = [(p, c, ("test" if i % 5 == 0 else "val" if i % 5 == 1 else "train")) for i, (p, c) in enumerate(_images(folder))]
    manifest = _write_csv(tmp_path / "m.csv", [(f"imgs/{p}", c, s) for p, c, s in rows], ("path", "label", "split"))
    split = make_split(folder, 0.2, 0.2, 0, manifest=manifest)
    got = {Path(p).as_posix().removeprefix("imgs/"): part for part in ("train", "val", "test")
           for p, _ in getattr(split, part)}
    assert got == {p: s for p, _, s in rows}
    assert (len(split.train), len(split.val), len(split.test)) == (18, 6, 6)
    assert all((split.root / p).is_file() for p, _ in split.test)


@pytest.mark.parametrize("rows, header, match", [
    ([("digit0/nope.png", "digit0")], ("path", "label"), "row 2: image not found: digit0/nope.png"),
    ([("x.png",)], ("file",), "the header needs the columns path,label"),
    ([("digit0/{first}", "digit0"), ("digit0/{first}", "digit1")], ("path", "label"), "row 3: .* is listed twice"),
    ([("digit0/{first}", "digit0", "holdout")], ("path", "label", "split"), "split 'holdout' is not one of"),
    ([("digit0/{first}", "")], ("path", "label"), "row 2: needs a path and a label"),
])
def test_bad_manifest_is_one_line_naming_the_row(folder, rows, header, match):
    first = sorted((folder / "digit0").iterdir())[0].name
    manifest = _write_csv(folder / "bad.csv", [tuple(c.format(first=first) for c in r) for r in rows], header)
    with pytest.raises(DataError, match=match) as e:
        make_split(folder, 0.2, 0.2, 0, manifest=manifest)
    assert "\n" not in str(e.value) and str(e.value).startswith("data.manifest: ")


def test_data_section_takes_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="data: set one of root, manifest and demo, not root and manifest"):
        build_config({"data": {"root": str(tmp_path), "manifest": str(tmp_path / "m.csv")}})
    with pytest.raises(ConfigError, match="set `root` to an ImageFolder directory, `manifest`"):
        build_config({"data": {}})


def test_set_overrides_are_read_as_yaml_values(folder):
    cfg = load_config(folder, ["adapt.strategy=lora", "distill.enabled=false", "adapt.lr=3e-4",
                               "export.precisions=[fp32, int8]", "model.input_size=64"])
    assert (cfg.adapt.strategy, cfg.distill.enabled, cfg.adapt.lr) == ("lora", False, 3e-4)
    assert cfg.export.precisions == ["fp32", "int8"] and cfg.model.input_size == 64
    assert cfg.name == "imgs" and cfg.data.root == folder.resolve()


def test_a_misspelled_set_key_reads_as_in_yaml(folder, tmp_path):
    """The same one-line message as the YAML file's, naming --set instead of the file; exit 2."""
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"data": {"root": str(folder)}, "adapt": {"strtegy": "lora"}}))
    with pytest.raises(ConfigError) as from_yaml:
        load_config(cfg_file)
    with pytest.raises(ConfigError) as from_set:
        load_config(folder, ["adapt.strtegy=lora"])
    assert str(from_yaml.value) == f"{cfg_file}: adapt.strtegy: unknown key (check the spelling)"
    assert str(from_set.value) == "--set: adapt.strtegy: unknown key (check the spelling)"
    runner = CliRunner()
    for args in (["run", str(folder)], ["adapt", str(cfg_file)], ["distill", str(folder)], ["export", str(folder)],
                 ["validate", str(folder)], ["efficiency", str(folder)], ["demo"]):
        r = runner.invoke(cli, [*args, "--set", "adapt.strtegy=lora"])
        assert r.exit_code == 2, (args, r.output)
        assert r.output.strip().splitlines()[-1] == "error: --set: adapt.strtegy: unknown key (check the spelling)"
    r = runner.invoke(cli, ["run", str(folder), "--set", "adapt.strategy"])
    assert r.exit_code == 2 and "expected key=value" in r.output


def _tiny_sets(folder: Path, runs: Path) -> list[str]:
    tiny = tiny_config_dict(folder, runs)
    sets = [f"runs_dir={runs}", "model.input_size=32", "model.crop_pct=1.0", "data.batch_size=16",
            f"adapt.epochs={tiny['adapt']['epochs']}", "adapt.lr=0.01", "distill.enabled=false",
            "export.precisions=[fp32]", "deploy.latency_rounds=5", "deploy.objective=size"]
    return [a for s in sets for a in ("--set", s)]


def _assert_saved_config(folder: Path, run_dir: Path) -> None:
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["root"] == str(folder.resolve()) and saved["name"] == "imgs"
    assert saved["model"]["input_size"] == 32 and saved["distill"]["enabled"] is False
    assert saved["export"]["precisions"] == ["fp32"]
    # the saved config runs again as it is
    assert load_config(run_dir / "config.yaml").model.input_size == 32


def test_adapt_on_a_folder_without_a_config_writes_the_resolved_config(folder, tmp_path):
    """`edgekiln adapt DATA_DIR`: every default but what --set changes (here: tiny and fast)."""
    r = CliRunner().invoke(cli, ["adapt", str(folder), *_tiny_sets(folder, tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert "teacher efficientnet_lite0 (feature_extraction): test accuracy" in r.output
    _assert_saved_config(folder, tmp_path / "runs" / "imgs")


@pytest.mark.heavy  # the whole pipeline (export, parity, measurement); the adapt test above covers the config path
def test_run_on_a_folder_without_a_config_completes(folder, tmp_path):
    r = CliRunner().invoke(cli, ["run", str(folder), *_tiny_sets(folder, tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    _assert_saved_config(folder, tmp_path / "runs" / "imgs")
    assert (tmp_path / "runs" / "imgs" / "bundle" / "bundle.json").is_file()
