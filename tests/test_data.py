import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.data import Split, demo_data_dir, eval_transform, make_split, scan_image_folder
from pipeline.errors import DataError
from runtime.preprocess import PreprocessSpec, open_image
from tests.conftest import write_tiny_folder


def test_demo_data_is_all_of_digits_as_pngs():
    root = demo_data_dir()
    classes, items = scan_image_folder(root)
    assert classes == [str(i) for i in range(10)]
    assert len(items) == 1797
    img = Image.open(root / items[0][0])
    assert img.size == (8, 8) and img.mode == "L"


def test_split_is_seeded_stratified_and_disjoint(tiny_data):
    a = make_split(tiny_data, 0.2, 0.2, seed=0)
    b = make_split(tiny_data, 0.2, 0.2, seed=0)
    c = make_split(tiny_data, 0.2, 0.2, seed=1)
    assert a == b and a.test != c.test
    parts = [set(p for p, _ in getattr(a, s)) for s in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(map(len, parts)) == 45
    for s in ("val", "test"):  # 15 per class * 0.2 = 3 of each class
        assert sorted(a.labels(s)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_split_round_trips_through_json(tiny_data, tmp_path):
    a = make_split(tiny_data, 0.2, 0.2, seed=0)
    a.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == a


def test_missing_dir_and_empty_class(tmp_path):
    with pytest.raises(DataError, match="directory not found"):
        scan_image_folder(tmp_path / "nothing")
    root = write_tiny_folder(tmp_path / "d", per_class=4)
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="class folder 'empty' .* has no images"):
        scan_image_folder(root)


def test_corrupt_image_is_a_one_line_error(tmp_path):
    p = tmp_path / "bad.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    from runtime.errors import ImageError

    with pytest.raises(ImageError, match="bad.png: cannot decode image"):
        open_image(p)


def test_eval_transform_output(tiny_data):
    spec = PreprocessSpec(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    img = Image.new("RGB", (80, 60), (255, 0, 128))
    x = eval_transform(spec)(img)
    assert x.shape == (3, 32, 32)
    # (1-0.5)/0.25 = 2, (0-0.5)/0.25 = -2, (128/255-0.5)/0.25 ≈ 0.00784
    assert torch.allclose(x[:, 0, 0], torch.tensor([2.0, -2.0, (128 / 255 - 0.5) / 0.25]), atol=1e-6)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "data.root: directory not found"),
        ("empty_class", "too_few: class 'zzz' has no readable images"),
        ("corrupt", "truncated: digit1/broken.png: Truncated File Read"),
    ],
)
def test_bad_data_fails_cleanly_and_writes_no_bundle(tmp_path, damage, message):
    import yaml

    from tests.conftest import tiny_config_dict

    root = write_tiny_folder(tmp_path / "data", per_class=8)
    if damage == "missing":
        root = tmp_path / "does-not-exist"
    elif damage == "empty_class":
        (root / "zzz").mkdir()
    else:
        (root / "digit1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    cfg = tiny_config_dict(root, tmp_path / "runs")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(cli, ["run", str(path)])
    assert r.exit_code == 1
    assert message in r.output
    # "run 'tiny' -> ..." + the error line; or, from the data check, every problem under one heading
    lines = r.output.strip().splitlines()
    assert len(lines) == 2 if damage == "missing" else lines[1:3] == [
        "error:", f"the data check found 1 problem(s){' (data.on_bad_file: skip leaves unreadable files out)' if damage == 'corrupt' else ''}; "
        f"details in {tmp_path / 'runs' / 'tiny' / 'data_check.json'}:"] and len(lines) == 4
    assert "Traceback" not in r.output
    assert not (tmp_path / "runs" / "tiny" / "bundle").exists()
    assert not list((tmp_path / "runs").rglob("*.onnx"))
