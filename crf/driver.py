"""Host-side driver of the CRF kernels: the same code drives the GPU and the compiled CPU build.

Per image and Gaussian kernel, once: embed + barycentric weights, hash table (insert; vertices
numbered in pixel order by a scan), blur neighbours, per-vertex entry lists (count, scan, fill;
sorted for the gather splat), the normaliser (ones filtered), the per-pixel update coefficients.
Per iteration: for each kernel splat all labels, blur along the d+1 directions; then one update
kernel slices both, adds the unary, applies Potts and the softmax, in place. Splatting scatters
each pixel's row into its vertices in pixel order, one thread per lattice (the CPU: the
reference's order, no entry lists), gathers each vertex's sorted entry list in float (the same
sums, one thread per vertex), or sums fixed slices of the lists in exact fixed point with atomics
(the GPU: even work per thread, no sort, deterministic).

Buffers are pooled by role and reused across calls (grown when an image is larger), so repeated
calls of one size allocate nothing. Not thread-safe: use one ``DenseCRFDriver`` per thread
(crf.refine serialises its calls with a lock).

Label rows are S floats wide (label_stride(): C on the GPU; on the CPU, C rounded up to 8, or
below 8 labels to a power of two).
Memory (bytes) for N pixels, M_s / M_b lattice vertices of the spatial (d=2) and bilateral (d=5)
kernels (M is data-dependent, at most (d+1)N, typically N/5), M_max the larger:
  8NS (Q, unary) + 236N (entries, int16 keys, per-pixel data) + 4*pow2(ceil(3N/4)) (hash table;
  4*pow2(9N) when more than 1/12 of the entries are vertices) + M_s*(28 + 8S) + M_b*(52 + 8S)
  + M_max*8 (+ M_max*8S for the fixed-point splat's sums, and 3N for the image, on the GPU)
e.g. 500x375, 21 labels: 97.0 MB with the GPU's choices (S = 21, fixed-point splat; plus the CUDA
context and module), 85 MB on the CPU (S = 24, the scatter splat: no entry lists). On the GPU, logits from the host are written into
Q's memory; the CPU build reads the caller's arrays and writes the result array in place (no copies).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np

from .kernel_interface import F32, I32, INT32_MAX, U32, Buffer, BufferPool, KernelBackend, SizeLimitError
from .features import CRFInputError, check_deadline
from .params import CRFParams

SPATIAL_D, BILATERAL_D = 2, 5
KEY_LIMIT = 32767  # lattice keys are int16, as the reference's


def lattice_key_bound(h: int, w: int, d: int, sxy: float, srgb: float) -> float:
    """The largest |lattice coordinate| crf_embed can produce for an h x w image: the elevation is
    linear in the features, so its extremes lie on the corners of the feature box (x, y in pixels
    over sxy, colours 0..255 over srgb); the rounding to a remainder-0 point and the rank correction
    add at most 2(d+1). Computed in float64 on the host before any launch."""
    hi = [(w - 1) / sxy, (h - 1) / sxy] + [255.0 / srgb] * (d - 2)
    corners = np.array(np.meshgrid(*[[0.0, v] for v in hi], indexing="ij")).reshape(d, -1).T
    inv_std_dev = math.sqrt(2.0 / 3.0) * (d + 1)
    elevated = np.zeros((corners.shape[0], d + 1))
    sm = np.zeros(corners.shape[0])
    for j in range(d, 0, -1):
        cf = corners[:, j - 1] * (inv_std_dev / math.sqrt((j + 1) * j))
        elevated[:, j] = sm - j * cf
        sm += cf
    elevated[:, 0] = sm
    return float(np.abs(elevated).max()) + 2 * (d + 1)


def check_key_range(h: int, w: int, params: CRFParams) -> None:
    """CRFInputError where a bandwidth is so small for an h x w image that lattice coordinates would
    not fit the int16 keys (every backend: the numpy port's keys are bounded the same way)."""
    if params.iterations == 0:
        return
    for name, d, sxy, srgb in (("spatial", SPATIAL_D, params.pos_xy_std, 1.0),
                               ("bilateral", BILATERAL_D, params.bi_xy_std, params.bi_rgb_std)):
        bound = lattice_key_bound(h, w, d, sxy, srgb)
        if not bound <= KEY_LIMIT:
            raise CRFInputError(
                f"lattice coordinates overflow 16 bits: the {name} bandwidth (xy {sxy}, rgb {srgb}) is too "
                f"small for a {h}x{w} image (coordinates up to {bound:.3g}, at most {KEY_LIMIT})")


def _next_pow2(n: int) -> int:
    return 1 << max(1, int(n - 1).bit_length())


class _PhaseClock:
    """Wall time per phase into ``sink`` (when it is a dict), synchronising the backend at each lap."""

    def __init__(self, backend: KernelBackend, sink: dict | None):
        self.k, self.sink = backend, sink
        self.t = time.perf_counter()

    def lap(self, name: str, at: float | None = None) -> None:
        """The phase ``name`` ends now (or at the perf_counter() time ``at``, already past)."""
        if self.sink is None:
            return
        self.k.synchronize()
        now = time.perf_counter() if at is None else at
        self.sink[name] = (now - self.t) * 1e3
        self.t = now


class _Lattice:
    """Device buffers of one Gaussian kernel's lattice for the current image."""

    def __init__(self, tag: str, d: int, weight: float):
        self.tag, self.d, self.dp1, self.weight = tag, d, d + 1, weight
        self.alpha = np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d))
        self.m = self.e = 0
        # device buffers, set by DenseCRFDriver._build (Any: None until then)
        self.weights: Any = None
        self.coef: Any = None
        self.offsets: Any = None
        self.nbr: Any = None
        self.starts: Any = None
        self.lists: Any = None
        self.list_w: Any = None
        self.norm: Any = None
        self.va: Any = None
        self.vb: Any = None
        self.result: Any = None


