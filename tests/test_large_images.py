"""Large images: the peak memory of a Segmenter call is modelled (runtime/memory.py), held to a
budget, and what cannot fit is refused before anything large is allocated; labels reach full size
through bounded strips (runtime/upsample.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from runtime import Segmenter, SizeLimits
from runtime.errors import ImageTooLarge
from runtime.memory import CRF_MEMORY_BUDGET, crf_buffer_bytes, crf_size
from runtime.upsample import resize_scores, upsampled_argmax
from conftest import png_declaring


@pytest.fixture(scope="module")
def seg(bundled_onnx):
    return Segmenter(bundled_onnx)


@pytest.mark.parametrize("c,h0,w0,h,w", [(5, 13, 17, 100, 61), (21, 60, 80, 333, 517), (3, 1, 1, 7, 9),
                                         (4, 10, 10, 10, 10), (2, 40, 50, 17, 23), (200, 9, 11, 50, 40)])
def test_strips_give_the_labels_of_the_whole_resize(c, h0, w0, h, w):
    scores = np.random.default_rng(c).normal(0, 3, (c, h0, w0)).astype(np.float32)
    whole = resize_scores(scores, h, w).argmax(0)
    for strip_bytes in (1, 4 * c * w * 7, 1 << 30):  # one row a strip, a few rows, everything at once
        strips = upsampled_argmax(scores, h, w, strip_bytes=strip_bytes)
        assert strips.dtype == np.uint8 and strips.shape == (h, w)
        assert (strips != whole).mean() < 1e-4  # float rounding only


def test_images_over_max_pixels_are_refused(bundled_onnx):
    small = Segmenter(bundled_onnx, limits=SizeLimits(max_pixels=1000))
    with pytest.raises(ImageTooLarge) as e:
        small(np.zeros((40, 30, 3), np.uint8))
    assert e.value.limit == 1000 and e.value.pixels == 1200
    assert small(np.zeros((25, 40, 3), np.uint8)).labels.shape == (25, 40)
    with pytest.raises(ValueError, match="max_pixels"):
        SizeLimits(max_pixels=0)


def test_over_the_memory_budget_is_refused_before_decoding(seg, tmp_path):
    f = tmp_path / "huge.png"
    f.write_bytes(png_declaring(20000, 15000, colour_type=2))  # 300 MP: under a raised max_pixels, over the budget
    big = Segmenter(seg.model_path, limits=SizeLimits(max_pixels=10**9))
    with pytest.raises(ImageTooLarge, match="memory_budget") as e:
        big(f)  # its pixel data is garbage: reaching the decoder would raise a decode error instead
    assert "huge.png" in str(e.value) and e.value.limit == int(big.limits.memory_budget)
    assert big.memory_model(15000, 20000).total > big.limits.memory_budget


def test_returned_maps_count_against_the_budget(bundled_onnx):
    image = np.zeros((600, 800, 3), np.uint8)
    tight = Segmenter(bundled_onnx, crf=None, limits=SizeLimits(memory_budget=30e6))
    assert tight.memory_model(600, 800).total < 30e6 < tight.memory_model(600, 800, return_probabilities=True).total
    assert tight(image).labels.shape == (600, 800)
    with pytest.raises(ImageTooLarge, match="memory_budget"):
        tight(image, return_probabilities=True)
    with pytest.raises(ImageTooLarge, match="image 0 of the batch"):  # in a list, the image is named
        tight([image, image], return_scores=True)


def test_the_shrunken_crf_is_held_to_its_byte_budget():
    # A smaller copy runs with smaller spatial bandwidths, whose lattice is denser: the size is
    # chosen so that the buffers at the scaled bandwidths fit, for every image size.
    for mp in (3, 12, 48, 100):
        h, w = int((mp * 1e6 * 0.75) ** 0.5), int((mp * 1e6 / 0.75) ** 0.5)
        ch, cw = crf_size(h, w, 21, 2_830_000, 3.0, 50.0, CRF_MEMORY_BUDGET)
        f = (ch * cw / (h * w)) ** 0.5
        assert ch * cw <= 2_830_000 and abs(ch / h - cw / w) < 0.01
        assert crf_buffer_bytes(ch * cw, 21, 3.0 * f, 50.0 * f) <= CRF_MEMORY_BUDGET
        assert crf_buffer_bytes((ch + 2) * (cw + 2), 21, 3.0 * f, 50.0 * f) > 0.9 * CRF_MEMORY_BUDGET or \
            ch * cw > 2_700_000  # the largest that fits (or the pixel cap)


def test_default_limits_agree(seg):
    # max_pixels (100 MP) and memory_budget agree: the largest image allowed fits the budget with the
    # CRF, for the bundled model and for 21 classes (a VOC model at max_size 1025: 1033 x 777 padded).
    from runtime.memory import DEFAULT_MEMORY_BUDGET, call_memory, default_crf_max_pixels

    h, w = 8660, 11547
    assert h * w <= seg.limits.max_pixels and seg.memory_model(h, w).total <= seg.limits.memory_budget
    ch, cw = crf_size(h, w, 21, default_crf_max_pixels(21), 3.0, 50.0, CRF_MEMORY_BUDGET)
    f = (ch * cw / (h * w)) ** 0.5
    voc = call_memory(h, w, 21, 1033 * 777, ch * cw, crf_buffer_bytes(ch * cw, 21, 3.0 * f, 50.0 * f))
    assert voc.total <= DEFAULT_MEMORY_BUDGET


GROWTH = r"""
import json, resource, sys
import cv2, numpy as np
sys.path.insert(0, sys.argv[1])
from runtime import Segmenter, SizeLimits
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
seg = Segmenter(sys.argv[2], limits=SizeLimits(crf_max_pixels=200_000))
scene = cv2.imread(sys.argv[1] + "/samples/scene_0.png")
big = cv2.resize(scene, (4000, 3000), interpolation=cv2.INTER_LINEAR)
# Same network size (1025x769) and CRF size as the 12 MP image: everything but the full-size work.
seg(cv2.resize(big, (1025, 769), interpolation=cv2.INTER_AREA))
before = peak()
r = seg(big)
m, m0 = seg.memory_model(3000, 4000), seg.memory_model(769, 1025)
# What the 12 MP call adds over the network-size call: its CRF's denser lattice (smaller bandwidths),
# its strips (counted whole: the smaller call's strips were smaller) and its labels.
print(json.dumps({"growth": peak() - before, "modelled": (m.crf - m0.crf) + m.full_size + m.outputs,
                  "full_size": m.full_size, "scale": r.crf_scale, "labels": list(r.labels.shape)}))
