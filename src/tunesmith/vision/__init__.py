"""Vision: MobileNetV2 with real ImageNet weights (torchvision-compatible keys) and image datasets."""
from .mobilenet import MobileNetV2, imagenet_classes, load_mobilenet_v2

__all__ = ["MobileNetV2", "imagenet_classes", "load_mobilenet_v2"]
