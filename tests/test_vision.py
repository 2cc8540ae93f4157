"""MobileNetV2 on real ImageNet weights: key compatibility, real predictions, freezing, BatchNorm, Conv LoRA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import perturb_adapters
from tunesmith.adapters import LoraConfig, add_adapter, merge_adapters, merge_and_unload
from tunesmith.config import load_config
from tunesmith.data.formats import DataError
from tunesmith.freeze import freeze_first_blocks, set_train_mode, train_only
from tunesmith.train import train
from tunesmith.vision.data import encode_images, to_tensor
from tunesmith.vision.mobilenet import MobileNetV2, imagenet_classes, imagenet_weights_path, load_mobilenet_v2


@pytest.fixture(scope="module")
def imagenet_model():
    return load_mobilenet_v2().eval()


def test_state_dict_keys_match_the_shipped_weights_strictly():
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model = MobileNetV2()
    assert set(model.state_dict()) == set(state)
    model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key or shape
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    assert len(imagenet_classes()) == 1000 and imagenet_classes()[0] == "tench"


def photo(img: np.ndarray) -> torch.Tensor:
    """ImageNet eval preprocessing: shorter side 256, centre crop 224."""
    x = torch.tensor(img).permute(2, 0, 1).float() / 255
    h, w = x.shape[1:]
    s = 256 / min(h, w)
    x = torch.nn.functional.interpolate(x[None], size=(round(h * s), round(w * s)), mode="bilinear", antialias=True)[0]
    top, left = (x.shape[1] - 224) // 2, (x.shape[2] - 224) // 2
    return to_tensor(x[:, top:top + 224, left:left + 224].numpy(), 224)


def test_predictions_on_real_photos_are_imagenet_classes(imagenet_model):
    from sklearn.datasets import load_sample_images
    photos = load_sample_images()
    with torch.no_grad():
        probs = imagenet_model(torch.stack([photo(i) for i in photos.images])).softmax(-1)
    names = imagenet_classes()
    top = [(names[int(p.argmax())], float(p.max())) for p in probs]
    print("top-1:", dict(zip(["china.jpg", "flower.jpg"], top)))
    assert top[0][0] in {"palace", "monastery", "stupa", "castle", "bell_cote"} and top[0][1] > 0.3
    assert top[1][1] > 0.3, "a trained model is confident on a real photo (random weights give ~0.001)"
    random_model = MobileNetV2().eval()
    with torch.no_grad():
        assert random_model(photo(photos.images[0])[None]).softmax(-1).max() < 0.05


def tiny_images(tmp_path, n=6):
    from PIL import Image
    g = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((g.random((12, 10, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    return tmp_path / "imgs"


def test_image_folders_npz_and_errors(tmp_path):
    root = tiny_images(tmp_path)
    examples, classes = encode_images(str(root), 32)
    assert classes == ["cat", "dog"] and examples[0]["pixel_values"].shape == (3, 32, 32) and len(examples) == 12
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"broken.png:0: image: unreadable"):
        encode_images(str(root), 32)
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 8, 8)), y=np.array([0, 1, 0, 1]))
    ex, cls = encode_images(str(tmp_path / "a.npz"), 16)
    assert len(ex) == 4 and cls == [0, 1]
    with pytest.raises(DataError, match="classes 7 were not in the training data"):
        np.savez(tmp_path / "b.npz", x=np.zeros((1, 8, 8)), y=np.array([7]))
        encode_images(str(tmp_path / "b.npz"), 16, {0: 0, 1: 1})
    grey = to_tensor(np.ones((8, 8)), 16)
    assert grey.shape == (3, 16, 16) and torch.allclose(grey[0].mean(), torch.tensor((1 - 0.485) / 0.229), atol=1e-4)


def test_builtin_datasets_are_real_and_split():
    mnist_train, classes = encode_images("mnist:train", 32)
    mnist_test, _ = encode_images("mnist:test", 32)
    assert len(mnist_train) == 4000 and len(mnist_test) == 1000 and classes == list(range(10))
    digits, _ = encode_images("digits:all", 32)
    assert len(digits) == 1797


def test_freeze_depth_keeps_weights_and_bn_statistics(tmp_path, imagenet_model):
    """Train with the first 10 blocks frozen: their weights and BatchNorm running stats must not move."""
    cfg = load_config(None, ["model.name=mobilenet-v2-imagenet", "data.train=mnist:train", "data.eval_fraction=0",
                             "data.max_examples=128", "data.image_size=32", "freeze.first_blocks=10",
                             "training.max_steps=3", "training.batch_size=32", "training.lr=1e-2",
                             "training.save_every=0", f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    from tunesmith.train.setup import build
    model = build(cfg).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(cfg, log=lambda *_: None)
    after = load_run_state(tmp_path / "run")
    for k, v in before.items():
        if k.startswith(tuple(f"features.{i}." for i in range(10))):
            assert torch.equal(after[k], v), f"{k} changed although its block is frozen"
    changed = [k for k in before if k.startswith("features.15.") and not torch.equal(after[k], before[k])]
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("weight") for k in changed)


def load_run_state(run_dir):
    from safetensors.torch import load_file
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_head_only_touches_only_the_head(tmp_path):
    cfg = load_config(None, ["model.name=mobilenet-v2-imagenet", "data.train=mnist:train", "data.eval_fraction=0",
                             "data.max_examples=64", "data.image_size=32", "freeze.train_only=[classifier]",
                             "training.max_steps=2", "training.batch_size=32", "training.save_every=0",
                             f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    final = {}

    def keep_last_state(event):
        final.update({k: v.detach().clone() for k, v in event.model.state_dict().items()})

    result = train(cfg, on_step=keep_last_state, log=lambda *_: None)
    original = load_mobilenet_v2().state_dict()
    for k, v in original.items():
        if not k.startswith("classifier."):
            assert torch.equal(final[k], v), k  # weights and BN statistics alike
    assert final["classifier.1.weight"].shape == (10, 1280)
    # so the run saves just the head (KiB, not the 14 MB model), and loads back as base + head
    assert result["saved"].endswith("head") and not (tmp_path / "run" / "model").exists()
    from safetensors.torch import load_file
    from tunesmith.train import load_run
    saved = load_file(str(tmp_path / "run" / "head" / "head.safetensors"))
    assert set(saved) == {"1.weight", "1.bias"}
    model = load_run(tmp_path / "run").model
    assert torch.equal(model.state_dict()["classifier.1.weight"], final["classifier.1.weight"])


def test_train_mode_policy():
    model = load_mobilenet_v2(10)
    train_only(model, ["classifier"])
    set_train_mode(model, "auto")
    assert not model.features[3].conv[0][1].training and model.classifier.training
    freeze_first_blocks(model, 0)
    set_train_mode(model, "train_all")
    assert model.features[3].conv[0][1].training


def test_conv_lora_merged_equals_unmerged(imagenet_model):
    model = load_mobilenet_v2(10).eval()
    report = add_adapter(model, LoraConfig(targets="all-conv", r=4, alpha=8, modules_to_save=["classifier"]))
    assert all("conv.1.0" not in m.name for m in report.modules), "depthwise convs are skipped"
    assert len(report.modules) == 35  # stem + 16 expand + 17 project + last 1x1
    perturb_adapters(model, std=0.05)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        unmerged = model(x)
        merge_adapters(model)
        assert torch.allclose(model(x), unmerged, atol=1e-5)
        plain = merge_and_unload(model)
        assert torch.allclose(plain(x), unmerged, atol=1e-5)
    assert type(plain.features[1].conv[1]) is torch.nn.Conv2d