"""


def test_a_12_mp_image_costs_what_the_model_says_over_its_network_size(bundled_onnx):
    """The full-size scores and marginals are never made: above a call at the network's size, a 12 MP
    image adds its labels, the strips and a denser CRF lattice, as modelled (the old route made
    5 x 12 M float32 maps twice: ~0.5 GB more)."""
    out = subprocess.run([sys.executable, "-c", GROWTH, str(ROOT), str(bundled_onnx)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["labels"] == [3000, 4000] and r["scale"] < 1
    assert r["full_size"] < r["modelled"] < 300e6
    assert r["growth"] <= r["modelled"] + 48e6, r


def test_a_timeout_stops_the_crf_between_iterations_and_the_segmenter_stays_usable(bundled_onnx):
    import time

    from crf import CRFParams, CRFTimeout, refine
    from benchmarking.inputs import smooth_logits

    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    scores = smooth_logits(300, 400, 5)
    for backend in ("cpu", "numpy"):
        t = time.monotonic()
        with pytest.raises(CRFTimeout, match="of 100 iterations"):
            refine(scores, image, CRFParams(iterations=100), backend=backend, deadline=t + 0.05)
        assert time.monotonic() - t < 5  # 100 iterations would take much longer
    seg = Segmenter(bundled_onnx, crf=CRFParams(iterations=100))
    with pytest.raises(TimeoutError):
        seg(image, timeout=0.05)
    with pytest.raises(ValueError, match="timeout"):
        seg(image, timeout=0)
    assert seg.with_crf(CRFParams(iterations=2))(image, timeout=60).labels.shape == (300, 400)
