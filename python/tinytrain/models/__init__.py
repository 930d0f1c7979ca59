"""Model zoo: the three networks of the seed paper (random init, BatchNormalization present) and
the small pretrained demo model shipped in the package.

The architectures follow the published configs:

* ``mcunet_5fps`` — MCUNet "5fps" ImageNet net (mit-han-lab/mcunet ``mcunet-5fps_imagenet``,
  model-zoo id ``mcunet-in1``): 16-channel stem, 14 inverted-residual blocks with mixed 3/5/7
  kernels and per-block expansion, no feature-mix layer, 160-d classifier.
* ``mobilenetv2`` — MobileNetV2 (Sandler et al.) with the width multiplier applied the OFA /
  tiny-training way (channels rounded to multiples of 8, the 1x1 feature-mix layer scaled too:
  448 channels at w0.35, as in mcunet's ``mbv2-w0.35`` config; no residual on the first block).
* ``proxylessnas`` — ProxylessNAS-Mobile (Cai et al.), the searched block list with its skip
  (zero) blocks removed, width multiplier applied to every stage like ``mobilenetv2``.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import onnx

from ._builder import OnnxBuilder, make_divisible

__all__ = ["mcunet_5fps", "mobilenetv2", "proxylessnas", "demo", "DEMO_PATH"]

#: The pretrained demo model (see scripts/train_demo_model.py and tinytrain.datasets).
DEMO_PATH = os.path.join(os.path.dirname(__file__), "demo_digits.onnx")

# (in, out, kernel, stride, mid) of mcunet-5fps_imagenet; a block has the identity shortcut
# exactly when stride is 1 and in == out (as in the published config).
_MCUNET_5FPS: List[Tuple[int, int, int, int, int]] = [
    (16, 8, 3, 1, 16),
    (8, 16, 3, 2, 32),
    (16, 16, 3, 1, 48),
    (16, 24, 7, 2, 48),
    (24, 24, 3, 1, 120),
    (24, 40, 3, 2, 120),
    (40, 40, 7, 1, 160),
    (40, 48, 5, 1, 160),
    (48, 48, 3, 1, 144),
    (48, 48, 3, 1, 192),
    (48, 96, 7, 2, 240),
    (96, 96, 5, 1, 384),
    (96, 96, 5, 1, 384),
    (96, 160, 3, 1, 576),
]

# ProxylessNAS-Mobile after its zero blocks: (expand, out, kernel, stride) at width 1.
_PROXYLESS_MOBILE: List[Tuple[int, int, int, int]] = [
    (3, 32, 5, 2), (3, 32, 3, 1),
    (3, 40, 7, 2), (3, 40, 3, 1), (3, 40, 5, 1), (3, 40, 5, 1),
    (6, 80, 7, 2), (3, 80, 5, 1), (3, 80, 5, 1), (3, 80, 5, 1),
    (6, 96, 5, 1), (3, 96, 5, 1), (3, 96, 5, 1), (3, 96, 5, 1),
    (6, 192, 7, 2), (6, 192, 7, 1), (3, 192, 7, 1), (3, 192, 7, 1),
    (6, 320, 7, 1),
]

# MobileNetV2 stages: (expand t, channels c, repeats n, stride s).
_MBV2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _check(resolution: int, num_classes: int) -> None:
    if int(resolution) != resolution or resolution < 32:
        raise ValueError(f"resolution must be an integer >= 32 (the networks downsample 32x), got {resolution}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def mcunet_5fps(resolution: int = 128, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """MCUNet-5FPS (mcunet-in1). Paper figures at 128x128: 23M MACs, 0.48M backbone params."""
    _check(resolution, num_classes)
    b = OnnxBuilder("mcunet_5fps", 3, resolution, seed)
    x = b.conv_bn("input", 3, 16, 3, 2)
    for cin, cout, k, s, mid in _MCUNET_5FPS:
        x = b.mb_block(x, cin, cout, k, s, mid, residual=(s == 1 and cin == cout))
    return b.classifier(x, 160, num_classes)


def mobilenetv2(width: float = 0.35, resolution: int = 128, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 with a width multiplier. Paper figures for w0.35 at 128: 17M MACs, 0.25M params."""
    _check(resolution, num_classes)
    b = OnnxBuilder(f"mobilenetv2_w{width}", 3, resolution, seed)
    cin = make_divisible(32 * width)
    x = b.conv_bn("input", 3, cin, 3, 2)
    for t, c, n, s in _MBV2:
        cout = make_divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            mid = make_divisible(round(cin * t)) if t > 1 else cin
            x = b.mb_block(x, cin, cout, 3, stride, mid, residual=(t > 1 and stride == 1 and cin == cout))
            cin = cout
    last = make_divisible(1280 * width)
    x = b.conv_bn(x, cin, last, 1)
    return b.classifier(x, last, num_classes)


def proxylessnas(width: float = 0.3, resolution: int = 128, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """ProxylessNAS-Mobile with a width multiplier. Paper figures for w0.3 at 128: 19M MACs, 0.33M params."""
    _check(resolution, num_classes)
    b = OnnxBuilder(f"proxylessnas_w{width}", 3, resolution, seed)
    stem = make_divisible(32 * width)
    x = b.conv_bn("input", 3, stem, 3, 2)
    cin = make_divisible(16 * width)
    x = b.mb_block(x, stem, cin, 3, 1, stem, residual=False)
    for t, c, k, s in _PROXYLESS_MOBILE:
        cout = make_divisible(c * width)
        mid = make_divisible(round(cin * t))
        x = b.mb_block(x, cin, cout, k, s, mid, residual=(s == 1 and cin == cout))
        cin = cout
    last = make_divisible(1280 * width)
    x = b.conv_bn(x, cin, last, 1)
    return b.classifier(x, last, num_classes)


def demo() -> onnx.ModelProto:
    """The pretrained demo CNN (digits 0-4, 1x32x32 input; see tinytrain.datasets.digits)."""
    return onnx.load(DEMO_PATH)
