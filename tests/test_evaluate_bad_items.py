"""The evaluation (deeplab-evaluate) and one bad item: an RGB label, a label that is not a PNG, an unreadable image,
a label map of another size, an image failing in the network. Each is skipped with its file and
reason, the others are scored, the JSON is written (also when nothing could be scored) and the
exit status is 1. And label PNGs read by palette index, whatever the palette's colours."""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import cv2
import numpy as np
import pytest

from crf import CRFParams
from runtime.palette import voc_palette, write_indexed_png
from test_evaluate_tool import ONNX, InMemory, make_voc, onnx_model, run_main  # noqa: F401 (a fixture)
from runtime.image_headers import PNG_SIGNATURE
from runtime.palette import png_chunk
from evaluation.accuracy import evaluate
from evaluation.voc import VOCDataset, read_label_png


def png_bytes(values: np.ndarray, depth: int, colour_type: int, palette: bytes | None = None) -> bytes:
    """A PNG of ``values`` (sample values, packed at ``depth`` bits) written byte by byte."""
    h, w = values.shape
    rows = b"".join(b"\0" + np.packbits(np.unpackbits(row.astype(np.uint8)[:, None], axis=1)[:, 8 - depth:]).tobytes()
                    for row in values)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0))
            + (png_chunk(b"PLTE", palette) if palette else b"") + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


LABELS = np.array([[0, 1, 2, 3], [4, 255, 20, 0], [7, 7, 1, 255]], np.uint8)


def test_palette_labels_are_read_by_index_whatever_the_colours(tmp_path):
    # Not VOC's colours, and colours repeated: index 255 (ignore) black like index 0, 20 the colour of 4.
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    palette[255] = palette[0] = 0
    palette[20] = palette[4]
    write_indexed_png(tmp_path / "custom.png", LABELS, palette)
    assert (read_label_png(tmp_path / "custom.png") == LABELS).all()
    # One colour for every entry: only the indices tell the classes apart.
    write_indexed_png(tmp_path / "flat.png", LABELS, np.full((256, 3), 200, np.uint8))
    assert (read_label_png(tmp_path / "flat.png") == LABELS).all()
    # A 2-bit palettised PNG whose 3 entries (index 3 past the palette's end) are all grey.
    small = LABELS % 4
    (tmp_path / "p2.png").write_bytes(png_bytes(small, 2, 3, bytes([90] * 9)))
    assert (read_label_png(tmp_path / "p2.png") == small).all()
    # Greyscale: 8-bit values are the ids; under 8 bits too (libpng alone would turn a 1-bit 1 into 255).
    cv2.imwrite(str(tmp_path / "grey.png"), LABELS)
    assert (read_label_png(tmp_path / "grey.png") == LABELS).all()
    (tmp_path / "g1.png").write_bytes(png_bytes(LABELS % 2, 1, 0))
    assert (read_label_png(tmp_path / "g1.png") == LABELS % 2).all()


def test_palette_labels_written_by_pillow_with_transparency(tmp_path):
    """Another writer's palettised PNG, a palette of repeated colours and a tRNS chunk."""
    Image = pytest.importorskip("PIL.Image")
    im = Image.fromarray(LABELS, mode="P")
    im.putpalette([10, 20, 30] * 128 + [10, 20, 31] * 128)
    im.save(tmp_path / "p.png", transparency=255, optimize=False)
    assert (np.array(Image.open(tmp_path / "p.png")) == LABELS).all()
    assert (read_label_png(tmp_path / "p.png") == LABELS).all()


def spoil(root, ids):
    """ids[1]: an RGB label; ids[2]: a label that is a JPEG; ids[3]: an unreadable image; ids[4]: a label
    map of another size. Returns {id: (the file at fault, a fact of the reason)}."""
    label = root / "SegmentationClass"
    cv2.imwrite(str(label / f"{ids[1]}.png"), np.dstack([read_label_png(label / f"{ids[1]}.png")] * 3))
    cv2.imwrite(str(label / f"{ids[2]}.jpg"), np.zeros((8, 8), np.uint8))
    (label / f"{ids[2]}.jpg").rename(label / f"{ids[2]}.png")
    (root / "JPEGImages" / f"{ids[3]}.jpg").write_bytes(b"not a jpeg")
    write_indexed_png(label / f"{ids[4]}.png", np.zeros((40, 50), np.uint8), voc_palette(256))
    return {ids[1]: (label / f"{ids[1]}.png", "colour type 2"),
            ids[2]: (label / f"{ids[2]}.png", "not a PNG"),
            ids[3]: (root / "JPEGImages" / f"{ids[3]}.jpg", "cannot decode image file"),
            ids[4]: (label / f"{ids[4]}.png", "label map 40x50")}


def check_skipped(entries, expected):
    assert [e["id"] for e in entries] == list(expected)
    for e in entries:
        file, fact = expected[e["id"]]
        assert e["file"] == str(file) and fact in e["reason"], e


