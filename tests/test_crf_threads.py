"""The CPU build's launch path: its thread pool (any thread count gives the same bits, idle threads
sleep, forked children and concurrent drivers work) and the launchers compiled for fixed row widths."""
from __future__ import annotations

import multiprocessing
import sys
import threading
import time

import numpy as np
import pytest

from conftest import photo, smooth_logits
from crf import CRFParams
from crf.features import unary_from_scores


@pytest.fixture
def kernels():
    """The process's CPU kernels, their thread count restored afterwards (the pool is per process)."""
    from crf import _driver

    k = _driver("cpu").k
    before = k.threads
    yield k
    k.threads = before


def _run(k, img, unary, params=CRFParams(), **choices):
    from crf.driver import DenseCRFDriver

    h, w = img.shape[:2]
    return DenseCRFDriver(k, **choices).run(unary, img, h, w, unary.shape[0], params, is_logits=False)[0]


@pytest.mark.parametrize("bad", [0, -1, 257, 1.5, "2", True])
def test_thread_count_out_of_range_is_refused(kernels, bad):
    with pytest.raises(ValueError, match="CPU CRF threads must be an integer from 1 to 256"):
        kernels.threads = bad


def test_any_thread_count_gives_the_same_bits(kernels):
    img = photo("astronaut", 220)
    unary = unary_from_scores(smooth_logits(*img.shape[:2], 21, seed=3))
    results = {}
    for n in (1, 2, 3, 5):  # more threads than cores too: claims land on workers late or not at all
        kernels.threads = n
        assert kernels.threads == n
        results[n] = _run(kernels, img, unary)
    for n, q in results.items():
        assert np.array_equal(q, results[1]), n


def test_idle_threads_sleep(kernels):
    """No busy waiting: after a call the pool's workers use no CPU time."""
    img = photo("coffee", 200)
    unary = unary_from_scores(smooth_logits(*img.shape[:2], 21, seed=1))
    kernels.threads = 2
    _run(kernels, img, unary)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    time.sleep(0.5)
    used = time.process_time() - cpu0
    assert time.perf_counter() - wall0 >= 0.5
    assert used < 0.05, f"{used:.3f} s of CPU time while idle"


def _child_run(queue, img, unary):
    from crf import _driver

    queue.put(_run(_driver("cpu").k, img, unary))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_runs_without_the_parents_workers(kernels):
    img = photo("chelsea", 160)
    unary = unary_from_scores(smooth_logits(*img.shape[:2], 6, seed=2))
    kernels.threads = 2
    expected = _run(kernels, img, unary)  # the pool's workers exist in this process now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_run, args=(queue, img, unary))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert np.array_equal(got, expected)


def test_concurrent_launches_from_two_drivers(kernels):
    """Two drivers launching at the same time (not serialised by crf.refine's lock): the second
    launch runs on its own thread while the first holds the pool; both give the serial result."""
    imgs = [photo("coffee", 180), photo("astronaut", 150)]
    unaries = [unary_from_scores(smooth_logits(*im.shape[:2], 21, seed=i)) for i, im in enumerate(imgs)]
    kernels.threads = 2
    expected = [_run(kernels, im, u) for im, u in zip(imgs, unaries)]
    got: dict = {}

    def work(i):
        got[i] = [_run(kernels, imgs[i % 2], unaries[i % 2]) for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, results in got.items():
        for q in results:
            assert np.array_equal(q, expected[i % 2])


@pytest.mark.parametrize("c, fixed_align, general_align", [(21, 8, 1), (40, 8, 7), (3, 8, 3)])
def test_fixed_row_width_launchers_equal_the_general_ones(kernels, c, fixed_align, general_align):
    """Rows of 24, 40 or 4 floats run update and blur compiled for that width; rows of 21, 42 or 3
    the general loops. Padding labels are exact zeros, so the real labels agree bit for bit."""
    img = photo("astronaut", 170)
    unary = unary_from_scores(smooth_logits(*img.shape[:2], c, seed=c))
    for params in (CRFParams(), CRFParams(bi_rgb_std=3.0, pos_xy_std=1.0, normalization="symmetric")):
        fixed = _run(kernels, img, unary, params, label_align=fixed_align)
        general = _run(kernels, img, unary, params, label_align=general_align)
        assert np.array_equal(fixed, general)


def test_cold_call_builds_both_lattices_at_once_and_reports_a_failure(kernels, monkeypatch):
    """With two or more threads a cold call builds the spatial lattice on a thread of its own while
    the bilateral build runs its insertion: a failure there reaches the caller, nothing is kept
    from it, and the next call builds both again."""
    from crf.driver import DenseCRFDriver

    kernels.threads = 2
    img = photo("astronaut", 90)
    h, w = img.shape[:2]
    unary = unary_from_scores(smooth_logits(h, w, 5, seed=8))
    drv = DenseCRFDriver(kernels)
    built, real_build = [], DenseCRFDriver._build

    def failing_build(self, lat, *args, **kwargs):
        built.append((lat.tag, threading.current_thread() is threading.main_thread()))
        if lat.tag == "s_":
            raise MemoryError("spatial lattice")
        return real_build(self, lat, *args, **kwargs)

    monkeypatch.setattr(DenseCRFDriver, "_build", failing_build)
    with pytest.raises(MemoryError, match="spatial lattice"):
        drv.run(unary, img, h, w, 5, CRFParams(), is_logits=False)
    assert sorted(built) == [("b_", True), ("s_", False)]  # the spatial one on the helper thread
    monkeypatch.setattr(DenseCRFDriver, "_build", real_build)
    got = drv.run(unary, img, h, w, 5, CRFParams(), is_logits=False)[0]
    kernels.threads = 1
    assert np.array_equal(got, _run(kernels, img, unary))
