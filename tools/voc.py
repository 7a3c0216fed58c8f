"""PASCAL VOC-format segmentation datasets: the ids of a split, their images and label maps.

    ROOT/ImageSets/Segmentation/<split>.txt   one id per line
    ROOT/JPEGImages/<id>.jpg                  the image
    ROOT/SegmentationClass/<id>.png           the labels: a palettised PNG whose palette indices are
                                              the class ids (255: not labelled), or 8-bit greyscale

OpenCV decodes a palettised PNG to colours, never to its indices (and Pillow is not a dependency),
so the indices are recovered from the file's own palette (PLTE chunk): each decoded colour maps back
to the palette entry of that colour. Where entries repeat a colour (palettes padded with black),
the lowest index is taken: padding always follows the entries in use.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Label value that marks pixels left out of the score (object borders and "difficult" regions in VOC).
IGNORE_LABEL = 255
#: How many ids an error message lists before "...".
SHOW_IDS = 5

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GREY, _PALETTE = 0, 3  # PNG colour types


class DatasetError(ValueError):
    """A dataset that cannot be read as asked, with what is missing or wrong."""


class SkipImage(DatasetError):
    """One image that cannot be scored (its label map is not its size); the others go on."""


@dataclass(frozen=True)
class Sample:
    """One scored image: ``image`` H x W x 3 uint8 BGR, ``truth`` H x W class ids (255: ignored)."""

    name: str
    image: np.ndarray
    truth: np.ndarray


def listed(ids: list, more: int | None = None) -> str:
    """'a, b, c' or 'a, b, c, ... (12 in all)': the first SHOW_IDS of ``ids``."""
    total = len(ids) if more is None else more
    text = ", ".join(str(i) for i in ids[:SHOW_IDS])
    return text + (f", ... ({total} in all)" if total > SHOW_IDS else "")


def _chunks(data: bytes):
    """(type, payload) of each PNG chunk after the signature."""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        yield kind, data[pos + 8:pos + 8 + length]
        pos += 12 + length


def read_label_png(path: str | Path) -> np.ndarray:
    """A label PNG as H x W class ids: palette indices (uint8) of a palettised PNG, the values of a
    greyscale one (uint8, or uint16 at 16 bits). Colour PNGs are refused: their values are not ids."""
    import cv2

    from runtime.contract import incomplete_file_reason

    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 33:
        raise DatasetError(f"label file is not a PNG: {path}")
    problem = incomplete_file_reason(data)
    decoded = None if problem else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise DatasetError(f"cannot decode the label PNG ({problem or 'corrupt data'}): {path}")
    colour_type = data[25]  # IHDR: width, height, bit depth, then the colour type
    if colour_type == _GREY:
        return decoded
    if colour_type != _PALETTE:
        raise DatasetError(f"label PNG {path} has colour type {colour_type} (RGB or with alpha): label PNGs "
                           "hold class ids, palettised (as VOC's) or 8-bit greyscale")
    plte = next((payload for kind, payload in _chunks(data) if kind == b"PLTE"), b"")
    palette = np.frombuffer(plte[:len(plte) // 3 * 3], np.uint8).reshape(-1, 3).astype(np.int32)
    keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    index_of = {}
    for i in range(len(keys) - 1, -1, -1):  # backwards: the lowest index of a repeated colour wins
        index_of[int(keys[i])] = i
    bgr = decoded[..., :3].astype(np.int32)  # a tRNS chunk adds an alpha channel
    colours, inverse = np.unique((bgr[..., 2] << 16) | (bgr[..., 1] << 8) | bgr[..., 0], return_inverse=True)
    lookup = np.array([index_of.get(int(c), -1) for c in colours], np.int32)
    if (lookup < 0).any():
        raise DatasetError(f"label PNG {path}: decoded colours that are not in its palette")
    return lookup.astype(np.uint8)[inverse.reshape(-1)].reshape(decoded.shape[:2])


class VOCDataset:
    """The ids of ``split`` under ``root`` (the first ``limit`` of them), checked at once: a missing
    split file, folder, image or label file raises DatasetError naming it (ids: the first few and
    the count). ``load(i)`` reads one Sample; an image and label map of different sizes raise
    SkipImage naming the id and both sizes."""

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
        from runtime.contract import load_image

        name = self.ids[i]
        image = load_image(self.root / "JPEGImages" / f"{name}.jpg")
        truth = read_label_png(self.root / "SegmentationClass" / f"{name}.png")
        if truth.shape != image.shape[:2]:
            raise SkipImage(f"{name}: image {image.shape[0]}x{image.shape[1]}, "
                            f"label map {truth.shape[0]}x{truth.shape[1]} (H x W)")
        return Sample(name, image, truth)
