"""The CUDA kernel source, executed on the CPU (g++ build through cpu_shim.h) in every test run,
compiled by nvcc for the supported GPUs, and run on a GPU where there is one (marked gpu)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, photo, smooth_logits
from crf import CRFInputError, CRFParams, refine, refine_unary, resolve_backend
from crf.gpu_kernels import gpu_available
from crf.kernel_interface import Buffer, KERNEL_SOURCE
from crf.exact import exact_mean_field
from crf.features import unary_from_scores
from test_crf import _pydensecrf

GPU_ARCHS = ("75", "80", "86", "87", "89", "90")


def test_auto_picks_the_compiled_cpu_kernels_here():
    assert resolve_backend("auto") == ("gpu" if gpu_available() else "cpu")


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("name,width", [("astronaut", 160), ("coffee", 300)])
def test_kernels_equal_the_numpy_crf(name, width, normalization):
    img = photo(name, width)
    s = smooth_logits(*img.shape[:2], 21, seed=width)
    p = CRFParams(normalization=normalization)
    a = refine(s, img, p, backend="cpu")
    b = refine(s, img, p, backend="numpy")
    assert (a.argmax(0) == b.argmax(0)).all()
    assert np.abs(a - b).max() < 1e-5


def test_256_labels_and_their_uint8_ids():
    """The largest label count supported: every label row and the uint8 argmax up to id 255."""
    from crf import _driver

    img = photo("coffee", 48)
    h, w = img.shape[:2]
    s = smooth_logits(h, w, 256, seed=256, scale=4.0, cell=6)
    s[255, :8, :8] += 50.0  # the last label must win somewhere: its id is 255
    p = CRFParams(iterations=3)
    got, labels = _driver("cpu").run(s, img, h, w, 256, p, labels=True)
    ref = refine(s, img, p, backend="numpy")
    assert np.abs(got - ref).max() < 1e-5
    assert np.array_equal(labels, got.argmax(0)) and labels.dtype == np.uint8 and labels.max() == 255
    with pytest.raises(CRFInputError, match="257 labels.*uint8"):
        _driver("cpu").run(smooth_logits(h, w, 257), img, h, w, 257, p, labels=True)


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@pytest.mark.parametrize("name,width", [("astronaut", 256), ("coffee", 320), ("chelsea", 300), ("rocket", 280)])
def test_kernels_match_pydensecrf_on_photographs(name, width, normalization):
    img = photo(name, width)
    h, w = img.shape[:2]
    unary = unary_from_scores(smooth_logits(h, w, 21, seed=width + 1))
    p = CRFParams(normalization=normalization)
    ours = refine_unary(unary, img, p, backend="cpu")
    ref = _pydensecrf(unary, img, p)
    agree = (ours.argmax(0) == ref.argmax(0)).mean()
    dq = np.abs(ours - ref).max()
    print(f"{name} {h}x{w} {normalization}: labels equal {100 * agree:.3f}%, max |dQ| {dq:.2e}")
    assert agree >= 0.995
    assert dq < 1e-3
    assert (ours.argmax(0) != unary.argmin(0)).mean() > 0.01  # the CRF changed something


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_kernels_match_exact_mean_field_on_tiny_images(normalization):
    img = photo("astronaut", 40)
    unary = unary_from_scores(smooth_logits(40, 40, 4, seed=40, scale=2.0, cell=10))
    p = CRFParams(normalization=normalization, bi_xy_std=10, bi_rgb_std=20)
    q = refine_unary(unary, img, p, backend="cpu")
    e = exact_mean_field(unary, img, p)
    assert (q.argmax(0) == e.argmax(0)).mean() >= 0.95
    assert np.abs(q - e).mean() < 0.025


@pytest.mark.parametrize("chunk, align", [(1, 1), (5, 16)])
def test_gpu_thread_layout_on_the_cpu(chunk, align):
    """The GPU runs splat and blur with one label per thread on unpadded label rows (chunk 1,
    align 1); run that layout here, where it can run. The CPU's default pads rows of 21 labels to 24."""
    from crf import _driver
    from crf.driver import DenseCRFDriver

    img = photo("astronaut", 150)
    h, w = img.shape[:2]
    s = smooth_logits(h, w, 21, seed=chunk)
    layout = DenseCRFDriver(_driver("cpu").k, label_chunk=chunk, label_align=align)
    assert layout.label_stride(21) == (21 if align == 1 else 32) and _driver("cpu").label_stride(21) == 24
    assert [_driver("cpu").label_stride(c) for c in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    for norm in ("after", "symmetric"):
        p = CRFParams(normalization=norm)
        got, labels = layout.run(s, img, h, w, 21, p, labels=True)
        ref = refine(s, img, p, backend="cpu")
        assert np.array_equal(got, ref)  # same operations in the same order per label
        assert np.array_equal(labels, ref.argmax(0))


@pytest.mark.parametrize("image, params", [
    ("astronaut", CRFParams()),
    ("astronaut", CRFParams(bi_rgb_std=1.0, bi_xy_std=2.0, pos_xy_std=0.5)),  # vertices past the small table
    ("noise", CRFParams(bi_rgb_std=1.0, bi_xy_std=2.0, pos_xy_std=0.5)),      # every entry its own vertex
])
def test_serial_lattice_build_the_cpus_choice_equals_the_atomic_one(image, params):
    """The CPU inserts lattice entries and fills the entry lists on one thread, in entry order; the
    GPU's atomic passes (run here) must give the same vertex numbering and lists: the same bits out,
    including where the first hash table fills up and the build is redone with the largest one."""
    from crf import _driver
    from crf.driver import DenseCRFDriver

    img = photo("astronaut", 120) if image == "astronaut" else \
        np.random.default_rng(5).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    h, w = img.shape[:2]
    s = smooth_logits(h, w, 5, seed=2)
    serial = _driver("cpu")
    assert (serial.choices["insert"], serial.splat) == ("serial", "scatter")
    atomic = DenseCRFDriver(serial.k, insert="atomic", lists="atomic")
    got, ref = serial.run(s, img, h, w, 5, params)[0], atomic.run(s, img, h, w, 5, params)[0]
    assert np.array_equal(got, ref) and serial.last_vertices == atomic.last_vertices
    # the spatial lattice is blurred inside the scatter launch, by the thread that splatted it, where
    # it is the smaller lattice (DeepLab's bandwidth 3); with a spatial bandwidth of 0.5 it is
    # nearly a vertex per pixel, and both lattices are blurred by launches of their own
    blurs = [launch.spec[0] for launch in serial.last_iteration].count("crf_blur")
    assert blurs == (6 if params.pos_xy_std >= 1 else 6 + 3)
    if image == "noise":
        assert serial.last_vertices["b_"] == h * w * 6
    # the gather splat reads the entry lists: built serially or with atomics, the same bits as the
    # scatter splat (the CPU's choice), which reads the entries in pixel order and needs no lists
    for lists in ("serial", "atomic"):
        gathered = DenseCRFDriver(serial.k, splat="gather", lists=lists).run(s, img, h, w, 5, params)[0]
        assert np.array_equal(gathered, ref)
    # the fixed-point splat reads entries, not pixels, from the serial lists: the same sums as from the atomic ones
    fixed = [DenseCRFDriver(serial.k, splat="fixed", lists=lists).run(s, img, h, w, 5, params)[0]
             for lists in ("serial", "atomic")]
    assert np.array_equal(fixed[0], fixed[1])
    with pytest.raises(ValueError, match="insert"):
        DenseCRFDriver(serial.k, insert="sometimes")


@pytest.mark.parametrize("name", ["astronaut", "flat"])
def test_fixed_point_splat_the_gpus_choice_on_the_cpu(name):
    """The GPU splats K list slots per thread with exact fixed-point atomics, from unsorted lists:
    run it here against the sorted float gather, on a photograph and on a flat image (a few
    vertices with lists of thousands of entries, split over many threads)."""
    from crf import _driver
    from crf.driver import DenseCRFDriver

    img = photo("astronaut", 150) if name == "astronaut" else np.full((90, 120, 3), 77, np.uint8)
    h, w = img.shape[:2]
    s = smooth_logits(h, w, 21, seed=11)
    k = _driver("cpu").k
    for norm in ("after", "symmetric"):
        p = CRFParams(normalization=norm)
        ref = refine(s, img, p, backend="cpu")
        gpu_choices = DenseCRFDriver(k, "gpu")
        assert gpu_choices.splat == "fixed" and DenseCRFDriver(k).splat == "scatter"
        got = gpu_choices.run(s, img, h, w, 21, p)[0]
        assert (got.argmax(0) == ref.argmax(0)).all()
        assert np.abs(got - ref).max() < 1e-5
        # exact integer sums: the same bits for any thread layout, row padding and run
        again = DenseCRFDriver(k, splat="fixed").run(s, img, h, w, 21, p)[0]
        assert np.array_equal(got, again)
    if name == "flat":
        lengths = np.diff(gpu_choices.k.download(gpu_choices._pool["b_starts"], (gpu_choices.last_vertices["b_"] + 1,), np.int32))
        assert lengths.max() > 40 * 32  # lists far longer than one thread's slots


@pytest.mark.parametrize("splat", ["gather", "fixed", "scatter"])
def test_hash_table_grows_when_the_lattice_has_many_vertices(splat):
    """The hash table is first sized for a photograph's few % of vertices per entry; a noise image
    with a tiny colour bandwidth makes nearly every entry a vertex: the build must start again
    with the worst-case table and give the right answer."""
    from crf import _driver
    from crf.driver import DenseCRFDriver

    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    h, w = img.shape[:2]
    s = smooth_logits(h, w, 5, seed=4)
    p = CRFParams(bi_rgb_std=2.0, bi_xy_std=5.0)
    drv = DenseCRFDriver(_driver("cpu").k, splat=splat)
    got = drv.run(s, img, h, w, 5, p)[0]
    e = h * w * 6
    assert drv.last_vertices["b_"] > e // 12  # more than the first table takes
    assert drv._pool["table"].nbytes >= 4 * 1.5 * e  # so it was built again with the large one
    ref = refine(s, img, p, backend="numpy")
    assert (got.argmax(0) == ref.argmax(0)).mean() > 0.999 and np.abs(got - ref).max() < 1e-4


def test_pixels_per_thread_give_the_same_bits():
    """The CPU's update, unary and marginals take 16 pixels per thread (each step for all of them
    before the next), the GPU's one: the same operations per pixel, so the same bits, also where
    the pixel count is no multiple of the count (a last thread with fewer), from logits and from
    energies."""
    from crf import _driver
    from crf.driver import DenseCRFDriver

    img = photo("astronaut", 61, 59)  # 3599 pixels: a multiple of none of 3, 5, 8 and 16
    h, w = img.shape[:2]
    s = smooth_logits(h, w, 7, seed=3)
    cpu = _driver("cpu")
    assert cpu.choices["pixels_per_thread"] == 16 and DenseCRFDriver(cpu.k, "gpu").choices["pixels_per_thread"] == 1
    for is_logits in (True, False):
        ref = cpu.run(s, img, h, w, 7, CRFParams(), is_logits=is_logits)[0]
        for ppt in (1, 3, 5):
            got = DenseCRFDriver(cpu.k, pixels_per_thread=ppt).run(s, img, h, w, 7, CRFParams(), is_logits=is_logits)[0]
            assert np.array_equal(got, ref), (ppt, is_logits)
    for bad in (0, 17, 2.0, True):
        with pytest.raises(ValueError, match="pixels_per_thread"):
            DenseCRFDriver(cpu.k, pixels_per_thread=bad)


@pytest.mark.parametrize("image", ["photo", "noise", "flat", "narrow", "width 17"])
def test_embedding_16_pixels_at_once_gives_the_same_bits(image):
    """The CPU embeds 16 pixels per thread, each step for all of them at once (vectorised across
    the pixels, selects in place of branches and of the indexing by rank); the GPU one pixel per
    thread: the same keys, weights and overflow flag, on photographs, noise, a flat image, images
    narrower than 16 pixels and of odd widths (rows wrapping inside a run of 16), for both
    lattice dimensions and bandwidths from DeepLab's to ones that overflow the 16-bit keys."""
    from crf import _driver
    from crf.driver import F32, I32

    k = _driver("cpu").k
    rng = np.random.default_rng(7)
    img = {"photo": photo("astronaut", 90), "noise": rng.integers(0, 256, (61, 77, 3), dtype=np.uint8),
           "flat": np.full((50, 64, 3), 200, np.uint8), "narrow": rng.integers(0, 256, (40, 9, 3), dtype=np.uint8),
           "width 17": rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)}[image]
    h, w = img.shape[:2]
    n = h * w
    for d, sxy, srgb in ((5, 80.0, 13.0), (5, 2.0, 1.0), (5, 0.004, 0.01), (2, 3.0, 1.0), (2, 0.5, 1.0)):
        got = []
        for ppt in (1, 16):
            keys, weights, flags = k.alloc(n * (d + 1) * d * 2), k.alloc(n * (d + 1) * 4), k.alloc(12)
            k.upload(flags, np.zeros(3, np.int32))
            pixels = k.host_view(img) if d == 5 else None  # the spatial lattice reads no image
            k.launch("crf_embed", -(-n // ppt), pixels, I32(h), I32(w), I32(d), F32(sxy), F32(srgb),
                     keys, weights, flags, I32(ppt))
            got.append((k.download(keys, (n * (d + 1) * d,), np.int16),
                        k.download(weights, (n * (d + 1),), np.float32).view(np.uint32),
                        k.download(flags, (3,), np.int32)))
        for one, sixteen in zip(*got):
            assert np.array_equal(one, sixteen), (d, sxy, srgb)
        assert got[0][2][0] == (sxy < 0.01)  # the key overflow is reported either way


@pytest.mark.parametrize("image, params, dense", [
    ("astronaut", CRFParams(), True),                                   # DeepLab's: 0.3 slots per entry
    ("noise", CRFParams(pos_xy_std=1.0, normalization="symmetric"), True),  # 2.7 slots per entry
    ("astronaut", CRFParams(pos_xy_std=0.3), False),                    # ~30 per entry: the hash table
])
def test_dense_spatial_table_gives_the_hash_tables_lattice(image, params, dense):
    """The CPU finds the spatial lattice's vertices in a table indexed by their 2-D keys: the same
    vertices, numbering and blur neighbours as the hash table, so the same bits; where the keys'
    box would be too large a table, the hash table is used."""
    from crf import _driver
    from crf.driver import DenseCRFDriver

    img = photo("astronaut", 150) if image == "astronaut" else \
        np.random.default_rng(3).integers(0, 256, (70, 93, 3), dtype=np.uint8)
    h, w = img.shape[:2]
    s = smooth_logits(h, w, 4, seed=3)
    k = _driver("cpu").k
    runs = {}
    for table in ("dense", "hash"):
        d = DenseCRFDriver(k, spatial_table=table)
        k.profile = {}
        try:
            out = d.run(s, img, h, w, 4, params)[0]
            kernels = set(k.kernel_times())
        finally:
            k.profile = None
        lat = d._spatial
        nbr = lat.nbr.owner[lat.nbr.ptr - lat.nbr.owner.ctypes.data:][:lat.m * 3 * 2 * 4].view(np.int32).copy()
        runs[table] = (out, dict(d.last_vertices), nbr, kernels)
    (out, vertices, nbr, kernels), (ref, ref_vertices, ref_nbr, ref_kernels) = runs["dense"], runs["hash"]
    assert np.array_equal(out, ref) and vertices == ref_vertices and np.array_equal(nbr, ref_nbr)
    assert ("crf_insert_dense" in kernels) == dense and "crf_insert_dense" not in ref_kernels
    assert ("crf_neighbours_dense" in kernels) == dense


def test_bad_driver_choices_are_refused():
    from crf import _driver
    from crf.driver import DenseCRFDriver

    k = _driver("cpu").k
    with pytest.raises(ValueError, match="choices must be one of.*'tpu'"):
        DenseCRFDriver(k, "tpu")
    with pytest.raises(TypeError, match="unknown driver choices.*'label_chunks'"):
        DenseCRFDriver(k, label_chunks=4)
    with pytest.raises(ValueError, match="splat must be one of.*'sideways'"):
        DenseCRFDriver(k, splat="sideways")
    with pytest.raises(ValueError, match="spatial_table must be one of.*'sparse'"):
        DenseCRFDriver(k, spatial_table="sparse")


@pytest.mark.parametrize("choices", ["cpu", "gpu"])
def test_exclusive_scan(choices):
    """The scan behind vertex numbering and the entry lists: two levels on the CPU, as many as it
    takes with 32-element chunks on the GPU (1,000,003 elements: five levels)."""
    from crf import _driver
    from crf.driver import DenseCRFDriver

    drv = DenseCRFDriver(_driver("cpu").k, choices)
    rng = np.random.default_rng(1)
    for n in (0, 1, 31, 32, 33, 1025, 1_000_003):
        x = rng.integers(0, 7, n).astype(np.int32)
        buf = drv.k.alloc((n + 1) * 4)
        drv.k.upload(buf, x)
        drv._exclusive_scan(buf, n, buf)  # in place, as the driver uses it
        got = drv.k.download(buf, (n + 1,), np.int32)
        assert np.array_equal(got, np.concatenate([[0], np.cumsum(x)]).astype(np.int32)), n


def test_results_are_deterministic_and_buffers_are_reused():
    from crf import _driver

    img = photo("chelsea", 200)
    s = smooth_logits(*img.shape[:2], 21, seed=5)
    a = refine(s, img, backend="cpu")
    pooled = _driver("cpu").pooled_bytes()
    for _ in range(3):
        b = refine(s, img, backend="cpu")
        assert np.array_equal(a, b)  # bit for bit, whatever order the pool threads ran in
    assert _driver("cpu").pooled_bytes() == pooled  # same size: nothing new allocated


def test_kept_spatial_lattice_is_rebuilt_when_size_or_parameters_change():
    """The spatial lattice is kept between calls of one size: every change that alters it must
    rebuild it (compared bit for bit with a driver that has never run)."""
    from crf import _driver
    from crf.driver import DenseCRFDriver

    k = _driver("cpu").k
    warm = DenseCRFDriver(k)
    a, b = photo("chelsea", 120), photo("coffee", 120)
    cases = [(a, 6, CRFParams()), (b[: a.shape[0], : a.shape[1]], 6, CRFParams()),  # same size, other pixels
             (b, 6, CRFParams()),  # other size
             (b, 6, CRFParams(pos_xy_std=2.0)), (b, 6, CRFParams(pos_xy_std=2.0, pos_w=1.0)),
             (b, 6, CRFParams(pos_xy_std=2.0, pos_w=1.0, normalization="symmetric")),
             (b, 13, CRFParams(pos_xy_std=2.0, pos_w=1.0, normalization="symmetric")),  # other row width
             (a, 6, CRFParams())]
    for img, c, p in cases:
        img = np.ascontiguousarray(img)
        h, w = img.shape[:2]
        s = smooth_logits(h, w, c, seed=c)
        got = warm.run(s, img, h, w, c, p)[0]
        fresh = DenseCRFDriver(k).run(s, img, h, w, c, p)[0]
        assert np.array_equal(got, fresh)


def test_concurrent_calls_from_threads_are_safe():
    from concurrent.futures import ThreadPoolExecutor

    imgs = [photo("coffee", 120), photo("chelsea", 150), photo("astronaut", 90)]
    scores = [smooth_logits(*im.shape[:2], 6, seed=i) for i, im in enumerate(imgs)]
    expected = [refine(s, im, backend="cpu") for s, im in zip(scores, imgs)]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda k: refine(scores[k % 3], imgs[k % 3], backend="cpu"), range(12)))
    for k, g in enumerate(got):
        assert np.array_equal(g, expected[k % 3])


