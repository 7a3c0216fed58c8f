"""Property tests of the compiled CRF kernels (hypothesis): any size, label count and parameters."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crf import CRFParams, _driver, refine
from crf.driver import DenseCRFDriver


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(1, 97), w=st.integers(1, 61), c=st.integers(1, 64), seed=st.integers(0, 2**31 - 1),
       bi_w=st.floats(0.1, 20), bi_xy=st.floats(0.5, 120), bi_rgb=st.floats(0.5, 60),
       pos_w=st.floats(0.1, 10), pos_xy=st.floats(0.3, 10), iters=st.integers(0, 6),
       normalization=st.sampled_from(["after", "symmetric"]))
def test_property_marginals_are_distributions(h, w, c, seed, bi_w, bi_xy, bi_rgb, pos_w, pos_xy, iters, normalization):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    scores = rng.normal(0, 3, (c, h, w)).astype(np.float32)
    p = CRFParams(bi_w=bi_w, bi_xy_std=bi_xy, bi_rgb_std=bi_rgb, pos_w=pos_w, pos_xy_std=pos_xy,
                  iterations=iters, normalization=normalization)
    q = refine(scores, img, p, backend="cpu")
    assert q.shape == (c, h, w) and q.dtype == np.float32
    # The GPU's choices (one label per thread, unpadded rows, fixed-point splat, short scan
    # chunks), run here.
    g = DenseCRFDriver(_driver("cpu").k, "gpu").run(scores, img, h, w, c, p)[0]
    gd = np.abs(g - q)
    assert gd.mean() < 1e-5 and gd.max() < 1e-3, (gd.mean(), gd.max())
    assert np.isfinite(q).all()
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    if iters == 0:
        e = np.exp(scores - scores.max(0))
        np.testing.assert_allclose(q, e / e.sum(0), atol=1e-6)
    else:
        # Same maths as the numpy port; rounding differs (folded coefficients, summation order), and
        # strong weights over several iterations can amplify it a little in a few pixels.
        diff = np.abs(q - refine(scores, img, p, backend="numpy"))
        assert diff.mean() < 1e-4 and diff.max() < 1e-2, (diff.mean(), diff.max())
