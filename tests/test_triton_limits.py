"""One request cannot hold the served model beyond its limits (a real Triton server): a request
above the per-request bounds is refused at once (400); a maximal one is stopped at the compute time
limit (503); meanwhile the others are answered or refused (503) within the queue timeout, and one
batched with it is answered first."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from triton_fixture import MODEL, NO_SERVE_EXTRA, server  # noqa: F401  (fixtures)

pytest.importorskip("tritonclient.http", reason=NO_SERVE_EXTRA)
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from serving.contract import DEFAULT_MAX_ITERATIONS  # noqa: E402

#: This module's repository: a short queue timeout, a batching delay long enough that two requests
#: sent 20 ms apart reach the model in one batch, and room for a request that computes for several
#: seconds on a 2-core machine (a 500 x 800 image of noise with 50 CRF iterations: ~7 s).
QUEUE_TIMEOUT_S = 2.0
QUEUE_DELAY_US = 400_000
MAX_PIXELS = 500 * 800
#: What a request may wait beyond the queue timeout: its own small compute, the HTTP round trip,
#: and the slowness of a shared 2-core machine.
SLACK_S = 1.5


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from serving.repository import write_repository

    out = tmp_path_factory.mktemp("triton_limits")
    write_repository(MODEL, out, max_batch=8, max_pixels=MAX_PIXELS, queue_delay_us=QUEUE_DELAY_US,
                     queue_timeout_s=QUEUE_TIMEOUT_S)
    return out


def _infer(url: str, image: np.ndarray, parameters: dict) -> tuple:
    """(outcome, seconds): "ok", or the server's status for an error ("400", "503", ...)."""
    client = httpclient.InferenceServerClient(url, network_timeout=300, connection_timeout=300)
    tensor = httpclient.InferInput("IMAGE", [1, *image.shape], "UINT8")
    tensor.set_data_from_numpy(image[None])
    t0 = time.monotonic()
    try:
        client.infer("deeplab", [tensor], parameters=parameters)
        outcome = "ok"
    except InferenceServerException as e:
        outcome = e.status()
    finally:
        client.close()
    return outcome, time.monotonic() - t0


def _hostile_image() -> np.ndarray:
    """As many pixels as the model takes, of noise: the CRF's lattice at its largest."""
    return np.random.default_rng(0).integers(0, 256, (500, MAX_PIXELS // 500, 3), dtype=np.uint8)


def test_a_request_above_the_bounds_is_refused_at_once(server):
    image = np.zeros((57, 73, 3), np.uint8)
    for parameters in ({"iterations": 10 ** 9}, {"iterations": DEFAULT_MAX_ITERATIONS + 1}, {"bi_rgb_std": 1e9}):
        outcome, seconds = _infer(server.http_url, image, parameters)
        assert outcome == "400" and seconds < 5, (parameters, outcome, seconds)
    outcome, seconds = _infer(server.http_url, np.zeros((MAX_PIXELS // 100 + 1, 100, 3), np.uint8), {})
    assert outcome == "400" and seconds < 5


def test_a_maximal_request_holds_the_others_at_most_the_queue_timeout(server):
    """The largest request the bounds allow (max_pixels of noise, max_iterations, small
    bandwidths: ~7 s here) is stopped at the compute time limit (the queue timeout) with 503. A cheap request of the same size sent 20 ms after it (Triton
    batches same-shaped requests only) shares its batch and is answered before it; requests sent
    while it runs get their answer, or a 503, within the queue timeout. Before the limits, every one
    of them waited for the large request to finish."""
    hostile = {"crf": True, "iterations": DEFAULT_MAX_ITERATIONS, "bi_xy_std": 3.0, "bi_rgb_std": 1.0,
               "pos_xy_std": 1.0}
    small = np.ascontiguousarray(_hostile_image()[:57, :73])
    assert _infer(server.http_url, small, {})[0] == "ok"  # warm
    results, done = {}, threading.Event()

    def run(name, image, parameters):
        results[name] = _infer(server.http_url, image, parameters)
        if name == "hostile":
            done.set()

    threads = [threading.Thread(target=run, args=("hostile", _hostile_image(), hostile))]
    threads[0].start()
    time.sleep(0.02)
    cheap = np.ascontiguousarray(_hostile_image()[::-1])
    threads.append(threading.Thread(target=run, args=("batched", cheap, {"crf": False})))
    threads[-1].start()
    probes = 0
    time.sleep(QUEUE_DELAY_US / 1e6 + 0.2)  # the batch above has started: later requests queue behind it
    while not done.wait(0.3) and probes < 40:
        threads.append(threading.Thread(target=run, args=(f"probe {probes}", small, {})))
        threads[-1].start()
        probes += 1
    for t in threads:
        t.join(300)
    hostile_outcome, hostile_s = results.pop("hostile")
    # Within the bounds, but past the compute limit: stopped between CRF iterations. The limit is
    # checked between stages and iterations, not inside the lattice build: allow one build and one
    # iteration, timed here on the same machine, beyond it.
    from crf import CRFParams, refine

    scores = np.random.default_rng(1).normal(0, 1, (5, *_hostile_image().shape[:2])).astype(np.float32)
    t0 = time.monotonic()
    refine(scores, _hostile_image(), CRFParams(**{**{k: v for k, v in hostile.items() if k != "crf"},
                                                  "iterations": 1}))
    build = time.monotonic() - t0
    assert hostile_outcome == "503", hostile_outcome
    assert hostile_s < QUEUE_DELAY_US / 1e6 + QUEUE_TIMEOUT_S + 1.5 * build + SLACK_S, (hostile_s, build)
    batched_outcome, batched_s = results.pop("batched")
    assert batched_outcome == "ok" and batched_s < QUEUE_DELAY_US / 1e6 + SLACK_S, (batched_s, hostile_s)
    limit = QUEUE_TIMEOUT_S + SLACK_S
    slow = {name: r for name, r in results.items() if r[1] > limit or r[0] not in ("ok", "503")}
    assert not slow, f"waited beyond {limit} s behind a {hostile_s:.1f} s request: {slow}"
    if hostile_s > QUEUE_DELAY_US / 1e6 + limit + 1:  # it held the instance long enough for a probe to time out
        assert any(outcome == "503" for outcome, _ in results.values()), results
    # and the model serves normally afterwards
    assert _infer(server.http_url, small, {})[0] == "ok"