@pytest.mark.parametrize("is_logits", [True, False])
@pytest.mark.parametrize("where", ["middle", "last pixel"])
def test_device_side_nan_check(is_logits, where):
    """Logits (or energies) already on the device (the TensorRT pipeline) are checked there, not on
    the host, by the unary kernel as it reads them: anywhere, the last pixel of a run of fewer than
    16 included, on the logits' and the energies' paths, with 0 iterations too."""
    from crf import _driver

    d = _driver("cpu")
    img = photo("coffee", 40)[:, :-1]  # pixels not a multiple of 16: the last thread has fewer
    h, w = img.shape[:2]
    assert (h * w) % 16
    s = smooth_logits(h, w, 3)
    at = (2, 5, 7) if where == "middle" else (2, h - 1, w - 1)
    s[at] = np.inf if where == "middle" else np.nan
    buf = d.k.alloc(s.nbytes)
    d.k.upload(buf, s)
    for iterations in (10, 0):
        with pytest.raises(CRFInputError, match="NaN/inf"):
            d.run(Buffer(s.nbytes, buf.ptr, buf.owner), img, h, w, 3, CRFParams(iterations=iterations),
                  is_logits=is_logits)
    s[at] = 0
    d.k.upload(buf, s)
    _, labels = d.run(buf, img, h, w, 3, CRFParams(), is_logits=is_logits, marginals=False, labels=True)
    expected = refine(s, img, backend="cpu") if is_logits else refine_unary(s, img, backend="cpu")
    assert (labels == expected.argmax(0)).all()


