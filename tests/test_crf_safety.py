"""Every input that passes validation gives finite marginals or a clear error, never a signal.

Run in subprocesses: an out-of-bounds write in the compiled kernels kills the process (SIGSEGV /
SIGBUS), which a test in this process could not report. Also the 32-bit limits of the kernels."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, photo, smooth_logits
from crf import CRFInputError, CRFParams, refine
from crf.gpu_kernels import gpu_available

# One process per backend sweeps the grid: every bandwidth from 1e-9 to 1e9 and every weight over
from crf.kernel_interface import Buffer, INT32_MAX, SizeLimitError
# float32's range, one at a time (the others at DeepLab's values), plus random log-uniform
# combinations of all five; prints one JSON line per case.
SWEEP = r"""
import json, sys, numpy as np
from crf import CRFParams, refine, CRFInputError
backend = sys.argv[1]
rng = np.random.default_rng(0)
img = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
scores = rng.normal(0, 3, (3, 13, 17)).astype(np.float32)
bands = [1e-9, 1e-7, 2e-6, 1e-4, 0.01, 0.3, 1.0, 7.0, 1e3, 1e4, 1e6, 1e9]
weights = [1e-38, 1e-9, 1e-3, 1.0, 1e3, 1e6, 1e12, 1e20, 1e30, 3.4e38]
cases = [{name: v} for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std") for v in bands]
cases += [{name: v} for name in ("pos_w", "bi_w") for v in weights]
for _ in range(25):
    cases.append({**{k: float(10 ** rng.uniform(-2, 4)) for k in ("pos_xy_std", "bi_xy_std", "bi_rgb_std")},
                  **{k: float(10 ** rng.uniform(-38, 6)) for k in ("pos_w", "bi_w")}})  # no dict | on 3.8
for case in cases:
    try:
        q = refine(scores, img, CRFParams(iterations=3, **case), backend=backend)
    except (CRFInputError, ValueError) as e:
        print(json.dumps({"case": case, "error": str(e)}), flush=True)
        continue
    ok = bool(np.isfinite(q).all() and np.allclose(q.sum(0), 1, atol=1e-4))
    print(json.dumps({"case": case, "finite": ok}), flush=True)
"""


@pytest.mark.parametrize("backend", ["cpu", "numpy", pytest.param("gpu", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU with pycuda and nvcc here")])])
def test_bandwidths_and_weights_over_their_range_never_crash(backend):
    out = subprocess.run([sys.executable, "-c", SWEEP, backend], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"exit {out.returncode} (a negative code is a signal)\n{out.stderr[-3000:]}"
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 36 + 20 + 25
    bad = [r for r in rows if r.get("finite") is False]
    assert not bad, bad
    errors = [r for r in rows if "error" in r]
    # Tiny bandwidths are refused with the reason, values past CRFParams' bounds naming the field
    # and the bound; the rest run.
    assert any(r["case"] == {"pos_xy_std": 1e-9} for r in errors)
    assert any(r["case"] == {"bi_xy_std": 1e9} and "bi_xy_std" in r["error"] for r in errors)
    assert all("bandwidth" in r["error"] or
               ("at most" in r["error"] and any(k in r["error"] for k in r["case"])) for r in errors), errors
    assert sum("finite" in r for r in rows) >= 35


def test_tiny_bandwidth_is_refused_before_any_launch():
    """2e-6 used to crash the process: coordinates far beyond int16 (and int) before the flag was read."""
    img = photo("coffee", 64)
    s = smooth_logits(*img.shape[:2], 3)
    for backend in ("cpu", "numpy"):
        with pytest.raises(CRFInputError, match=r"bilateral bandwidth .*too small for a 43x64 image"):
            refine(s, img, CRFParams(bi_rgb_std=2e-6), backend=backend)


def test_the_key_bound_is_tight_enough_to_keep_valid_inputs():
    """The host bound only refuses what the int16 keys cannot hold: DeepLab's parameters run on a
    2048x2048 image, and the smallest bandwidths that pass really do run."""
    from crf.driver import BILATERAL_D, KEY_LIMIT, check_key_range, lattice_key_bound

    check_key_range(2048, 2048, CRFParams())
    assert lattice_key_bound(2048, 2048, BILATERAL_D, 50.0, 10.0) < KEY_LIMIT / 10
    img = photo("coffee", 64)
    h, w = img.shape[:2]
    # the smallest colour bandwidth that passes for this image still gives a distribution
    lo = next(v for v in np.geomspace(0.001, 1, 200) if lattice_key_bound(h, w, BILATERAL_D, 50.0, v) <= KEY_LIMIT)
    q = refine(smooth_logits(h, w, 3), img, CRFParams(bi_rgb_std=float(lo)), backend="cpu")
    assert np.isfinite(q).all()


def test_counts_beyond_32_bits_are_refused_naming_the_limit():
    """A 20000x20000 image would index past 2^31 in the kernels: refused before anything is
    allocated (the scores here are only a Buffer naming memory that does not exist)."""
    from crf import _driver

    d = _driver("cpu")
    pooled = d.pooled_bytes()
    fake = Buffer(0, 0, None)
    with pytest.raises(SizeLimitError, match=r"20000x20000 image with 21 labels needs .* 32-bit indexing \(at most 2,147,483,647\)"):
        d.run(fake, fake, 20000, 20000, 21, CRFParams())
    assert d.pooled_bytes() == pooled  # nothing was allocated for it: the check comes first
    from crf.kernel_interface import I32

    with pytest.raises(SizeLimitError, match="does not fit the kernels' 32-bit int"):
        I32(INT32_MAX + 1)
    assert int(I32(-1)) == -1 and int(I32(INT32_MAX)) == INT32_MAX
