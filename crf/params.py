"""CRF parameters; the defaults are those of the released DeepLab-LargeFOV test.prototxt."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

NORMALIZATIONS = ("after", "symmetric")
MAX_WEIGHT = 1e6


@dataclass(frozen=True)
class CRFParams:
    """Fully connected CRF of DeepLab v1 (Krähenbühl & Koltun 2011, Potts model).

    bi_w / bi_xy_std / bi_rgb_std: appearance kernel weight w1 and bandwidths sigma_alpha (pixels),
    sigma_beta (0..255 colour units). pos_w / pos_xy_std: smoothness kernel weight w2 and sigma_gamma.
    normalization: "after" (the 2011 code DeepLab shipped: per-pixel 1/norm after filtering) or
    "symmetric" (pydensecrf's default: D^-1/2 K D^-1/2).
    """

    bi_w: float = 5.0
    bi_xy_std: float = 50.0
    bi_rgb_std: float = 10.0
    pos_w: float = 3.0
    pos_xy_std: float = 3.0
    iterations: int = 10
    normalization: str = "after"

    def __post_init__(self) -> None:
        for name in ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"CRFParams.{name} must be a finite number > 0, got {v!r}")
        for name in ("bi_w", "pos_w"):
            # Energies are float32: a weight near float32's maximum overflows them to inf (NaN
            # marginals). Far below that, a weight of 1e6 already makes the pairwise term absolute.
            if getattr(self, name) > MAX_WEIGHT:
                raise ValueError(f"CRFParams.{name} (kernel weight) must be at most {MAX_WEIGHT:g}, "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 0:
            raise ValueError(f"CRFParams.iterations must be an int >= 0, got {self.iterations!r}")
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
        (as tools/evaluate.py --search-crf writes)."""
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
