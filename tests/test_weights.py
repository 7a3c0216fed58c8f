"""Weight import: state dicts, safetensors, released caffemodels (synthetic, real names/shapes), VGG-16."""
from __future__ import annotations

import pytest
import torch

from conftest import BUNDLED, realistic_init
from export.caffe import CaffeModelError, NetParameter, read_caffemodel, write_caffemodel
from export.model import DeepLabV1, ModelConfig
from export.weights import WeightsError, load_into, load_model, save_checkpoint, vgg16_to_deeplab


def _same(a: DeepLabV1, b: DeepLabV1):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_safetensors_round_trip_keeps_config_and_names(tmp_path):
    net = realistic_init(DeepLabV1(ModelConfig(num_classes=4, width=0.125)))
    save_checkpoint(net, tmp_path / "m.safetensors", class_names=list("abcd"), palette=[[1, 2, 3]] * 4)
    loaded, meta = load_model(tmp_path / "m.safetensors")
    _same(net, loaded)
    assert loaded.config == net.config and meta["class_names"] == list("abcd")


@pytest.mark.parametrize("prefix", ["", "module.", "net."])
def test_pth_state_dict_with_prefix_and_config_inference(tmp_path, prefix):
    net = realistic_init(DeepLabV1(ModelConfig(num_classes=7, width=0.25)))
    state = {prefix + k.replace("fc8", "fc8_voc12"): v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "m.pth")
    loaded, _ = load_model(tmp_path / "m.pth")
    assert loaded.config == ModelConfig(num_classes=7, width=0.25)
    _same(net, loaded)


def test_wrong_class_count_names_fc8_and_says_what_to_do(tmp_path):
    net = DeepLabV1(ModelConfig(num_classes=5, width=0.125))
    torch.save(net.state_dict(), tmp_path / "m.pth")
    with pytest.raises(WeightsError, match=r"fc8\.weight.*5 classes.*--num-classes 5"):
        load_model(tmp_path / "m.pth", ModelConfig(num_classes=21, width=0.125))


def test_missing_layers_are_named():
    net = DeepLabV1(ModelConfig(width=0.125))
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(("fc7", "conv3_2"))}
    target = DeepLabV1(ModelConfig(width=0.125))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match=r"missing layers: conv3_2\.bias, conv3_2\.weight, fc7\.bias, fc7\.weight"):
        load_into(target, state)
    for k, v in target.state_dict().items():  # nothing half-loaded
        assert torch.equal(v, before[k])


def test_config_inference_names_what_is_wrong(tmp_path):
    net = DeepLabV1(ModelConfig(width=0.0625))
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc6")}
    torch.save(state, tmp_path / "a.pth")
    with pytest.raises(WeightsError, match="not a DeepLab v1 state dict: no fc6.weight"):
        load_model(tmp_path / "a.pth")
    state = dict(net.state_dict(), **{"fc6.weight": torch.zeros(64, 32, 5, 5)})
    torch.save(state, tmp_path / "b.pth")
    with pytest.raises(WeightsError, match="5x5 kernel"):
        load_model(tmp_path / "b.pth")


