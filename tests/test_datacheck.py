"""`edgekiln check-data` and the check `adapt` runs first: every planted problem found in one pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.config import DataConfig
from pipeline.data import make_split
from pipeline.datacheck import check_data
from pipeline.errors import DataError
from tests.conftest import write_tiny_folder

PLANTED = {"zero_byte", "corrupt", "truncated", "not_image", "conflicting_labels", "leakage", "too_few",
           "imbalance", "exif_rotated"}


def _photo(path: Path, size=(64, 48), **save) -> Path:
    import numpy as np

    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, **save)
    return path


@pytest.fixture
def planted(tmp_path) -> Path:
    root = write_tiny_folder(tmp_path / "planted", classes=(0, 1), per_class=15)
    write_tiny_folder(tmp_path / "few", classes=(2,), per_class=2)
    shutil.copytree(tmp_path / "few" / "digit2", root / "digit2")  # 2 images: too few to split
    first, second = sorted((root / "digit0").iterdir())[:2]
    (root / "digit0" / "empty.png").write_bytes(b"")
    (root / "digit0" / "corrupt.png").write_bytes(b"this is not a PNG file" * 20)
    jpg = _photo(root / "digit1" / "truncated.jpg", quality=95)
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (root / "digit1" / "notes.txt").write_text("labelled by Bob\n")
    shutil.copy(first, root / "digit1" / "also_a_one.png")  # the same bytes under another label
    for i in range(6):  # six copies in one class: the split spreads them over its parts
        shutil.copy(second, root / "digit0" / f"copy{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    _photo(root / "digit1" / "rotated.jpg", exif=exif)
    return root


def test_check_data_finds_every_planted_problem_in_one_pass(planted, tmp_path):
    out = tmp_path / "report.json"
    r = CliRunner().invoke(cli, ["check-data", str(planted), "--json", str(out)])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines()[-1] == "error: 6 problem(s) would break or bias training (table above)"
    report = json.loads(out.read_text())
    kinds = {p["kind"] for p in report["problems"]}
    assert PLANTED <= kinds, PLANTED - kinds
    errors = {p["kind"] for p in report["problems"] if p["severity"] == "error"}
    assert errors == {"zero_byte", "corrupt", "truncated", "conflicting_labels", "leakage", "too_few"}
    by_kind = {p["kind"]: p for p in report["problems"]}
    assert by_kind["zero_byte"]["files"] == ["digit0/empty.png"]
    assert by_kind["truncated"]["files"] == ["digit1/truncated.jpg"]
    assert by_kind["not_image"]["files"] == ["digit1/notes.txt"]
    assert by_kind["exif_rotated"]["files"] == ["digit1/rotated.jpg"]
    assert "class 'digit2' has 2 readable image(s)" in by_kind["too_few"]["message"]
    assert "needs at least 7 per class" in by_kind["too_few"]["message"]
    assert set(by_kind["conflicting_labels"]["files"]) >= {"digit1/also_a_one.png"}
    assert report["per_class"] == {"digit0": 21, "digit1": 17, "digit2": 2}
    assert report["summary"]["formats"] == {"PNG": 39, "JPEG": 1}


def test_adapt_lists_every_blocking_problem_before_training(planted, tmp_path):
    r = CliRunner().invoke(cli, ["adapt", str(planted), "--set", f"runs_dir={tmp_path / 'runs'}"])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    start = lines.index("error:") + 1
    assert lines[start].startswith("the data check found 6 problem(s) (data.on_bad_file: skip leaves unreadable")
    assert {l.split(":")[0].strip() for l in lines[start + 1 :]} == {
        "zero_byte", "corrupt", "truncated", "conflicting_labels", "leakage", "too_few"}
    assert json.loads((tmp_path / "runs" / "planted" / "data_check.json").read_text())["errors"] == 6
    assert not (tmp_path / "runs" / "planted" / "checkpoints").exists()  # nothing trained


def test_on_bad_file_skip_leaves_unreadable_files_out(tmp_path):
    root = write_tiny_folder(tmp_path / "imgs", per_class=10)
    (root / "digit1" / "empty.png").write_bytes(b"")
    (root / "digit2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    runs = tmp_path / "runs"
    sets = ["runs_dir=" + str(runs), "model.input_size=32", "model.crop_pct=1.0", "adapt.epochs=2"]
    r = CliRunner().invoke(cli, ["adapt", str(root), *[a for s in sets for a in ("--set", s)]])
    assert r.exit_code == 1 and "data.on_bad_file: skip leaves unreadable files out" in r.output
    r = CliRunner().invoke(cli, ["adapt", str(root), *[a for s in [*sets, "data.on_bad_file=skip"]
                                                       for a in ("--set", s)]])
    assert r.exit_code == 0, r.output
    check = json.loads((runs / "imgs" / "data_check.json").read_text())
    assert check["skipped"] == ["digit1/empty.png", "digit2/broken.png"]
    split = json.loads((runs / "imgs" / "split.json").read_text())
    listed = {p for part in ("train", "val", "test") for p, _ in split[part]}
    assert len(listed) == 30 and not listed & set(check["skipped"])


def test_the_split_minimum_is_said_as_a_number(tmp_path):
    root = write_tiny_folder(tmp_path / "imgs", per_class=6)
    with pytest.raises(DataError, match=r"class 'digit0' \(6\), 'digit1' \(6\), 'digit2' \(6\) below 7 images"):
        make_split(root, 0.15, 0.2, 0)
    split = make_split(root, 0.2, 0.2, 0)  # 1 / 0.2 = 5: six per class is enough
    assert all({y for _, y in getattr(split, part)} == {0, 1, 2} for part in ("train", "val", "test"))
    report = check_data(DataConfig(root=root, val_fraction=0.2, test_fraction=0.2), progress=False)
    assert report.errors == [] and report.summary["min_images_per_class"] == 5


def test_near_duplicates_group_around_one_image_and_do_not_chain():
    from pipeline.datacheck import _near_groups

    # a-b, b-c and c-d are each 4 bits apart (the bound), a and c 8, a and d 12: a chain, not one group.
    hashes = {"a.png": 0, "b.png": 0b1111, "c.png": 0b11111111, "d.png": 0xFFF, "e.png": 0xFFFF_0000_0000}
    exact = {f: f for f in hashes}
    assert _near_groups(hashes, exact) == [["a.png", "b.png"], ["c.png", "d.png"]]
    # b is a's bytes (reported as identical files): a has no near-duplicate left, b leads c.
    assert _near_groups(hashes, {**exact, "b.png": "a.png"}) == [["b.png", "c.png"]]


def test_a_big_group_is_listed_in_a_line_and_kept_whole_in_the_json(tmp_path):
    root = tmp_path / "same"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i in range(12):  # one picture, re-encoded: each file differs in bytes, not in looks
        _photo(root / ("a" if i < 6 else "b") / f"img{i:02d}.jpg", size=(64, 48), quality=60 + 3 * i)
    report = check_data(DataConfig(root=root, val_fraction=0.15, test_fraction=0.2), progress=False)
    (group,) = [p for p in report.problems if p.kind == "conflicting_labels"]
    assert len(group.files) == 12
    assert group.message.endswith("a/img04.jpg and 7 more (all listed in the JSON report: a run's data_check.json, "
                                  "or check-data --json)")


def test_16_bit_scans_are_hashed_as_the_model_sees_them(tmp_path):
    import numpy as np

    root = tmp_path / "scans"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):  # every image its own smooth 16-bit scan, all of it above 255: no two alike
            coarse = Image.fromarray(rng.uniform(1000, 65535, (4, 4)).astype(np.float32), mode="F")
            px = np.asarray(coarse.resize((40, 40), Image.Resampling.BILINEAR)).astype(np.uint16)
            Image.fromarray(px).save(root / c / f"{i}.png")
    report = check_data(DataConfig(root=root, val_fraction=0.15, test_fraction=0.2), progress=False)
    assert report.summary["modes"] == {"I;16": 16} and report.summary["bit_depths"] == {"16": 16}
    assert not [p for p in report.problems if p.kind in ("conflicting_labels", "leakage", "near_duplicate")]
