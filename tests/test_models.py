import os
import urllib.error

import pytest
import torch

from pipeline.data import eval_transform
from pipeline.errors import ModelError
from pipeline.models import MODELS, create_model, list_models
from runtime.preprocess import open_image

# Every registered model must appear here; test_every_registered_model_is_tested enforces it.
TESTED = {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "compact_cnn_w0.5", "compact_cnn_w1.0"}


def test_every_registered_model_is_tested():
    assert set(MODELS) == TESTED


@pytest.mark.parametrize("name", sorted(TESTED) + ["torchvision/resnet18", "torchvision/mobilenet_v3_small"])
def test_builds_with_new_head(name):
    torch.manual_seed(0)
    m = create_model(name, 7, "none").eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert m.head.out_features == 7 and m.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, m.num_features)
    assert torch.isfinite(out).all()


def _skimage(name):
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data", name)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_real_weights_classify_real_photos(name):
    m = create_model(name, None, "default").eval()
    tf = eval_transform(m.defaults.preprocess())
    with torch.no_grad():
        cat = m(tf(open_image(_skimage("chelsea.png")))[None]).argmax(1).item()
        coffee = m(tf(open_image(_skimage("coffee.png")))[None]).argmax(1).item()
    assert 281 <= cat <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert coffee in (967, 968)  # espresso / cup


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError, match="unknown model 'resnet9000'; valid: .*efficientnet_lite0"):
        create_model("resnet9000", 3)
    with pytest.raises(ModelError, match="unknown torchvision classification model 'nope'"):
        create_model("torchvision/nope", 3)


def test_missing_weights_file():
    with pytest.raises(ModelError, match="file not found: /no/such.pth"):
        create_model("torchvision/resnet18", 3, "/no/such.pth")


def test_failed_download_says_which_file_and_where(monkeypatch, tmp_path):
    # Simulate an offline machine (the network, not the code under test).
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError) as e:
        create_model("torchvision/resnet18", 3, "default")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg and "\n" not in msg


def test_local_weights_file_round_trip(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=1000)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    m = create_model("torchvision/resnet18", None, str(tmp_path / "r18.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x), net.eval()(x), atol=1e-5)


def test_list_models():
    assert "efficientnet_lite0" in list_models()