def test_caffemodel_blob_with_inconsistent_shape(tmp_path):
    net = NetParameter()
    l = net.layers.add(name="conv1_1", type=4)
    b = l.blobs.add(num=64, channels=3, height=3, width=3)
    b.data.extend([0.0] * 10)
    (tmp_path / "bad.caffemodel").write_bytes(net.SerializeToString())
    with pytest.raises(CaffeModelError, match=r"shape \(64, 3, 3, 3\) holds 10 values"):
        read_caffemodel(tmp_path / "bad.caffemodel")


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "x.pt")
    with pytest.raises(WeightsError, match="not a state dict"):
        load_model(tmp_path / "x.pt")
    (tmp_path / "y.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="cannot read safetensors"):
        load_model(tmp_path / "y.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "absent.pth")


def test_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    """Random bytes or text under a .pth / .jpg name: said to be no checkpoint, not torch.load's
    pickle-opcode message that advises weights_only=False."""
    (tmp_path / "x.jpg").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "t.pth").write_text("hello\n")
    for name in ("x.jpg", "t.pth"):
        with pytest.raises(WeightsError, match=r"is not a PyTorch checkpoint \(neither the zip archive") as e:
            load_model(tmp_path / name)
        assert "weights_only" not in str(e.value)


class _NotATensor:
    pass


def test_checkpoint_with_python_objects_is_refused_without_running_them(tmp_path):
    torch.save({"conv1_1.weight": torch.zeros(1), "extra": _NotATensor()}, tmp_path / "obj.pt")
    with pytest.raises(WeightsError, match=r"holds Python objects other than tensors.*state_dict\(\) instead: "
                       r"Unsupported global: GLOBAL .*_NotATensor") as e:
        load_model(tmp_path / "obj.pt")
    assert "weights_only" not in str(e.value)


@pytest.mark.parametrize("legacy", [True, False], ids=["V1-layers", "layer"])
def test_caffemodel_round_trip_full_largefov(tmp_path, legacy):
    """A synthetic caffemodel with the real DeepLab-LargeFOV layer names and blob shapes."""
    net = realistic_init(DeepLabV1())
    path = tmp_path / "train2_iter_8000.caffemodel"
    write_caffemodel(net.state_dict(), path, legacy=legacy)
    raw = NetParameter()
    raw.ParseFromString(path.read_bytes())
    layers = raw.layers if legacy else raw.layer
    names = [l.name for l in layers]
    assert "fc8_voc12" in names and "conv5_3" in names and len(names) == 16
    if legacy:  # biases as 1 x 1 x 1 x N, as the Caffe of 2015 wrote them
        fc6 = next(l for l in layers if l.name == "fc6")
        assert (fc6.blobs[1].num, fc6.blobs[1].channels, fc6.blobs[1].height, fc6.blobs[1].width) == (1, 1, 1, 1024)
    loaded, _ = load_model(path)
    _same(net, loaded)
    x = torch.randint(0, 255, (1, 3, 65, 65)).float() - 110
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_vgg16_20m_caffemodel_without_fc8_gets_fresh_fc8(tmp_path):
    net = DeepLabV1(ModelConfig(width=0.125))
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc8")}
    write_caffemodel(state, tmp_path / "vgg16_20M.caffemodel")
    loaded = read_caffemodel(tmp_path / "vgg16_20M.caffemodel", ModelConfig(width=0.125))
    assert torch.equal(loaded["fc6.weight"], state["fc6.weight"])
    assert loaded["fc8.weight"].shape == (21, 128, 1, 1) and float(loaded["fc8.weight"].std()) < 0.02


def test_caffemodel_class_count_mismatch(tmp_path):
    net = DeepLabV1(ModelConfig(num_classes=21, width=0.125))
    write_caffemodel(net.state_dict(), tmp_path / "m.caffemodel")
    with pytest.raises(CaffeModelError, match=r"fc8_voc12\.weight"):
        read_caffemodel(tmp_path / "m.caffemodel", ModelConfig(num_classes=10, width=0.125))


def test_not_deeplab_caffemodels(tmp_path):
    other = NetParameter(name="AlexNet")
    l = other.layer.add(name="conv1", type="Convolution")
    b = l.blobs.add()
    b.shape.dim.extend([2, 3])
    b.data.extend([0.0] * 6)
    (tmp_path / "alexnet.caffemodel").write_bytes(other.SerializeToString())
    with pytest.raises(CaffeModelError, match="not a DeepLab/VGG caffemodel"):
        read_caffemodel(tmp_path / "alexnet.caffemodel")
    (tmp_path / "junk.caffemodel").write_bytes(b"\xff\xfe not a protobuf at all" * 10)
    with pytest.raises(CaffeModelError):
        read_caffemodel(tmp_path / "junk.caffemodel")
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    with pytest.raises(CaffeModelError, match="no layers with weights"):
        read_caffemodel(tmp_path / "empty.caffemodel")


def test_imagenet_vgg16_decimation():
    """torchvision VGG-16 layout -> LargeFOV: convs copied, fc6 7x7x4096 -> 3x3x1024, fc7 subsampled."""
    g = torch.Generator().manual_seed(0)
    convs = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
             (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
             (26, 512, 512), (28, 512, 512)]
    vgg = {}
    for i, cin, cout in convs:
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g)
        vgg[f"features.{i}.bias"] = torch.randn(cout, generator=g)
    vgg["classifier.0.weight"] = torch.randn(4096, 25088, generator=g)
    vgg["classifier.0.bias"] = torch.randn(4096, generator=g)
    vgg["classifier.3.weight"] = torch.randn(4096, 4096, generator=g)
    vgg["classifier.3.bias"] = torch.randn(4096, generator=g)
    vgg["classifier.6.weight"] = torch.randn(1000, 4096, generator=g)
    vgg["classifier.6.bias"] = torch.randn(1000, generator=g)
    state = vgg16_to_deeplab(vgg, ModelConfig())
    net = DeepLabV1()
    load_into(net, state)
    assert torch.equal(net.conv4_2.weight, vgg["features.19.weight"])
    fc6 = vgg["classifier.0.weight"].reshape(4096, 512, 7, 7)
    assert torch.equal(net.fc6.weight[5], fc6[20][:, ::3, ::3])  # filter 5 = VGG filter 20, taps 0/3/6
    assert torch.equal(net.fc7.weight[7, 9, 0, 0], vgg["classifier.3.weight"][28, 36])
    assert torch.equal(net.fc7.bias, vgg["classifier.3.bias"][::4])
    with pytest.raises(WeightsError, match="features.0.weight"):
        vgg16_to_deeplab({}, ModelConfig())


def test_bundled_checkpoint_is_small_and_complete():
    assert BUNDLED.stat().st_size < 5_000_000
    model, meta = load_model(BUNDLED)
    assert model.config.variant == "largefov" and meta["class_names"][0] == "background"
    assert len(meta["class_names"]) == model.config.num_classes == len(meta["palette"])