def test_bad_items_are_skipped_and_the_rest_scored(tmp_path, onnx_model, capsys):
    ids = make_voc(tmp_path, n=6)
    expected = spoil(tmp_path, ids)
    status, out, err = run_main(["--model", ONNX, "--dataset", tmp_path, "--json", tmp_path / "e.json"], capsys)
    assert status == 1, err
    data = json.loads((tmp_path / "e.json").read_text())
    check_skipped(data["skipped"], expected)
    assert data["images"] == 2
    for name in expected:
        assert f"skipped {name}: " in err
    assert "Traceback" not in err
    assert out.strip().splitlines()[-1].startswith(f"scored 2 of 6 images; skipped 4: {ids[1]}, {ids[2]}")
    # The scores are those of the two good images alone.
    (tmp_path / "ImageSets" / "Segmentation" / "good.txt").write_text(f"{ids[0]}\n{ids[5]}\n")
    good = evaluate([onnx_model], VOCDataset(tmp_path, "good"), CRFParams(), progress=False)
    assert good["skipped"] == []
    for mode in ("no CRF", "CRF"):
        assert data[mode]["confusion"] == good["contenders"][0][mode]["confusion"]
        assert data[mode]["mean_iou"] == good["contenders"][0][mode]["mean_iou"]


def test_nothing_scorable_still_writes_the_json(tmp_path, capsys):
    ids = make_voc(tmp_path, n=2)
    for name in ids:
        (tmp_path / "JPEGImages" / f"{name}.jpg").write_bytes(b"")
    for extra in ([], ["--parity"]):
        status, out, err = run_main(["--model", ONNX, "--dataset", tmp_path, "--json", tmp_path / "e.json", *extra],
                                    capsys)
        assert status == 1 and "Traceback" not in err, err
        data = json.loads((tmp_path / "e.json").read_text())
        assert data["images"] == 0 and len(data["skipped"]) == 2
        assert all("empty image file" in e["reason"] for e in data["skipped"])
        scored = data if not extra else data["contenders"][0]
        assert scored["no CRF"] is None and scored["CRF"] is None
        assert out.strip().splitlines()[-1].startswith("scored 0 of 2 images; skipped 2")


class FailsOn:
    """A segmenter that raises for one image (recognised by its size) and otherwise runs ``inner``."""

    def __init__(self, inner, shape):
        self.inner, self.shape = inner, shape
        self.num_classes, self.class_names = inner.num_classes, inner.class_names

    def __call__(self, image, **kwargs):
        if image.shape[:2] == self.shape:
            raise RuntimeError("out of device memory")
        return self.inner(image, **kwargs)


def test_an_image_failing_in_a_network_is_skipped_for_every_contender(tmp_path, onnx_model):
    ids = make_voc(tmp_path, n=3)
    data = VOCDataset(tmp_path)
    samples = [data.load(i) for i in range(3)]
    failing = dataclasses.replace(onnx_model, name="failing",
                                  segmenter=FailsOn(onnx_model.segmenter, samples[1].image.shape[:2]))
    result = evaluate([onnx_model, failing], InMemory(samples), CRFParams(), progress=False)
    assert result["images"] == 2
    assert result["skipped"] == [{"id": ids[1], "file": str(tmp_path / "JPEGImages" / f"{ids[1]}.jpg"),
                                  "reason": "RuntimeError: out of device memory"}]
    # Both contenders scored the same two images: the failing one equals the reference.
    ref, other = result["contenders"]
    assert other["labels_equal_pct"] == {"no CRF": 100.0, "CRF": 100.0}
    assert ref["CRF"]["confusion"] == other["CRF"]["confusion"]
    assert sum(map(sum, ref["CRF"]["confusion"])) == sum(s.truth.size for s in (samples[0], samples[2]))


def test_crf_search_skips_a_bad_item(tmp_path, capsys):
    ids = make_voc(tmp_path, n=3)
    label = tmp_path / "SegmentationClass" / f"{ids[1]}.png"
    cv2.imwrite(str(label), np.dstack([read_label_png(label)] * 3))
    search = ["--model", ONNX, "--dataset", tmp_path, "--search-crf", tmp_path / "crf.json", "--search-grid", "tiny",
              "--search-w1", "5", "--search-xy", "50", "--search-rgb", "3", "--crf-params", tmp_path / "p.json"]
    (tmp_path / "p.json").write_text(json.dumps({"iterations": 2}))
    status, out, err = run_main(search, capsys)
    assert status == 1 and "Traceback" not in err, err
    data = json.loads((tmp_path / "crf.json").read_text())
    assert data["images"] == 2 and data["crf"]["iterations"] == 2 and data["mean_iou"] > 0
    check_skipped(data["skipped"], {ids[1]: (label, "colour type 2")})
    assert CRFParams.load(tmp_path / "crf.json").iterations == 2
    assert out.strip().splitlines()[-1].startswith("scored 2 of 3 images; skipped 1")
    # Every item bad: the file is still written, and says why.
    for name in ids:
        (tmp_path / "JPEGImages" / f"{name}.jpg").write_bytes(b"\xff\xd8")
    status, out, err = run_main(search, capsys)
    data = json.loads((tmp_path / "crf.json").read_text())
    assert status == 1 and data["crf"] is None and data["images"] == 0 and len(data["skipped"]) == 3
