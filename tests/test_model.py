"""The PyTorch model is faithful to the released Caffe DeepLab-LargeFOV."""
from __future__ import annotations

import pytest
import torch

from export.model import HEADS, DeepLabV1, ModelConfig, count_parameters, score_size


@pytest.mark.parametrize("variant,millions", [("largefov", 20.5), ("7x7", 134.3), ("4x4", 65.1)])
def test_parameter_counts_match_the_paper(variant, millions):
    n = count_parameters(DeepLabV1(ModelConfig(variant=variant)))
    assert round(n / 1e6, 1) == millions


def test_largefov_layers():
    net = DeepLabV1()
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert names == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                     "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7", "fc8"]
    for n in ("conv5_1", "conv5_2", "conv5_3"):
        assert getattr(net, n).dilation == (2, 2) and getattr(net, n).padding == (2, 2)
    assert net.fc6.kernel_size == (3, 3) and net.fc6.dilation == (12, 12) and net.fc6.padding == (12, 12)
    assert net.fc6.out_channels == 1024 and net.fc7.out_channels == 1024 and net.fc8.out_channels == 21
    assert net.use_pool5a


@pytest.mark.parametrize("size,expected", [(321, 41), (513, 65), (300, 39), (17, 3)])
def test_score_map_sizes(size, expected):
    net = DeepLabV1(ModelConfig(width=0.0625)).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, size, size + 8))
    assert score_size(size) == expected
    assert tuple(out.shape) == (1, 21, expected, score_size(size + 8))


def test_pooling_is_caffe_ceil_mode_and_pool5a_counts_padding():
    net = DeepLabV1(ModelConfig(width=0.0625)).eval()
    # ceil mode: an even 8k input gives one more row than floor mode would at each stride-2 pool
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 320, 320)).shape[-1] == 41
    # count_include_pad: averaging a constant map, the corner of pool5a sees 4 of 9 real values.
    x = torch.ones(1, 1, 5, 5)
    y = torch.nn.functional.avg_pool2d(x, 3, 1, 1, ceil_mode=True, count_include_pad=True)
    assert abs(float(y[0, 0, 0, 0]) - 4 / 9) < 1e-6


def test_dropout_only_in_training():
    torch.manual_seed(0)
    net = DeepLabV1(ModelConfig(width=0.0625))
    x = torch.randn(1, 3, 33, 33) * 50
    net.train()
    a, b = net(x), net(x)
    assert not torch.equal(a, b)
    net.eval()
    assert torch.equal(net(x), net(x))


def test_width_multiplier():
    net = DeepLabV1(ModelConfig(num_classes=5, width=0.125))
    assert net.conv1_1.out_channels == 8 and net.conv5_3.out_channels == 64 and net.fc6.out_channels == 128


@pytest.mark.parametrize("kwargs", [dict(variant="resnet"), dict(width=0), dict(width=1.5), dict(num_classes=0)])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        ModelConfig(**kwargs)


def test_heads_table():
    assert set(HEADS) == {"largefov", "7x7", "4x4"}
