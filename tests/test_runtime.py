"""runtime.Segmenter on the bundled model: results, batches, sizes, helpers and bad input."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT, SAMPLES
from crf import CRFParams
from runtime import ImageError, ModelFormatError, Segmenter, SizeLimits
from runtime.contract import PAD_PIXEL_BGR, aligned_size, pad_image
from runtime.palette import VOC_CLASSES, voc_palette, write_indexed_png
from evaluation.metrics import confusion, mean_iou
from scenes import held_out_scene


@pytest.fixture(scope="module")
def seg(bundled_onnx):
    return Segmenter(bundled_onnx)


@pytest.fixture(scope="module")
def seg_nocrf(bundled_onnx):
    return Segmenter(bundled_onnx, crf=None)


def test_contract_sizes_and_padding():
    assert [aligned_size(n) for n in (1, 2, 9, 10, 321, 500)] == [1, 9, 9, 17, 321, 505]
    img = np.full((3, 5, 3), 7, np.uint8)
    p = pad_image(img, 9, 9)
    assert p.shape == (9, 9, 3) and (p[:3, :5] == 7).all() and tuple(p[8, 8]) == PAD_PIXEL_BGR == (104, 117, 123)


def test_segments_a_generated_scene_accurately(seg):
    image, truth = held_out_scene(3)
    r = seg(image, return_probabilities=True)
    assert r.labels.shape == truth.shape and r.labels.dtype == np.uint8
    assert r.probabilities.shape == (5, *truth.shape)
    np.testing.assert_allclose(r.probabilities.sum(0), 1, atol=1e-4)
    assert (r.labels == truth).mean() > 0.9
    assert set(r.timings) == {"preprocess", "network", "crf", "postprocess", "total"}
    assert r.timings["crf"] > 0 and r.timings["network"] > 0
    assert seg.crf_backend in ("cpu", "gpu")  # the compiled kernels, not the numpy fallback


def test_crf_raises_mean_iou_on_held_out_scenes(seg, seg_nocrf):
    n = seg.num_classes
    c_plain, c_crf = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64)
    for i in range(12):
        image, truth = held_out_scene(i)
        c_plain += confusion(seg_nocrf(image).labels, truth, n)
        c_crf += confusion(seg(image).labels, truth, n)
    assert mean_iou(c_crf)[0] > mean_iou(c_plain)[0]


def test_scores_are_what_the_crf_refines(seg, seg_nocrf):
    """return_scores gives the upsampled logits: their argmax is the no-CRF labelling, and
    crf.refine on them is exactly what the Segmenter's own CRF stage gives (evaluation.accuracy
    relies on this to run the network once per scene)."""
    from crf import refine

    image, _ = held_out_scene(5)
    plain = seg_nocrf(image, return_scores=True)
    assert plain.scores.shape == (5, *image.shape[:2]) and plain.scores.dtype == np.float32
    assert np.array_equal(plain.scores.argmax(0), plain.labels)
    assert seg_nocrf(image).scores is None
    with_crf = seg(image, return_probabilities=True, return_scores=True)
    assert np.array_equal(with_crf.scores, plain.scores)
    q = refine(plain.scores, plain.image, CRFParams())
    assert np.array_equal(q, with_crf.probabilities) and np.array_equal(q.argmax(0), with_crf.labels)


def test_class_names_palette_and_helpers(seg):
    assert seg.class_names == ("background", "disc", "square", "triangle", "star")
    assert seg.class_name(4) == "star" and len(seg.class_color(1)) == 3
    r = seg(SAMPLES / "scene_0.png")
    m, o = seg.mask(r), seg.overlay(r)
    assert m.shape == o.shape == r.image.shape and m.dtype == o.dtype == np.uint8
    # mask colours are the palette (BGR); overlay leaves background pixels untouched
    y, x = np.argwhere(r.labels == r.labels.max())[0]
    assert tuple(m[y, x][::-1]) == seg.class_color(int(r.labels.max()))
    bg = r.labels == 0
    assert (o[bg] == r.image[bg]).all() and not (o[~bg] == r.image[~bg]).all()


def test_class_ids_out_of_range_are_refused_with_the_range(seg):
    """A negative id used to count from the end (class_name(-1) == "star"), a large one raised a bare
    'tuple index out of range'."""
    assert seg.class_name(np.uint8(4)) == "star" and seg.class_color(np.int64(0)) == seg.class_color(0)
    for bad in (-1, 5, 99):
        for helper in (seg.class_name, seg.class_color):
            with pytest.raises(IndexError, match=rf"class id {bad} is out of range: the model has 5 classes \(0..4\)"):
                helper(bad)
    with pytest.raises(TypeError, match="class id must be an integer, got float"):
        seg.class_name(1.0)


def test_overrides(bundled_onnx):
    s = Segmenter(bundled_onnx, crf=None, class_names=list("abcde"), palette=voc_palette(5))
    assert s.class_names == tuple("abcde") and s.class_color(1) == (128, 0, 0)
    with pytest.raises(ValueError, match="3 class names for a 5-class model"):
        Segmenter(bundled_onnx, class_names=list("abc"))
    with pytest.raises(ValueError, match="palette"):
        Segmenter(bundled_onnx, palette=[[0, 0, 0]])
    with pytest.raises(TypeError, match="CRFParams"):
        Segmenter(bundled_onnx, crf={"bi_w": 5})
    with pytest.raises(ValueError, match="CRFParams.bi_w"):
        Segmenter(bundled_onnx, crf=CRFParams(bi_w=0))


def test_bad_segmenter_options(bundled_onnx, tmp_path):
    with pytest.raises(ValueError, match="max_size must be >= 9"):
        SizeLimits(max_size=4)
    with pytest.raises(ValueError, match="input_size must be positive"):
        SizeLimits(input_size=(0, 65))
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        SizeLimits(max_batch=0)
    with pytest.raises(TypeError, match="SizeLimits"):
        Segmenter(bundled_onnx, limits={"max_size": 4})
    assert SizeLimits(input_size=[np.int64(65), 97]).input_size == (65, 97)
    with pytest.raises(ValueError, match="crf backend|CRF backend"):
        Segmenter(bundled_onnx, crf_backend="fpga")
    with pytest.raises(ValueError, match="is a TensorRT plan: backend 'onnxruntime' runs .onnx"):
        Segmenter(tmp_path / "m.engine", backend="onnxruntime")


def test_more_than_256_classes_is_refused(tmp_path):
    pytest.importorskip("torch")  # the 257-class model is exported here
    from export.model import DeepLabV1, ModelConfig
    from export.onnx_export import export_onnx

    path = export_onnx(DeepLabV1(ModelConfig(num_classes=257, width=0.0625)), tmp_path / "m257.onnx")
    with pytest.raises(ValueError, match="257 classes: labels are uint8"):
        Segmenter(path)


def test_overlay_alpha_is_checked(seg_nocrf):
    r = seg_nocrf(held_out_scene(0)[0])
    with pytest.raises(ValueError, match="alpha"):
        seg_nocrf.overlay(r, alpha=1.5)


def test_batch_equals_single_and_keeps_order(bundled_onnx, seg_nocrf):
    images = [held_out_scene(i)[0] for i in range(4)]
    images += [images[0].copy(), images[0][::-1].copy(), images[0][:, ::-1].copy()]  # same size as image 0
    batch = Segmenter(bundled_onnx, crf=None, limits=SizeLimits(max_batch=2))(images)  # image 0's group runs as 2 + 2
    assert len(batch) == 7
    for img, r in zip(images, batch):
        single = seg_nocrf(img)
        assert r.labels.shape == img.shape[:2]
        assert (single.labels == r.labels).all()


def test_large_image_is_shrunk_for_the_network_and_labelled_at_full_size(bundled_onnx):
    image, truth = held_out_scene(5)
    big = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    big_truth = cv2.resize(truth, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    s = Segmenter(bundled_onnx, crf=None, limits=SizeLimits(max_size=max(image.shape[:2])))
    r = s(big)
    assert r.labels.shape == big.shape[:2]
    assert (r.labels == big_truth).mean() > 0.85


def test_fixed_input_size(bundled_onnx):
    image, _ = held_out_scene(1)
    s = Segmenter(bundled_onnx, crf=None, limits=SizeLimits(input_size=(385, 385)))
    assert s(image).labels.shape == image.shape[:2]
    with pytest.raises(ImageError, match="exceeds input_size"):
        Segmenter(bundled_onnx, crf=None, limits=SizeLimits(input_size=(65, 65)))(image)


def test_grayscale_and_bgra_are_converted(seg_nocrf):
    image, _ = held_out_scene(2)
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    assert seg_nocrf(gray).labels.shape == gray.shape
    assert seg_nocrf(gray[:, :, None]).image.shape == (*gray.shape, 3)
    bgra = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    assert (seg_nocrf(bgra).labels == seg_nocrf(image).labels).all()


def test_bad_images(seg, tmp_path):
    with pytest.raises(ImageError, match="not found"):
        seg(tmp_path / "nope.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="cannot decode"):
        seg(tmp_path / "corrupt.png")
    with pytest.raises(ImageError, match="dtype uint8"):
        seg(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ImageError, match="zero-size"):
        seg(np.zeros((0, 20, 3), np.uint8))
    with pytest.raises(ImageError, match="H x W x 3"):
        seg(np.zeros((20, 20, 2), np.uint8))
    with pytest.raises(ImageError, match="numpy array or a path"):
        seg(12)
    with pytest.raises(ImageError, match="image 1 of the batch: .*dtype uint8"):
        seg([np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20, 3), np.float64)])


def test_not_our_onnx(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 224, 224])
    g = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "other.onnx"))
    with pytest.raises(ModelFormatError, match=r"expected one input 'image' uint8 \[N, H, W, 3\].*found input: tensor\(float\)"):
        Segmenter(tmp_path / "other.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelFormatError, match="not a loadable ONNX model"):
        Segmenter(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError):
        Segmenter(tmp_path / "absent.onnx")
    with pytest.raises(ValueError, match="backend"):
        Segmenter(tmp_path / "absent.onnx", backend="tensorflow")


def test_indexed_png_is_a_voc_style_label_file(tmp_path):
    from PIL import Image

    labels = (np.arange(12 * 7) % 21).astype(np.uint8).reshape(7, 12)
    write_indexed_png(tmp_path / "m.png", labels, voc_palette(21))
    im = Image.open(tmp_path / "m.png")
    assert im.mode == "P" and (np.array(im) == labels).all()
    assert im.getpalette()[3 * 15: 3 * 16] == list(voc_palette(21)[15])
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[15] == "person"


def test_runtime_never_imports_torch(bundled_onnx):
    code = (
        "import sys, numpy as np\n"
        "from runtime import Segmenter\n"
        f"s = Segmenter({str(bundled_onnx)!r})\n"
        "r = s(np.full((40, 50, 3), 90, np.uint8))\n"
        "assert r.labels.shape == (40, 50)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_crf_memory_budget_shrinks_large_images(bundled_onnx, seg):
    from runtime.memory import crf_bytes_per_pixel, default_crf_max_pixels

    # The default follows the buffer formula of docs/crf.md: 97.0 MB measured at 500x375 with 21 labels.
    assert abs(crf_bytes_per_pixel(21) * 500 * 375 / 97.0e6 - 1) < 0.1
    assert default_crf_max_pixels(21) * crf_bytes_per_pixel(21) <= 1.5e9 < (default_crf_max_pixels(21) + 1) * crf_bytes_per_pixel(21)
    image, truth = held_out_scene(4)
    h, w = truth.shape
    full = seg(image, return_probabilities=True)
    assert seg.limits.crf_pixels(seg.num_classes) == default_crf_max_pixels(5) > h * w and full.crf_scale == 1.0
    r = Segmenter(bundled_onnx, limits=SizeLimits(crf_max_pixels=h * w // 4))(image, return_probabilities=True, return_scores=True)
    assert 0.45 < r.crf_scale <= 0.5
    assert r.labels.shape == truth.shape and r.probabilities.shape == (5, h, w)
    np.testing.assert_allclose(r.probabilities.sum(0), 1, atol=1e-4)
    assert np.array_equal(r.labels, r.probabilities.argmax(0))
    plain = r.scores.argmax(0)
    # The shrunken CRF still refines: closer to the truth than the network alone, close to the full CRF.
    assert (r.labels == truth).mean() > (plain == truth).mean()
    assert (r.labels == full.labels).mean() > 0.95
    with pytest.raises(ValueError, match="crf_max_pixels must be >= 1"):
        SizeLimits(crf_max_pixels=0)


def test_progress_is_reported_per_stage(seg, seg_nocrf):
    """A progress callback hears every image pass every stage, so a bar can move while a large
    image is in the CRF (tools/segment.py draws one)."""
    image, _ = held_out_scene(5)
    stages: list = []
    seg(image, progress=stages.append)
    assert stages == ["preprocess", "network", "crf"]
    stages.clear()
    seg_nocrf([image, image[:100, :120]], progress=stages.append)
    assert sorted(stages) == sorted(["preprocess", "network", "crf"] * 2) and stages[:2] == ["preprocess"] * 2