SPLATS = ("gather", "fixed", "scatter")
FIXED_SPLAT_SLOTS = 32  # list slots per thread in crf_splat_fixed

# How the kernels are launched on each target; the results agree to float rounding whatever the
# choices (bit for bit within one splat), and the tests run the GPU's choices on the CPU.
#   label_chunk: labels per thread in splat and blur (0 = the whole row)
#   label_align: label rows padded to a multiple of this many floats (fewer labels: to a power of two)
#   splat:       "scatter" (one thread per lattice adds each pixel's row into its vertices, in
#                pixel order as the reference: reads Q in order, needs no entry lists; two threads),
#                "gather" (one thread per vertex over its sorted entry list: the same float sums)
#                or "fixed" (32 list slots per thread, exact fixed-point sums with atomics, no
#                sort: even work per thread however long the lists)
#   scan_chunk:  elements per thread in the exclusive scans (0 = sqrt(n): two levels, the second
#                one serial; on a GPU, short chunks and more levels, as no thread may loop long)
#   insert:      lattice vertices found and numbered by "atomic" hash insertion + mark + scan +
#                number + offsets, or "serial": one thread inserting in entry order, numbering as
#                it goes (one pass, no atomics; the same numbering)
#   pixels_per_thread: of the update, the unary, the marginals and the embedding (1 to 16): the
#                CPU takes 16 and does each step for all of them before the next, so that a core
#                overlaps their chains of dependent steps, reads or writes whole cache lines of
#                each label plane, and embeds 16 pixels in vector operations; the same bits
#                whatever the count
#   spatial_table: where the serial insertion finds the spatial lattice's vertices: "dense", a
#                table indexed by its 2-D keys themselves (no hashing, probing or key comparisons;
#                the box of the keys is found first), or "hash"; the same numbering either way
#   lists:       the per-vertex entry lists (for the gather and fixed splats) built by "atomic"
#                count + scan + fill (+ sort for the gather splat), or "serial": one thread, in
#                entry order, sorted as it goes (on the CPU, atomics cost more than the work; the
#                same lists)
CHOICES = {
    "cpu": {"label_chunk": 0, "label_align": 8, "splat": "scatter", "scan_chunk": 0, "insert": "serial",
            "lists": "serial", "pixels_per_thread": 16, "spatial_table": "dense"},
    "gpu": {"label_chunk": 1, "label_align": 1, "splat": "fixed", "scan_chunk": 32, "insert": "atomic",
            "lists": "atomic", "pixels_per_thread": 1, "spatial_table": "hash"},
}
SPATIAL_TABLES = ("dense", "hash")
#: the spatial lattice's dense table is used up to this many slots per lattice entry (DeepLab's
#: bandwidth 3: 0.3; bandwidth 1: 2.7; smaller bandwidths take the hash table)
DENSE_SLOTS_PER_ENTRY = 4
SERIAL_OR_ATOMIC = ("atomic", "serial")
MAX_PIXELS_PER_THREAD = 16  # densecrf.cu CRF_MAX_PIXELS_PER_THREAD


@dataclass
class _KeyBox:
    """The box of a spatial lattice's keys (crf_key_box: minima and spans, on the backend) and its
    slot count: the dense table's size."""
    buf: Buffer
    slots: int


