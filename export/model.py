"""DeepLab v1 in PyTorch, faithful to the released Caffe DeepLab-LargeFOV.

Module names are the caffemodel layer names (conv1_1 ... fc8) so weights map by name.
Caffe semantics kept: ceil-mode max pooling, pool5a average pooling counting the padding,
in-place ReLU after every convolution, dropout after fc6 and fc7 (identity at test time).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.contract import MEAN_BGR

# (name, out channels at width 1, dilation) for the VGG-16 convolutions, grouped by block.
VGG_BLOCKS = (
    (("conv1_1", 64), ("conv1_2", 64)),
    (("conv2_1", 128), ("conv2_2", 128)),
    (("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256)),
    (("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512)),
    (("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)),
)

# Head of each variant: fc6 kernel, fc6 dilation ("input stride" in the paper), fc6/fc7 channels,
# and whether the released prototxt has the pool5a average pool.
HEADS = {
    "largefov": dict(kernel=3, dilation=12, channels=1024, pool5a=True),   # 20.5 M params
    "7x7": dict(kernel=7, dilation=4, channels=4096, pool5a=False),        # 134.3 M params
    "4x4": dict(kernel=4, dilation=8, channels=4096, pool5a=False),        # 65.1 M params
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored next to weights and in ONNX metadata."""

    num_classes: int = 21
    variant: str = "largefov"
    width: float = 1.0

    def __post_init__(self) -> None:
        if self.variant not in HEADS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {sorted(HEADS)}")
        if not (self.num_classes >= 1):
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not (0 < self.width <= 1):
            raise ValueError(f"width multiplier must be in (0, 1], got {self.width}")

    def channels(self, base: int) -> int:
        return max(1, int(round(base * self.width)))

    def to_dict(self) -> dict:
        return asdict(self)


class DeepLabV1(nn.Module):
    """DeepLab v1 on a normalised NCHW float input; returns the stride-8 class scores (fc8)."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        head = HEADS[config.variant]
        c_in = 3
        for block, convs in enumerate(VGG_BLOCKS, start=1):
            # conv5 is made dense with dilation 2 (pool4 has stride 1).
            dilation = 2 if block == 5 else 1
            for name, base in convs:
                c_out = config.channels(base)
                self.add_module(name, nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation))
                c_in = c_out
        fc = config.channels(head["channels"])
        k, d = head["kernel"], head["dilation"]
        self.fc6 = nn.Conv2d(c_in, fc, k, padding=d * (k - 1) // 2, dilation=d)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.fc8 = nn.Conv2d(fc, config.num_classes, 1)
        self.drop6 = nn.Dropout(0.5)
        self.drop7 = nn.Dropout(0.5)
        self.use_pool5a = head["pool5a"]

    @staticmethod
    def _max_pool(x: torch.Tensor, stride: int) -> torch.Tensor:
        return F.max_pool2d(x, 3, stride=stride, padding=1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, convs in enumerate(VGG_BLOCKS, start=1):
            for name, _ in convs:
                x = F.relu(getattr(self, name)(x), inplace=True)
            # pool1..pool3 stride 2, pool4 and pool5 stride 1 (output stride 8).
            x = self._max_pool(x, 2 if block <= 3 else 1)
        if self.use_pool5a:
            # Stride 1: ceil and floor modes give the same size; floor mode lets ONNX Runtime keep
            # this pool in its blocked (NCHWc) layout instead of reordering around it.
            x = F.avg_pool2d(x, 3, stride=1, padding=1, ceil_mode=False, count_include_pad=True)
        x = self.drop6(F.relu(self.fc6(x), inplace=True))
        x = self.drop7(F.relu(self.fc7(x), inplace=True))
        return self.fc8(x)


def score_size(n: int) -> int:
    """Side of the stride-8 score map for an input side n (Caffe ceil-mode pooling)."""
    for _ in range(3):
        n = (n + 2 - 3 + 1) // 2 + 1  # ceil((n + 2*1 - 3) / 2) + 1
    return n


class DeepLabPipeline(nn.Module):
    """What is exported: raw uint8 NHWC BGR image -> upsampled class scores N x C x H x W.

    Mean subtraction and the align-corners bilinear upsampling (Caffe's Interp) live in the graph,
    so the deployed engine implements the whole contract of ``runtime.contract``.
    """

    def __init__(self, net: DeepLabV1):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN_BGR, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Cast first so that no uint8 tensor is an intermediate (TensorRT allows uint8 only at I/O).
        x = image.to(torch.float32).permute(0, 3, 1, 2) - self.mean
        scores = self.net(x)
        return F.interpolate(scores, size=x.shape[2:], mode="bilinear", align_corners=True)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
