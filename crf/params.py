"""CRF parameters; the defaults are those of the released DeepLab-LargeFOV test.prototxt."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

NORMALIZATIONS = ("after", "symmetric")
#: Largest kernel weight: far below float32's range (energies are float32), and already enough to
#: make the pairwise term absolute.
MAX_WEIGHT = 1e6
#: Most mean-field iterations: DeepLab runs 10 and the marginals settle within ~20; the bound keeps a
#: typo (or a hostile request) from holding the CRF for minutes.
MAX_ITERATIONS = 100
#: Largest spatial bandwidth (bi_xy_std, pos_xy_std), in pixels: 10x the side of the largest image
#: the runtime reads by default (runtime.contract.DEFAULT_MAX_PIXELS); beyond it the kernel is flat.
MAX_XY_STD = 1e5
#: Largest colour bandwidth (bi_rgb_std), in 0..255 colour units: beyond it the kernel is flat.
MAX_RGB_STD = 1e4
#: Upper bound of each float field.
UPPER_BOUNDS = {"bi_w": MAX_WEIGHT, "pos_w": MAX_WEIGHT, "bi_xy_std": MAX_XY_STD, "pos_xy_std": MAX_XY_STD,
                "bi_rgb_std": MAX_RGB_STD}


@dataclass(frozen=True)
class CRFParams:
    """Fully connected CRF of DeepLab v1 (Krähenbühl & Koltun 2011, Potts model).

    bi_w / bi_xy_std / bi_rgb_std: appearance kernel weight w1 and bandwidths sigma_alpha (pixels),
    sigma_beta (0..255 colour units). pos_w / pos_xy_std: smoothness kernel weight w2 and sigma_gamma.
    normalization: "after" (the 2011 code DeepLab shipped: per-pixel 1/norm after filtering) or
    "symmetric" (pydensecrf's default: D^-1/2 K D^-1/2).

    Bounds (ValueError naming the field and the bound otherwise): weights in (0, 1e6], spatial
    bandwidths in (0, 1e5] pixels, the colour bandwidth in (0, 1e4], iterations 0..100; numbers
    only (a bool is refused).
    """

    bi_w: float = 5.0
    bi_xy_std: float = 50.0
    bi_rgb_std: float = 10.0
    pos_w: float = 3.0
    pos_xy_std: float = 3.0
    iterations: int = 10
    normalization: str = "after"

    def __post_init__(self) -> None:
        # Strict types: a bool is an int to Python but never a weight or a count here, and a string
        # "5" is a typo in a JSON file. numpy scalars are accepted and stored as Python numbers.
        for name, upper in UPPER_BOUNDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"CRFParams.{name} must be a number, got {type(v).__name__} {v!r}")
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"CRFParams.{name} must be a finite number > 0, got {v!r}")
            if v > upper:
                raise ValueError(f"CRFParams.{name} must be at most {upper:g}, got {v!r}")
            object.__setattr__(self, name, float(v))
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, numbers.Integral):
            raise ValueError(f"CRFParams.iterations must be a whole number, got {type(it).__name__} {it!r}")
        if not 0 <= it <= MAX_ITERATIONS:
            raise ValueError(f"CRFParams.iterations must be in 0..{MAX_ITERATIONS}, got {it!r}")
        object.__setattr__(self, "iterations", int(it))
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"CRFParams.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )

    def to_dict(self) -> dict:
        """The fields as a plain dict (what ``from_dict`` and ``load`` read back)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "CRFParams":
        """CRFParams from a mapping of field names; unknown names raise ValueError naming them
        (a typo must not silently leave a default in place). Missing names keep their defaults."""
        if not isinstance(values, dict):
            raise ValueError(f"CRF parameters must be a JSON object / dict, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CRF parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def load(cls, path) -> "CRFParams":
        """CRFParams from a JSON file: an object of field names, or one with a "crf" object inside
        (as deeplab-evaluate --search-crf writes)."""
        import json

        with open(path, encoding="utf-8") as f:
            try:
                values = json.load(f)
            except ValueError as e:
                raise ValueError(f"{path}: not JSON: {e}") from e
        if isinstance(values, dict) and isinstance(values.get("crf"), dict):
            values = values["crf"]
        try:
            return cls.from_dict(values)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