class DenseCRFDriver:
    """choices: "cpu" or "gpu" (see CHOICES; None = the backend's own); the keyword arguments
    override single choices."""

    def __init__(self, backend: KernelBackend, choices: str | None = None, **overrides):
        choices = choices or ("gpu" if backend.name == "gpu" else "cpu")
        if choices not in CHOICES:
            raise ValueError(f"choices must be one of {sorted(CHOICES)}, got {choices!r}")
        unknown = set(overrides) - set(CHOICES[choices])
        if unknown:
            raise TypeError(f"unknown driver choices {sorted(unknown)}; known: {sorted(CHOICES[choices])}")
        self.choices = {**CHOICES[choices], **overrides}
        if self.choices["splat"] not in SPLATS:
            raise ValueError(f"splat must be one of {SPLATS}, got {self.choices['splat']!r}")
        for choice in ("insert", "lists"):
            if self.choices[choice] not in SERIAL_OR_ATOMIC:
                raise ValueError(f"{choice} must be one of {SERIAL_OR_ATOMIC}, got {self.choices[choice]!r}")
        if self.choices["spatial_table"] not in SPATIAL_TABLES:
            raise ValueError(f"spatial_table must be one of {SPATIAL_TABLES}, got {self.choices['spatial_table']!r}")
        ppt = self.choices["pixels_per_thread"]
        if isinstance(ppt, bool) or not isinstance(ppt, int) or not 1 <= ppt <= MAX_PIXELS_PER_THREAD:
            raise ValueError(f"pixels_per_thread must be an integer from 1 to {MAX_PIXELS_PER_THREAD}, got {ppt!r}")
        self.k = backend
        self._pool = BufferPool(backend)
        self.last_vertices: dict[str, int] = {}
        # The spatial kernel's lattice depends on the image size and its parameters only, not on
        # the pixels: kept from the last call (a stream of frames of one size builds it once).
        self._spatial: _Lattice | None = None
        self._spatial_key: tuple | None = None
        #: set to a dict to get per-phase wall times (ms) of each run (adds synchronisations)
        self.phase_times: dict[str, float] | None = None
        #: the prepared launches of one mean-field iteration of the last call, and its graph replay
        self.last_iteration: list = []
        self._replay = None

    # -- memory ---------------------------------------------------------------------------------
    def _buf(self, role: str, nbytes: int) -> Buffer:
        return self._pool.device(role, nbytes)

    @property
    def splat(self) -> str:
        return self.choices["splat"]

    def clear_cache(self) -> None:
        """Forget the kept spatial lattice: the next call builds everything (a cold call)."""
        self._spatial = self._spatial_key = None

    def pooled_bytes(self) -> int:
        return self._pool.nbytes()

    @property
    def _insertion_sums_ones(self) -> bool:
        """Whether the build takes the normaliser's splat of ones from the serial insertion (its
        float sums, the float splats' own), rather than filtering ones held in the unary's buffer."""
        return self.choices["insert"] == "serial" and self.splat != "fixed"

    def _pixel_threads(self, n: int) -> int:
        """Threads of a kernel that takes pixels_per_thread of n pixels each."""
        return -(-n // self.choices["pixels_per_thread"])

    def _fill_int(self, buf: Buffer, n: int, value: int) -> None:
        self.k.launch("crf_fill_int", n, buf, I32(n), I32(value))

    # -- lattice construction -------------------------------------------------------------------
    def _build(self, lat: _Lattice, image: Buffer | None, h: int, w: int, sxy: float, srgb: float,
               symmetric: bool, s: int, scratch: str = "", before_insert: Callable[[], None] | None = None) -> None:
        """Build lat for this image. scratch: a prefix for the roles of the buffers only the build
        uses (two builds at once need their own); before_insert: called once, as the insertion
        (one thread's pass on the CPU) is about to start."""
        k, d, dp1 = self.k, lat.d, lat.dp1
        n = h * w
        e = lat.e = n * dp1
        keys = self._buf(scratch + "keys", e * d * 2)  # int16, as the reference's lattice keys
        lat.weights = self._buf(lat.tag + "weights", e * 4)
        # flags: [0] a key overflowed 16 bits (crf_embed), [1] hash slots taken, [2] table too full
        flags = self._buf(scratch + "flags", 12)
        self._fill_int(flags, 3, 0)
        k.launch("crf_embed", self._pixel_threads(n), image, I32(h), I32(w), I32(d), F32(sxy), F32(srgb), keys,
                 lat.weights, flags, I32(self.choices["pixels_per_thread"]))

        serial = self.choices["insert"] == "serial"
        sums = None
        if not serial:
            slot_of = self._buf(scratch + "slot_of", e * 4)
        # The ranks live in this lattice's list buffer, which is not filled until they are dead (the
        # scatter splat needs no lists: the buffer is only made for ranks, then).
        if not serial or self.splat != "scatter":
            lat.lists = rank = self._buf(lat.tag + "lists", (e + 1) * 4)
        lat.offsets = self._buf(lat.tag + "offsets", e * 4)
        fill = Buffer(8, flags.ptr + 4, flags.owner)
        box = self._dense_box(keys, e, d, flags, h, w, sxy, srgb, scratch) if serial else None
        if box is not None:  # the spatial lattice: a table indexed by its 2-D keys themselves
            table = self._buf(scratch + "table", box.slots * 4)
            self._fill_int(table, box.slots, -1)
            if before_insert is not None:
                before_insert()
            vertex_keys = self._buf(scratch + "vertex_keys", e * d * 2)
            sums = self._buf(scratch + "weight_sums", (e + 1) * 4) if self._insertion_sums_ones else None
            k.launch("crf_insert_dense", 1, keys, I32(e), box.buf, table, fill, vertex_keys, lat.offsets,
                     lat.weights, sums)
            taken = int(k.download(fill, (1,), np.int32)[0])
        else:
            # Hash table: first sized for a typical vertex count (photographs give 3-5 % of the entries;
            # this takes up to 1/12 of them in a table that stays in cache), then, if it fills up,
            # for the worst case (every entry its own vertex), which can never fill.
            small, worst = _next_pow2(-(-e // 8)), _next_pow2(math.ceil(1.5 * e))
            for cap, limit in ((small, small // 2), (worst, e + 1)):  # (slots, vertices it may take)
                table = self._buf(scratch + "table", cap * 4)
                self._fill_int(table, cap, -1)
                self._fill_int(fill, 2, 0)
                if before_insert is not None:
                    before_insert()
                    before_insert = None
                if serial:  # numbered as inserted: table, vertex keys and offsets in one pass
                    vertex_keys = self._buf(scratch + "vertex_keys", limit * d * 2)
                    sums = self._buf(scratch + "weight_sums", (limit + 1) * 4) if self._insertion_sums_ones else None
                    k.launch("crf_insert_serial", 1, keys, I32(e), I32(d), table, U32(cap - 1), I32(limit), fill,
                             vertex_keys, lat.offsets, lat.weights, sums)
                else:
                    k.launch("crf_hash_insert", e, keys, I32(e), I32(d), table, U32(cap - 1), I32(limit), fill, slot_of)
                    k.launch("crf_mark_first", e, slot_of, table, I32(e), rank)
                    self._exclusive_scan(rank, e, rank)  # in place: flags -> ranks, rank[e] = vertex count
                # the build's sync: whether the table held, and the vertex count, which sizes what follows
                key_overflow, taken, too_full = (int(v) for v in k.download(flags, (3,), np.int32))
                if key_overflow:
                    self._raise_key_overflow(d, h, w, sxy, srgb)
                if not too_full:
                    break
        m = taken if serial else int(k.download(Buffer(4, rank.ptr + e * 4, rank.owner), (1,), np.int32)[0])
        self._check_counts(h, w, s, {"fixed-point vertex sums": (m + 1) * s * 2, "vertex rows": (m + 1) * s,
                                     "blur neighbours": m * dp1 * 2})
        if not serial:
            vertex_entry = self._buf(scratch + "vertex_entry", m * 4)
            k.launch("crf_number_vertices", e, slot_of, rank, I32(e), table, vertex_entry)
            k.launch("crf_offsets", e, slot_of, table, I32(e), lat.offsets)
        lat.m = m
        self.last_vertices[lat.tag] = m

        lat.nbr = self._buf(lat.tag + "nbr", m * dp1 * 2 * 4)
        # the vertices' keys: their own array (serial insertion), or the entries' keys through vertex_entry
        key_args = (vertex_keys, None) if serial else (keys, vertex_entry)
        if box is not None:
            k.launch("crf_neighbours_dense", m * dp1, vertex_keys, I32(m), box.buf, table, lat.nbr)
        else:
            k.launch("crf_neighbours", m * dp1, *key_args, I32(m), I32(d), table, U32(cap - 1), lat.nbr)

        # The list splats read per-vertex entry lists with their weights in list_w; the scatter
        # splat reads the entries as they are, and list_w takes the update's coefficients instead
        # (the weights being read by every splat).
        lat.list_w = self._buf(lat.tag + "list_w", e * 4)
        if self.splat != "scatter":
            self._build_lists(lat, m, scratch)
        if self.splat == "fixed":
            # Fixed-point sums, one buffer shared by both lattices (they filter one after the
            # other); the second blur pass of every filter leaves it zeroed.
            vfixed = self._buf("vfixed", (m + 1) * s * 8)
            self._fill_int(vfixed, vfixed.nbytes // 4, 0)

        # Value buffers hold M rows plus row M of zeros, the absent blur neighbour.
        lat.va = self._buf(lat.tag + "va", (m + 1) * s * 4)
        lat.vb = self._buf(lat.tag + "vb", (m + 1) * s * 4)
        # Normaliser: the lattice applied to ones (held in the unary's memory, not yet computed),
        # or the blur of the ones' splat that crf_insert_serial summed.
        self._zero_row(lat, 1)
        if sums is not None:
            k.launch("crf_fill_float", 1, Buffer(4, sums.ptr + m * 4, sums.owner), I32(1), F32(0.0))  # row M
            for launch in self._blur_launches(lat, sums, 1, 0):
                launch()
        else:
            ones = self._buf(scratch + "unary", n * s * 4)
            k.launch("crf_fill_float", n, ones, I32(n), F32(1.0))
            self._filter(lat, ones, None, 1)
        lat.norm = self._buf(lat.tag + "norm", n * 4)
        k.launch("crf_slice", n, lat.result, lat.offsets, lat.weights, I32(dp1), I32(n), I32(1), F32(lat.alpha), lat.norm)
        k.launch("crf_normaliser", n, lat.norm, I32(n), I32(1 if symmetric else 0), lat.norm)  # in place
        self._zero_row(lat, s)  # for the label filters of every iteration (rows of s floats)
        lat.coef = lat.list_w if self.splat == "scatter" else lat.weights
        k.launch("crf_coefficients", n, lat.weights, lat.norm, I32(dp1), I32(n), F32(np.float32(lat.weight) * lat.alpha),
                 lat.coef)

    def _beside(self, build: Callable[..., None], builds: list, then: Callable[[], None]) -> float | None:
        """build (the bilateral lattice; a function taking _build's before_insert), the other
        ``builds`` and then ``then`` (the unary, which needs no lattice). On the CPU with more than
        one thread, ``builds`` and ``then`` run on a thread of their own, started when ``build``
        reaches its insertion: a one-thread pass during which the other core would otherwise idle
        (a launch made while the other thread holds the pool runs on its own thread; each build
        has its own scratch buffers); returns the perf_counter() time all builds had ended. Else
        the builds one after the other, ``then`` left to the caller: returns None. The same bits
        either way."""
        # Only where the builds use no buffer of the unary's: the ones a build filters for its
        # normaliser otherwise live in the unary's.
        if self.k.name != "cpu" or not self._insertion_sums_ones or getattr(self.k, "threads", 1) < 2:
            for f in builds:
                f()
            build()
            return None
        failed: list[BaseException] = []
        ended = [0.0]

        def beside() -> None:
            try:
                with self.k.active():  # as run() in the calling thread: buffers grown or dropped here too
                    for f in builds:
                        f()
                    ended[0] = time.perf_counter()
                    then()
            except BaseException as exc:  # re-raised in the calling thread
                failed.append(exc)

        helper = threading.Thread(target=beside, name="crf-beside-insertion", daemon=True)
        try:
            build(before_insert=helper.start)
            built = time.perf_counter()
        finally:
            if helper.is_alive():
                helper.join()
        if helper.ident is None:  # the build never reached its insertion
            beside()
        if failed:
            raise failed[0]
        return max(built, ended[0])

    def _build_lists(self, lat: _Lattice, m: int, scratch: str) -> None:
        """Each vertex's entries (lat.starts, lat.lists: pixels for the gather splat, entry ids for
        the fixed-point one) and their weights (lat.list_w)."""
        k, e, dp1 = self.k, lat.e, lat.dp1
        gather = self.splat == "gather"
        counts = self._buf(scratch + "counts", m * 4)
        self._fill_int(counts, m, 0)
        lat.starts = self._buf(lat.tag + "starts", (m + 1) * 4)
        if self.choices["lists"] == "serial":  # sorted as they are filled, with their payload
            k.launch("crf_lists_serial", 1, lat.offsets, I32(e), I32(m), counts, lat.starts, lat.lists, lat.weights,
                     I32(dp1), I32(1 if gather else 0), lat.list_w)
            return
        k.launch("crf_count", e, lat.offsets, I32(e), counts)
        self._exclusive_scan(counts, m, lat.starts)
        self._fill_int(counts, m, 0)  # reused as the fill cursor
        k.launch("crf_fill_lists", e, lat.offsets, I32(e), lat.starts, counts, lat.lists)
        if gather:  # the gather adds in list order: sort each list (the fixed-point splat needs no order)
            k.launch("crf_sort_lists", m, lat.starts, I32(m), lat.lists)
        k.launch("crf_list_payload", e, lat.lists, lat.weights, I32(dp1), I32(e), I32(1 if gather else 0), lat.list_w)

    def _zero_row(self, lat: _Lattice, s: int) -> None:
        """Zero row M (of s floats) of both value buffers: what an absent blur neighbour reads."""
        for vbuf in (lat.va, lat.vb):
            row = Buffer(s * 4, vbuf.ptr + lat.m * s * 4, vbuf.owner)
            self.k.launch("crf_fill_float", s, row, I32(s), F32(0.0))

    def _exclusive_scan(self, counts: Buffer, n: int, out: Buffer, level: int = 0) -> None:
        """out[0..n] = exclusive scan of counts[0..n) (out[n] = the total); out may be counts.
        Chunk sums, a scan of the chunk sums (serial when there are few, else this again), then
        every chunk scanned from its offset."""
        chunk = self.choices["scan_chunk"] or max(32, math.isqrt(max(n, 1)) + 1)
        n_chunks = (n + chunk - 1) // chunk
        sums = self._buf(f"scan_sums{level}", (n_chunks + 1) * 4)
        self.k.launch("crf_scan_chunks", n_chunks, counts, I32(n), I32(chunk), sums)
        if n_chunks <= chunk:
            self.k.launch("crf_scan_sums", 1, sums, I32(n_chunks))
        else:
            self._exclusive_scan(sums, n_chunks, sums, level + 1)
        self.k.launch("crf_scan_apply", max(n_chunks, 1), counts, I32(n), I32(chunk), sums, I32(n_chunks), out)

    def _dense_box(self, keys: Buffer, e: int, d: int, flags: Buffer, h: int, w: int, sxy: float, srgb: float,
                   scratch: str) -> _KeyBox | None:
        """The box of a spatial lattice's keys where its vertices are to be found in a table indexed
        by the keys ("spatial_table": "dense"), else None: other lattices, or a box of more than
        DENSE_SLOTS_PER_ENTRY slots per entry (a spatial bandwidth well below a pixel), which the
        hash table takes instead."""
        if d != SPATIAL_D or self.choices["spatial_table"] != "dense":
            return None
        buf = self._buf(scratch + "box", 16)
        self.k.launch("crf_key_box", 1, keys, I32(e), buf)
        if int(self.k.download(flags, (1,), np.int32)[0]):  # a key overflowed: the keys are not all there
            self._raise_key_overflow(d, h, w, sxy, srgb)
        _, _, span0, span1 = (int(v) for v in self.k.download(buf, (4,), np.int32))
        slots = span0 * span1
        return _KeyBox(buf, slots) if slots <= DENSE_SLOTS_PER_ENTRY * e else None

    @staticmethod
    def _raise_key_overflow(d: int, h: int, w: int, sxy: float, srgb: float):
        raise CRFInputError(f"lattice coordinates overflow 16 bits: the {'spatial' if d == SPATIAL_D else 'bilateral'} "
                            f"bandwidth (xy {sxy}, rgb {srgb}) is too small for a {h}x{w} image")

    def _filter(self, lat: _Lattice, values: Buffer, prescale: Buffer | None, s: int) -> None:
        """Splat ``values`` (N rows of s floats) and blur; the result is left in lat.result."""
        for launch in self._filter_launches([(lat, prescale)], values, s):
            launch()

    def _filter_launches(self, filters: list, values: Buffer, s: int) -> list:
        """The prepared launches that filter ``values`` (N rows of s floats) with each lattice of
        ``filters`` ((lattice, prescale or None) pairs), leaving each result in its lat.result.
        The scatter splat does both lattices in one launch, on two threads at once."""
        launches = []
        inline = None
        if self.splat == "scatter":
            n = filters[0][0].e // filters[0][0].dp1
            per_lattice = []
            # the larger lattice first: the calling thread starts on it at once, a woken worker takes the other
            pair = (sorted(filters, key=lambda f: -f[0].e) + [(None, None)])[:2]
            for lat, prescale in pair:
                per_lattice += ([prescale, lat.offsets, lat.weights, I32(lat.dp1), I32(lat.m), lat.va] if lat is not None
                                else [None, None, None, I32(0), I32(0), None])
            # The smaller lattice is blurred by the thread that splatted it, while the other thread
            # is still splatting the larger one (DeepLab's: 3 vertex rows per pixel against 6), where
            # its splat and blur together fit in that time: a blur row (three rows read, one written)
            # counted as 1.5 row additions. Not where the spatial lattice is as large as the
            # bilateral one (spatial bandwidth 1: 217,040 vertices at 500x375 against 24,540).
            a, b = pair[0][0], pair[1][0]
            if b is not None and b.e + 1.5 * b.m * b.dp1 <= a.e:
                inline = b
            launches.append(self.k.prepare("crf_splat_scatter", 2, values, I32(n), I32(s), *per_lattice,
                                           *((inline.nbr, inline.vb) if inline is not None else (None, None))))
            if inline is not None:  # the kernel blurs as _blur_passes says
                inline.result = self._blur_passes(inline, inline.va, 0)[-1][1]
        for lat, prescale in filters:
            if lat is not inline:
                launches += self._splat_blur_launches(lat, values, prescale, s)
        return launches

    def _splat_blur_launches(self, lat: _Lattice, values: Buffer, prescale: Buffer | None, s: int) -> list:
        """One lattice's filter launches (but the scatter splat: _filter_launches); sets lat.result."""
        k, m = self.k, lat.m
        launches = []
        chunk = self.label_chunk(s)
        per_row = (s + chunk - 1) // chunk
        n_threads = m * per_row
        floats = self.splat != "fixed"  # float sums in V, blurred from the first direction
        if self.splat == "gather":
            launches.append(k.prepare("crf_splat", n_threads, values, prescale, lat.starts, lat.lists, lat.list_w,
                                      I32(m), I32(s), I32(chunk), lat.va))
        elif self.splat == "fixed":
            vfixed = self._pool["vfixed"]
            n_chunks = -(-lat.e // FIXED_SPLAT_SLOTS)
            launches.append(k.prepare("crf_splat_fixed", n_chunks * per_row, values, prescale, lat.lists, lat.list_w,
                                      lat.offsets, I32(lat.e), I32(lat.dp1), I32(FIXED_SPLAT_SLOTS), I32(s),
                                      I32(chunk), vfixed))
            # the first blur pass reads the fixed-point sums, the second clears them for the next splat
            launches.append(k.prepare("crf_blur_fixed", n_threads, vfixed, lat.va, lat.nbr, I32(0), I32(m), I32(s),
                                      I32(chunk)))
        return launches + self._blur_launches(lat, lat.va, s, 0 if floats else 1)

    def _blur_launches(self, lat: _Lattice, splatted: Buffer, s: int, first: int) -> list:
        """The blur passes along directions first..d of the float sums in ``splatted`` (M rows of
        s floats, then a row of zeros; may be neither of lat.va, lat.vb); sets lat.result."""
        chunk = self.label_chunk(s)
        n_threads = lat.m * ((s + chunk - 1) // chunk)
        launches = []
        passes = self._blur_passes(lat, splatted, first)
        for j, (src, dst) in enumerate(passes, start=first):
            zero = self._pool["vfixed"] if first == 1 and j == 1 else None
            launches.append(self.k.prepare("crf_blur", n_threads, src, dst, lat.nbr, I32(j), I32(lat.m), I32(s),
                                           I32(chunk), zero))
        lat.result = passes[-1][1] if passes else splatted
        return launches

    @staticmethod
    def _blur_passes(lat: _Lattice, splatted: Buffer, first: int) -> list:
        """(source, destination) of the blur passes along directions first..d: from the splatted
        sums, then back and forth between lat.va and lat.vb. crf_splat_scatter's inline blur (from
        lat.va) follows the same rule."""
        passes, src = [], splatted
        for _ in range(first, lat.dp1):
            dst = lat.vb if src is lat.va else lat.va
            passes.append((src, dst))
            src = dst
        return passes

    def label_chunk(self, s: int) -> int:
        """Labels per thread: 1 on the GPU (coalesced), the whole row on the CPU (vectorised loop)."""
        return min(self.choices["label_chunk"] or s, s)

    def label_stride(self, c: int) -> int:
        """Floats per label row: c on the GPU (one thread per label, nothing to pad); on the CPU c
        rounded up to 8 floats (one AVX register): every label loop is whole vectors on 32-byte
        aligned rows, with no scalar remainder. Fewer labels than that are rounded up to a power
        of two instead (2 labels: rows of 2, not 8; a quarter of the memory traffic, the update
        20 % faster). Padding labels stay exactly 0."""
        align = self.choices["label_align"]
        if c < align:
            return min(align, 1 << (c - 1).bit_length())
        return -(-c // align) * align

    # -- inference ------------------------------------------------------------------------------
    def run(self, scores: np.ndarray | Buffer, image: np.ndarray | Buffer, h: int, w: int, c: int,
            params: CRFParams, is_logits: bool = True, marginals: bool = True, labels: bool = False,
            check_finite: bool = True, labels_out: np.ndarray | None = None, deadline: float | None = None):
        """Mean field for one image.

        scores: (C, H, W) float32 planar logits (is_logits) or unary energies, as a host array or a
        Buffer already on the backend (e.g. a TensorRT output). image: H x W x 3 uint8, host or Buffer.
        Returns (marginals (C, H, W) float32 or None, labels (H, W) uint8 or None).
        check_finite=False skips the device-side NaN/inf check for callers that checked already.
        labels_out: an H x W uint8 host array (e.g. KernelBackend.alloc_host's pinned memory) the
        labels are written into and returned as, instead of a new array.
        deadline: a time.monotonic() value checked before each iteration is launched (CRFTimeout
        past it): on the CPU build, where launches run as they are made, the CRF stops there.
        """
        if labels and c > 256:
            raise CRFInputError(f"{c} labels: label ids are written as uint8 (at most 256 labels); "
                                "ask for marginals instead")
        self.check_limits(h, w, c, params)
        with self.k.active():  # the GPU: the primary context, current in whichever thread calls
            return self._run(scores, image, h, w, c, params, is_logits, marginals, labels, check_finite, labels_out,
                             deadline)

    def check_limits(self, h: int, w: int, c: int, params: CRFParams) -> None:
        """Refuse, before anything runs, an image whose lattice coordinates would not fit the int16
        keys (a bandwidth tiny for the image), or whose buffers would exceed the kernels' 32-bit
        indexing. Counts that depend on the vertex count are checked again once it is known."""
        check_key_range(h, w, params)
        n, s = h * w, self.label_stride(c)
        e = n * (BILATERAL_D + 1)
        worst = {"label rows (pixels x labels)": n * max(s, c), "lattice entries (pixels x 6)": e,
                 "hash table slots": _next_pow2(math.ceil(1.5 * e))}
        self._check_counts(h, w, c, worst)

    @staticmethod
    def _check_counts(h: int, w: int, c: int, counts: dict) -> None:
        for what, count in counts.items():
            if count > INT32_MAX:
                raise SizeLimitError(
                    f"a {h}x{w} image with {c} labels needs {count:,} {what}, beyond the CRF kernels' 32-bit "
                    f"indexing (at most {INT32_MAX:,}): downscale the image for the CRF or use fewer labels")

    def _run(self, scores, image, h, w, c, params, is_logits, marginals, labels, check_finite, labels_out=None,
             deadline=None):
        k = self.k
        n = h * w
        clock = _PhaseClock(k, self.phase_times)
        s = self.label_stride(c)
        q = self._buf("q", n * s * 4)
        if isinstance(scores, np.ndarray):
            scores = np.ascontiguousarray(scores, np.float32)
            src = k.host_view(scores)  # read in place where the kernels can (the CPU build)
            if src is None:
                src = q  # host scores go into Q's memory: read once by crf_unary, then Q overwrites them
                k.upload(src, scores)
        else:
            src = scores
        if isinstance(image, np.ndarray):
            image = np.ascontiguousarray(image, np.uint8)
            img = k.host_view(image)
            if img is None:
                img = self._buf("image", n * 3)
                k.upload(img, image)
        else:
            img = image
        flag = None
        if check_finite:  # crf_unary checks the scores as it reads them: refused below, before the iterations
            flag = self._buf("flag", 4)
            self._fill_int(flag, 1, 0)
        clock.lap("upload")

        symmetric = params.normalization == "symmetric"
        u = self._buf("unary", n * s * 4)
        ppt = self.choices["pixels_per_thread"]
        rows = self._pixel_threads(n)

        def unary() -> None:  # U from the scores, Q = softmax(-U)
            k.launch("crf_unary", rows, src, I32(n), I32(c), I32(s), I32(1 if is_logits else 0), u, I32(ppt), flag)
            nulls = (None, None, None, I32(1))
            k.launch("crf_update", rows, u, I32(n), I32(c), I32(s), *nulls, *nulls, q, I32(ppt))

        lattices = []
        if params.iterations > 0:
            spatial_key = (h, w, s, float(params.pos_xy_std), float(params.pos_w), symmetric)
            bilateral = _Lattice("b_", BILATERAL_D, params.bi_w)
            build_bilateral = partial(self._build, bilateral, img, h, w, params.bi_xy_std, params.bi_rgb_std,
                                      symmetric, s)
            builds = []
            if self._spatial is None or self._spatial_key != spatial_key:
                self._spatial_key = None  # a build that fails half-way leaves no stale entry behind
                self._spatial = _Lattice("s_", SPATIAL_D, params.pos_w)
                builds.append(partial(self._build, self._spatial, None, h, w, params.pos_xy_std, 1.0, symmetric, s,
                                      scratch="s_"))
            built_at = self._beside(build_bilateral, builds, unary)
            self._spatial_key = spatial_key
            spatial = self._spatial
            lattices = [spatial, bilateral]
            clock.lap("lattice_build", at=built_at)
            if built_at is None:
                unary()
        else:
            unary()
        if flag is not None and int(k.download(flag, (1,), np.int32)[0]):
            raise CRFInputError("scores contain NaN/inf values")
        clock.lap("unary")
        if params.iterations > 0:
            # Every iteration makes the same launches: prepared once, replayed.
            iteration = self._filter_launches([(lat, lat.norm if symmetric else None) for lat in lattices], q, s)
            iteration.append(k.prepare("crf_update", rows, u, I32(n), I32(c), I32(s), *self._update_args(lattices[0]),
                                       *self._update_args(lattices[1]), q, I32(ppt)))
            self.last_iteration = iteration
            # On the GPU one iteration is captured as a CUDA graph and replayed: one launch per
            # iteration instead of 12 (host work per launch is what a millisecond CRF cannot afford).
            self._replay = k.capture(iteration) if params.iterations > 1 else None
            for i in range(params.iterations):
                check_deadline(deadline, i, params.iterations)
                if self._replay is not None:
                    self._replay()
                else:
                    for launch in iteration:
                        launch()
        if lattices:
            clock.lap("iterations")

        if labels and labels_out is not None and (labels_out.shape != (h, w) or labels_out.dtype != np.uint8):
            raise ValueError(f"labels_out must be {h}x{w} uint8, got {labels_out.shape} {labels_out.dtype}")
        out_m = out_l = None
        mb = lb = None
        if marginals:
            out_m = np.empty((c, h, w), np.float32)
            mb = k.host_view(out_m)  # the CPU build writes the result array directly
            # else the unary, not needed any more, takes the transposed marginals on the device
            k.launch("crf_marginals", rows, q, I32(n), I32(c), I32(s), mb if mb is not None else u, I32(ppt))
        if labels:
            lb = self._buf("labels", n)
            k.launch("crf_argmax", n, q, I32(n), I32(c), I32(s), lb)
        k.mark("crf")  # all computed; what follows copies results to the host
        if marginals and mb is None:
            out_m = k.download(u, (c, h, w), np.float32)
        if lb is not None:
            out_l = k.download(lb, (h, w), np.uint8) if labels_out is None else k.download_into(lb, labels_out)
        k.synchronize()
        k.mark("download")
        clock.lap("output")
        return out_m, out_l

    @staticmethod
    def _update_args(lat: _Lattice):
        return (lat.result, lat.offsets, lat.coef, I32(lat.dp1))