def test_lattice_key_overflow_is_an_error_not_garbage():
    img = photo("coffee", 200)
    s = smooth_logits(*img.shape[:2], 3)
    with pytest.raises(CRFInputError, match=r"overflow 16 bits: the spatial bandwidth .*too small for a 133x200 image"):
        refine(s, img, CRFParams(pos_xy_std=0.01), backend="cpu")
    assert np.isfinite(refine(s, img, CRFParams(pos_xy_std=0.5), backend="cpu")).all()  # small but fine


def test_no_compiler_falls_back_to_numpy_with_a_warning(tmp_path):
    code = ("import warnings, numpy as np\n"
            "from crf import refine, resolve_backend\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    name = resolve_backend('auto')\n"
            "print(name); print(w[0].message if w else 'no warning')\n"
            "img = np.zeros((8, 9, 3), np.uint8)\n"
            "print(refine(np.zeros((2, 8, 9), np.float32), img).shape)\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), DEEPLAB_CACHE=str(tmp_path), DEEPLAB_CRF_BUILD="runtime")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "numpy" and "slow numpy CRF" in lines[1] and "C++ compiler" in lines[1]
    assert lines[2] == "(2, 8, 9)"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_nvcc_compiles_the_kernels(tmp_path, arch):
    out = tmp_path / f"densecrf_sm{arch}.cubin"
    res = subprocess.run(["nvcc", "--cubin", f"-arch=sm_{arch}", "--fmad=false", "-O3", "-o", str(out),
                          str(KERNEL_SOURCE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cubin = out.read_bytes()
    assert cubin[:4] == b"\x7fELF"
    for kernel in ("crf_embed", "crf_hash_insert", "crf_splat", "crf_blur", "crf_update", "crf_argmax",
                   "crf_crop_scores"):
        assert kernel.encode() in cubin


def test_gpu_backend_unavailable_says_why(monkeypatch):
    from crf import gpu_kernels
    from crf.kernel_interface import BackendUnavailable

    monkeypatch.setattr(gpu_kernels.shutil, "which", lambda name: None)
    with pytest.raises(BackendUnavailable, match=r"nvcc.*PATH=/usr/local/cuda/bin"):
        gpu_kernels.require_nvcc()
    if not gpu_available():
        img = photo("coffee", 32)
        with pytest.raises(BackendUnavailable, match="pycuda|CUDA"):
            refine(smooth_logits(*img.shape[:2], 3), img, backend="gpu")


# ------------------------------------------------------------------------------------------------
# GPU (run on the lent GPU machine: pytest -m gpu)

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU with pycuda and nvcc here")


def _scene(h: int, w: int):
    """A generated scene (the GPU machine has no scikit-image for the photographs)."""
    from scenes import make_scene

    return make_scene(7, h, w)[0]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_gpu_equals_cpu(normalization):
    img = _scene(375, 500)
    s = smooth_logits(*img.shape[:2], 21, seed=9)
    p = CRFParams(normalization=normalization)
    g = refine(s, img, p, backend="gpu")
    c = refine(s, img, p, backend="cpu")
    assert (g.argmax(0) == c.argmax(0)).mean() >= 0.999
    assert np.abs(g - c).max() < 1e-3


@pytest.mark.gpu
@needs_gpu
def test_gpu_is_deterministic_and_equals_its_choices_run_on_the_cpu():
    """Exact fixed-point splat sums: the GPU gives the same bits every run, whatever order its
    atomics land in; and it agrees with the same choices run on the CPU (only expf differs)."""
    from crf import _driver
    from crf.driver import DenseCRFDriver

    img = _scene(240, 320)
    h, w = img.shape[:2]
    s = smooth_logits(h, w, 21, seed=3)
    runs = [refine(s, img, backend="gpu") for _ in range(3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    on_cpu = DenseCRFDriver(_driver("cpu").k, "gpu").run(s, img, h, w, 21, CRFParams())[0]
    assert np.abs(runs[0] - on_cpu).max() < 1e-4


@pytest.mark.gpu
@needs_gpu
def test_gpu_memory_does_not_grow_over_1000_calls():
    import pycuda.driver as cuda

    img = _scene(213, 320)
    s = smooth_logits(*img.shape[:2], 21, seed=2)
    from crf import _driver

    for _ in range(3):
        refine(s, img, backend="gpu")
    kernels = _driver("gpu").k
    with kernels.active():  # the backend's own context, whatever this thread has current
        free0, _ = cuda.mem_get_info()
    for _ in range(1000):
        refine(s, img, backend="gpu")
    with kernels.active():
        free1, _ = cuda.mem_get_info()
    assert free0 - free1 < 1 << 20, f"device memory grew by {free0 - free1} bytes"


def test_graph_replay_captures_one_iteration_and_replays_the_same_launches():
    """On the GPU one mean-field iteration is captured as a CUDA graph and replayed once per
    iteration. The driver's side of it runs here, with a backend whose capture records the
    launches made while capturing and replays them: what is captured must be exactly the
    iteration the one-by-one path launches (same kernels, grids and arguments, in order), and the
    results the same bits."""
    from crf import _driver
    from crf.cpu_kernels import CPUKernels
    from crf.driver import DenseCRFDriver

    class Recording(CPUKernels):
        def __init__(self, lib, graphs):
            super().__init__(lib)
            self.log, self.graphs, self.captured = [], graphs, []

        def prepare(self, kernel, n_threads, *args):
            call = super().prepare(kernel, n_threads, *args)

            def logged():
                self.log.append(call.spec)
                call()
            logged.spec = call.spec
            return logged

        def capture(self, launches):
            if not self.graphs:
                return None
            start = len(self.log)
            for launch in launches:  # "capturing" runs nothing on a GPU; here it is recorded, then undone below
                self.log.append(launch.spec)
            self.captured.append(self.log[start:])
            del self.log[start:]

            def replay():
                self.graph_launches += 1
                for launch in launches:
                    launch()
            return replay

    lib = _driver("cpu").k.lib._name
    img = photo("chelsea", 120)
    h, w = img.shape[:2]
    s = smooth_logits(h, w, 21, seed=8)
    p = CRFParams(iterations=4)
    rec = Recording(lib, graphs=False)
    drv = DenseCRFDriver(rec, "gpu")
    a = drv.run(s, img, h, w, 21, p)[0]
    direct_log, direct_iteration = list(rec.log), [launch.spec for launch in drv.last_iteration]
    rec.log.clear()
    rec.graphs = True
    drv.clear_cache()  # a cold call again, into the same pooled buffers (same addresses)
    b = drv.run(s, img, h, w, 21, p)[0]
    assert np.array_equal(a, b)
    iteration = [launch.spec for launch in drv.last_iteration]
    assert iteration == direct_iteration and 10 <= len(iteration) <= 20
    assert [spec[0] for spec in iteration].count("crf_update") == 1
    assert rec.captured == [iteration] and rec.graph_launches == 4
    # from the first iteration on, the replays ran exactly what the one-by-one path launched:
    # four iterations, then the output
    k = len(iteration)
    starts = [next(i for i in range(len(log)) if log[i:i + k] == iteration) for log in (direct_log, rec.log)]
    for log, start in zip((direct_log, rec.log), starts):
        assert log[start:start + 4 * k] == iteration * 4 and log[start + 4 * k][0] == "crf_marginals"


def test_import_pycuda_names_what_is_missing(tmp_path):
    """pycuda absent, and pycuda present without one of its own dependencies, are different
    problems: the second is reported by the dependency's name, not as 'no usable CUDA device'."""
    from crf.gpu_kernels import import_pycuda
    from crf.kernel_interface import BackendUnavailable

    code = ("import sys\nsys.path.insert(0, sys.argv[1])\n"
            "from crf.gpu_kernels import import_pycuda\nfrom crf.kernel_interface import BackendUnavailable\n"
            "try:\n    import_pycuda()\nexcept BackendUnavailable as e:\n    print(e)\n")
    fake = tmp_path / "site"
    (fake / "pycuda").mkdir(parents=True)
    (fake / "pycuda" / "__init__.py").write_text("")
    (fake / "pycuda" / "driver.py").write_text("import pytools_absent_here  # as a pycuda without pytools\n")
    out = subprocess.run([sys.executable, "-c", code, str(fake)], cwd=ROOT, capture_output=True, text=True)
    assert "its dependency 'pytools_absent_here' is missing" in out.stdout, out.stdout + out.stderr
    try:
        import pycuda  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match=r"pycuda is not installed \(pip install"):
            import_pycuda()


def test_gpu_kernels_unavailable_here_is_a_backend_error_and_auto_falls_back():
    from crf.gpu_kernels import GPUKernels
    from crf.kernel_interface import BackendUnavailable

    if gpu_available():
        pytest.skip("a GPU is here")
    with pytest.raises(BackendUnavailable):
        GPUKernels()
    assert resolve_backend("auto") == "cpu"


def test_require_gpu_turns_a_skipped_gpu_test_into_a_failure():
    """The GPU machine runs the suite with REQUIRE_GPU=1: there, a GPU test that skips (a broken
    pycuda build, no device) must fail the run instead of passing as "0 GPU tests"."""
    if gpu_available():
        pytest.skip("a GPU is here: the GPU tests run instead of skipping")
    test = "tests/test_crf_kernels.py::test_gpu_memory_does_not_grow_over_1000_calls"
    env = dict(os.environ, REQUIRE_GPU="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "REQUIRE_GPU=1 but this GPU test was skipped" in out.stdout, out.stdout
    env.pop("REQUIRE_GPU")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "1 skipped" in out.stdout, out.stdout


@pytest.mark.gpu
@needs_gpu
def test_gpu_from_worker_threads():
    """pycuda contexts are current per thread: the backend pushes its primary context around every
    call, so worker threads (a thread pool serving requests) get the same results."""
    from concurrent.futures import ThreadPoolExecutor

    img = _scene(120, 160)
    s = smooth_logits(*img.shape[:2], 21, seed=6)
    expected = refine(s, img, backend="gpu")
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: refine(s, img, backend="gpu"), range(8)))
    assert all(np.array_equal(g, expected) for g in got)


@pytest.mark.gpu
@needs_gpu
def test_gpu_graph_replay_equals_launches_and_holds_the_iteration():
    """One iteration captured as a CUDA graph: its kernel nodes are the iteration's launches
    (names where the driver tells them, grid and block sizes), and replaying it gives the same
    bits as launching kernel by kernel."""
    from crf.gpu_kernels import GPUKernels
    from crf.kernel_interface import BLOCK
    from crf.driver import DenseCRFDriver

    img = _scene(240, 320)
    h, w = img.shape[:2]
    s = smooth_logits(h, w, 21, seed=12)
    k = GPUKernels()
    drv = DenseCRFDriver(k)
    k.use_graphs = False
    direct, n_direct = drv.run(s, img, h, w, 21, CRFParams())[0], k.launches
    k.use_graphs = True
    g0, l0 = k.graph_launches, k.launches
    graph = drv.run(s, img, h, w, 21, CRFParams())[0]
    assert k.graph_error is None, k.graph_error
    assert k.graph_launches - g0 == 10 and np.array_equal(direct, graph)
    assert k.launches - l0 < n_direct - 100  # 12 launch calls captured instead of ~170 made
    with k.active():  # cuFuncGetName needs the context current
        nodes = drv._replay.graph.kernel_nodes()
    launched = sorted((spec[0], spec[1], BLOCK) for spec in (launch.spec for launch in drv.last_iteration))
    assert sorted((g, b) for _, g, b in nodes) == sorted((g, b) for _, g, b in launched)
    if all(name is not None for name, _, _ in nodes):  # cuFuncGetName: CUDA 12.3 drivers and newer
        assert sorted(nodes) == launched


@pytest.mark.gpu
@needs_gpu
def test_gpu_compile_failure_is_backend_unavailable_with_nvccs_message(tmp_path, monkeypatch):
    from crf import gpu_kernels
    from crf.kernel_interface import BackendUnavailable

    bad = tmp_path / "broken.cu"
    bad.write_text('extern "C" __global__ void k(float* x) { x[0] = undeclared_name; }\n')
    k = gpu_kernels.GPUKernels()  # compiles the real module (once per process) before the source is swapped
    monkeypatch.setattr(gpu_kernels, "KERNEL_SOURCE", bad)
    with k.active(), pytest.raises(BackendUnavailable, match=r"(?s)nvcc could not compile.*undeclared_name"):
        gpu_kernels._compile_module(k.cuda)


@pytest.mark.gpu
@needs_gpu
def test_gpu_missing_pycuda_dependency_is_named():
    code = ("import sys\nsys.modules['pytools'] = None  # as an install without pytools\n"
            "from crf.gpu_kernels import import_pycuda\nfrom crf.kernel_interface import BackendUnavailable\n"
            "try:\n    import_pycuda()\nexcept BackendUnavailable as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "its dependency 'pytools' is missing" in out.stdout, out.stdout + out.stderr


def test_gpu_session_script_help_and_loud_failure(tmp_path):
    """The GPU machine's one script: --help runs nothing; without the pycuda build kit it stops
    with a failure and its summary, never "nothing to test, exit 0"."""
    script = ROOT / "benchmarks" / "gpu_session.sh"
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                         env=dict(os.environ, OUT=str(tmp_path / "o")))
    assert out.returncode == 0 and "usage: bash benchmarks/gpu_session.sh" in out.stdout
    assert not (tmp_path / "o").exists()
    if (ROOT / ".whl").exists() or gpu_available():
        pytest.skip("a pycuda build kit or a GPU is here: the script would really run")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, OUT=str(tmp_path / "o")))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "pycuda build" in out.stdout and ".whl/pycuda-*.tar.gz missing" in out.stdout
    assert "RESULT: FAILED" in out.stdout and (tmp_path / "o" / "nvidia-smi.txt").exists()


def test_gpu_session_script_stops_before_building_when_safetensors_is_not_carried(tmp_path):
    """The bundled model is read with safetensors, which the GPU machine may lack: without it
    installed or carried in .whl/, the script stops before spending minutes on the pycuda build."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "gpu_session.sh", tmp_path / "benchmarks")
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "pycuda-2026.1.tar.gz").write_bytes(b"")  # never unpacked: the check comes first
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "safetensors.py").write_text("raise ImportError('not on this machine')\n")
    out = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_session.sh")], capture_output=True, text=True,
                         env=dict(os.environ, OUT=str(tmp_path / "o"), PYTHONPATH=str(blocked)), timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "safetensors neither installed nor in .whl/" in out.stdout and "RESULT: FAILED" in out.stdout
    assert not (tmp_path / "o" / "pycuda-install.log").exists()  # the build never started

