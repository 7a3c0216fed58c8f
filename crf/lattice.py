"""Permutohedral lattice (Adams, Baek & Davis 2010) in numpy, step for step as in the reference.

This follows ``Permutohedral::init`` / ``seqCompute`` of Krähenbühl's densecrf (the code inside
pydensecrf), in float32, including its rounding, rank tie-breaking and the ``alpha`` constant, so
that it agrees with pydensecrf to float rounding. Vertex numbering differs (sorted keys instead of
insertion order), which changes nothing but summation order in the blur.
"""
from __future__ import annotations

import numpy as np

f32 = np.float32


class PermutohedralLattice:
    """A lattice built once for N feature vectors of dimension d; filters any (N, V) values.

    ``features``: (N, d) float32, already divided by the kernel bandwidths.
    ``filter(values)`` approximates ``sum_j exp(-|f_i - f_j|^2 / 2) values_j`` (self included).
    """

    def __init__(self, features: np.ndarray):
        f = np.ascontiguousarray(features, dtype=f32)
        if f.ndim != 2 or f.shape[1] < 1:
            raise ValueError(f"features must be (N, d) with d >= 1, got {f.shape}")
        n, d = f.shape
        self.n, self.d = n, d
        inv_std_dev = f32(np.sqrt(2.0 / 3.0) * (d + 1))
        scale = np.array([1.0 / np.sqrt((i + 2.0) * (i + 1.0)) * float(inv_std_dev) for i in range(d)], f32)

        # Elevate onto the hyperplane x_0 + ... + x_d = 0.
        elevated = np.empty((n, d + 1), f32)
        sm = np.zeros(n, f32)
        for j in range(d, 0, -1):
            cf = f[:, j - 1] * scale[j - 1]
            elevated[:, j] = sm - f32(j) * cf
            sm = sm + cf
        elevated[:, 0] = sm

        # Nearest remainder-0 lattice point, rounding coordinate-wise (ties go down).
        down_factor = f32(1.0) / f32(d + 1)
        up_factor = f32(d + 1)
        v = down_factor * elevated
        up = np.ceil(v) * up_factor
        down = np.floor(v) * up_factor
        rem0 = np.where(up - elevated < elevated - down, up, down).astype(f32)
        total = (rem0.astype(np.int64) // (d + 1)).sum(axis=1)

        # Rank of each coordinate's residual (reference tie-break: the earlier index loses).
        res = elevated - rem0
        rank = np.zeros((n, d + 1), np.int64)
        for i in range(d + 1):
            for j in range(d + 1):
                if j > i:
                    rank[:, i] += res[:, j] > res[:, i]
                elif j < i:
                    rank[:, i] += res[:, j] >= res[:, i]
        rank += total[:, None]
        low, high = rank < 0, rank > d
        rank[low] += d + 1
        rem0[low] += d + 1
        rank[high] -= d + 1
        rem0[high] -= d + 1

        # Barycentric coordinates: slot d - rank_i gets +v_i, slot d - rank_i + 1 gets -v_i.
        vbar = (elevated - rem0) * down_factor
        rows = np.arange(n)[:, None]
        pos = np.zeros((n, d + 2), f32)
        neg = np.zeros((n, d + 2), f32)
        pos[rows, d - rank] = vbar
        neg[rows, d - rank + 1] = vbar
        bary = pos - neg
        bary[:, 0] = (bary[:, 0].astype(np.float64) + (1.0 + bary[:, d + 1].astype(np.float64))).astype(f32)
        self.weights = np.ascontiguousarray(bary[:, : d + 1])  # (N, d+1)

        # The d+1 enclosing vertices: key_i = rem0_i + canonical[remainder][rank_i], i < d.
        rem0_i = rem0.astype(np.int64)[:, :d]
        rank_i = rank[:, :d]
        keys = np.empty((n, d + 1, d), np.int64)
        for r in range(d + 1):
            keys[:, r, :] = rem0_i + np.where(rank_i <= d - r, r, r - (d + 1))
        keys = keys.reshape(n * (d + 1), d)

        # Hash: pack each key into one int64 (mixed radix over the observed range, with a margin
        # of d+1 on each side so that blur neighbours pack too), then de-duplicate by sorting.
        lo = keys.min(axis=0) - (d + 1)
        span = keys.max(axis=0) + (d + 1) - lo + 1
        if np.prod(span.astype(np.float64)) >= 2.0**62:
            raise ValueError("lattice too large to index (feature range / bandwidth ratio too high)")
        radix = np.ones(d, np.int64)
        for i in range(d - 2, -1, -1):
            radix[i] = radix[i + 1] * span[i + 1]

        def pack(k: np.ndarray) -> np.ndarray:
            return ((k - lo) * radix).sum(axis=-1)

        packed = pack(keys)
        uniq, offsets = np.unique(packed, return_inverse=True)
        self.m = len(uniq)
        self.offsets = offsets.reshape(n, d + 1)
        ukeys = keys[np.unique(packed, return_index=True)[1]]

        # Blur neighbours along each of the d+1 directions (-1 = absent, mapped to a zero row).
        self.neighbours = np.empty((d + 1, 2, self.m), np.int64)
        for j in range(d + 1):
            n1 = ukeys - 1
            n2 = ukeys + 1
            if j < d:
                n1[:, j] = ukeys[:, j] + d
                n2[:, j] = ukeys[:, j] - d
            for s, nk in enumerate((n1, n2)):
                p = pack(nk)
                idx = np.searchsorted(uniq, p)
                idx_c = np.minimum(idx, self.m - 1)
                self.neighbours[j, s] = np.where(uniq[idx_c] == p, idx_c, -1)
        self.neighbours[self.neighbours < 0] = self.m  # the zero row

        # Splat in pixel order per vertex (as the reference accumulates): stable sort by vertex.
        flat = self.offsets.reshape(-1)
        order = np.argsort(flat, kind="stable")
        self._splat_pixel = order // (d + 1)
        self._splat_weight = self.weights.reshape(-1)[order]
        self._splat_starts = np.flatnonzero(np.r_[True, np.diff(flat[order]) != 0])
        self.alpha = f32(1.0) / (f32(1.0) + f32(2.0) ** f32(-d))

    def filter(self, values: np.ndarray, reverse: bool = False) -> np.ndarray:
        """Splat, blur along the d+1 directions, slice. values: (N, V) float32 -> (N, V) float32."""
        vals = np.asarray(values, f32)
        if vals.ndim != 2 or vals.shape[0] != self.n:
            raise ValueError(f"values must be ({self.n}, V), got {vals.shape}")
        d = self.d
        contrib = vals[self._splat_pixel] * self._splat_weight[:, None]
        lattice = np.zeros((self.m + 1, vals.shape[1]), f32)
        lattice[: self.m] = np.add.reduceat(contrib, self._splat_starts, axis=0)
        other = np.zeros_like(lattice)
        half = f32(0.5)
        for j in (range(d, -1, -1) if reverse else range(d + 1)):
            n1, n2 = self.neighbours[j]
            other[: self.m] = lattice[: self.m] + half * (lattice[n1] + lattice[n2])
            lattice, other = other, lattice
        out = np.zeros_like(vals)
        for j in range(d + 1):
            out += (self.weights[:, j, None] * lattice[self.offsets[:, j]]) * self.alpha
        return out
