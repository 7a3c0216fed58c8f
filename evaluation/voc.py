"""PASCAL VOC-format segmentation datasets: the ids of a split, their images and label maps.

    ROOT/ImageSets/Segmentation/<split>.txt   one id per line
    ROOT/JPEGImages/<id>.jpg                  the image
    ROOT/SegmentationClass/<id>.png           the labels: a palettised PNG whose palette indices are
                                              the class ids (255: not labelled), or greyscale

OpenCV decodes a palettised PNG to its palette's colours, never to its indices (and Pillow is not a
dependency). Mapping the colours back would lose every index whose colour repeats an earlier one
(palettes padded with black, or all-grey ones), so the file is decoded with its palette replaced
by the identity palette (entry i = grey i): the decoded grey values are the indices themselves,
whatever the file's colours. Greyscale PNGs under 8 bits go the same way, as libpng would scale
their values to 0..255 (a 1-bit 1 would become 255, "not labelled").
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.image_headers import PNG_SIGNATURE
from runtime.palette import png_chunk

from .failures import reason_of

#: Label value that marks pixels left out of the score (object borders and "difficult" regions in VOC).
IGNORE_LABEL = 255
#: How many ids an error message lists before "...".
SHOW_IDS = 5

_GREY, _PALETTE = 0, 3  # PNG colour types


class DatasetError(ValueError):
    """A dataset that cannot be read as asked, with what is missing or wrong."""


class SkipImage(DatasetError):
    """One image that cannot be scored (unreadable, a label map that is not one, or not the image's
    size): ``name`` (its id), ``file`` (the file at fault) and ``reason``; the others go on."""

    def __init__(self, name: str, file, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.file, self.reason = name, None if file is None else str(file), reason


@dataclass(frozen=True)
class Sample:
    """One scored image: ``image`` H x W x 3 uint8 BGR, ``truth`` H x W class ids (255: ignored),
    ``file`` the image's path (None for generated scenes)."""

    name: str
    image: np.ndarray
    truth: np.ndarray
    file: str | None = None


def listed(ids: list, more: int | None = None) -> str:
    """'a, b, c' or 'a, b, c, ... (12 in all)': the first SHOW_IDS of ``ids``."""
    total = len(ids) if more is None else more
    text = ", ".join(str(i) for i in ids[:SHOW_IDS])
    return text + (f", ... ({total} in all)" if total > SHOW_IDS else "")


def _with_identity_palette(data: bytes) -> bytes:
    """The PNG ``data`` (palettised or greyscale, 1 to 8 bits) as a palettised PNG of the same pixel
    data whose palette maps index i to grey i: decoded, its values are the sample values.
    Ancillary chunks go (tRNS, bKGD, hIST refer to the old palette; none changes a pixel's index);
    IDAT and IEND keep their bytes and CRCs, so a damaged file is still refused by the decoder."""
    depth = data[24]
    out = [data[:8], png_chunk(b"IHDR", data[16:24] + bytes([depth, _PALETTE]) + data[26:29])]
    out.append(png_chunk(b"PLTE", np.repeat(np.arange(1 << min(depth, 8), dtype=np.uint8), 3).tobytes()))
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind in (b"IDAT", b"IEND"):
            out.append(data[pos:pos + 12 + length])
        pos += 12 + length
    return b"".join(out)


def read_label_png(path: str | Path) -> np.ndarray:
    """A label PNG as H x W class ids: the palette indices (uint8) of a palettised PNG, whatever its
    colours; the sample values of a greyscale one (uint8, or uint16 at 16 bits). Colour PNGs are
    refused: their values are colours, not ids."""
    import cv2

    from runtime.contract import incomplete_file_reason

    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        raise DatasetError(f"label file is not a PNG: {path}")
    depth, colour_type = data[24], data[25]  # IHDR: width, height, bit depth, colour type
    if colour_type not in (_GREY, _PALETTE):
        raise DatasetError(f"label PNG {path} has colour type {colour_type} (RGB or with alpha): label PNGs "
                           "hold class ids, palettised (as VOC's) or greyscale")
    problem = incomplete_file_reason(data)
    if colour_type == _PALETTE or depth < 8:
        data = _with_identity_palette(data)
    decoded = None if problem else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise DatasetError(f"cannot decode the label PNG ({problem or 'corrupt data'}): {path}")
    return decoded[..., 0] if decoded.ndim == 3 else decoded  # the identity palette: any channel


class VOCDataset:
    """The ids of ``split`` under ``root`` (the first ``limit`` of them), checked at once: a missing
    split file, folder, image or label file raises DatasetError naming it (ids: the first few and
    the count). ``load(i)`` reads one Sample; whatever stops that image from being scored (an
    unreadable image, a label file that is not a label PNG, a label map of another size) raises
    SkipImage naming the id, the file and the reason, so that the caller can go on to the next."""

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None):
        self.root = root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset folder not found: {root}")
        split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            others = sorted(p.stem for p in split_file.parent.glob("*.txt")) if split_file.parent.is_dir() else []
            raise DatasetError(f"{root}: split file ImageSets/Segmentation/{split}.txt not found"
                               + (f" (splits there: {', '.join(others)})" if others else ""))
        ids = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not ids:
            raise DatasetError(f"{split_file}: the split lists no images")
        self.ids = ids[:limit]
        self.description = f"{root}, split {split} ({len(self.ids)} of {len(ids)} images)"
        problems = []
        for folder, suffix in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
            if not (root / folder).is_dir():
                problems.append(f"folder {folder}/ not found")
                continue
            missing = [i for i in self.ids if not (root / folder / f"{i}{suffix}").is_file()]
            if missing:
                problems.append(f"{len(missing)} of {len(self.ids)} ids have no {folder}/<id>{suffix}: {listed(missing)}")
        if problems:
            raise DatasetError(f"{root}: " + "; ".join(problems))

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> Sample:
        """Sample i; SkipImage (id, file, reason) for anything that stops it being scored."""
        from runtime.contract import load_image

        name = self.ids[i]
        image_file = self.root / "JPEGImages" / f"{name}.jpg"
        label_file = self.root / "SegmentationClass" / f"{name}.png"
        image = _read(name, image_file, load_image)
        truth = _read(name, label_file, read_label_png)
        if truth.shape != image.shape[:2]:
            raise SkipImage(name, label_file, f"image {image.shape[0]}x{image.shape[1]}, "
                            f"label map {truth.shape[0]}x{truth.shape[1]} (H x W)")
        return Sample(name, image, truth, str(image_file))


def _read(name: str, file: Path, read):
    """read(file), any failure raised as SkipImage naming the id and the file."""
    try:
        return read(file)
    except Exception as e:  # whatever it is, it is this one image's: the caller skips it
        raise SkipImage(name, file, reason_of(e)) from e
