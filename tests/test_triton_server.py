"""The bundled model served by a real Triton server (deeplab-triton-repo + deeplab-serve), over
HTTP and gRPC: labels as the in-process Segmenter's, concurrent clients, dynamic batching, bad
requests answered with errors, a killed model process, and the tools' bad input."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from conftest import SAMPLES
from crf import CRFParams
from runtime import Segmenter
from triton_fixture import MODEL, NO_SERVE_EXTRA, repo, server  # noqa: F401  (fixtures)

pytest.importorskip("tritonclient.http", reason=NO_SERVE_EXTRA)
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from serving import launcher  # noqa: E402
from serving.client import TritonSegmenter, TritonServerError  # noqa: E402
from tools import serve, triton_repo  # noqa: E402


@pytest.fixture(scope="module")
def local():
    return Segmenter(MODEL), Segmenter(MODEL, crf=None)


def _url(server, protocol):
    return server.http_url if protocol == "http" else server.grpc_url


def _raw_infer(server, array, datatype="UINT8", shape=None, parameters=None):
    """One request through tritonclient.http, bypassing TritonSegmenter's own checks."""
    client = httpclient.InferenceServerClient(server.http_url)
    tensor = httpclient.InferInput("IMAGE", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    if shape is not None:
        tensor._shape = list(shape)  # a declared shape that the data does not have
    try:
        return client.infer("deeplab", [tensor], parameters=parameters)
    finally:
        client.close()


def _small(k: int) -> np.ndarray:
    """A crop of a sample (different per k), small enough for many requests."""
    img = cv2.imread(str(SAMPLES / f"scene_{k % 3}.png"))
    y, x = 20 * (k % 4), 30 * (k % 5)
    return np.ascontiguousarray(img[y:y + 57, x:x + 73])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_labels_equal_the_in_process_segmenter_with_and_without_crf(server, local, protocol):
    with_crf, without = local
    remote = TritonSegmenter(_url(server, protocol), protocol=protocol)
    remote_off = TritonSegmenter(_url(server, protocol), protocol=protocol, crf=None)
    assert remote.class_names == with_crf.class_names and remote.crf_params == CRFParams()
    assert (remote.palette == with_crf.palette).all()
    for path in sorted(SAMPLES.glob("*.png")):
        on, off = remote(str(path)), remote_off(str(path))
        assert np.array_equal(on.labels, with_crf(str(path)).labels), path
        assert np.array_equal(off.labels, without(str(path)).labels), path
        assert not np.array_equal(on.labels, off.labels)  # the CRF ran on the server
        assert on.timings["total"] > 0 and on.probabilities is None
    assert remote.mask(on).shape == on.image.shape


def test_per_request_crf_parameters_and_probabilities(server, local):
    params = CRFParams(bi_w=8.0, bi_rgb_std=5.0, iterations=3)
    img = _small(1)
    remote = TritonSegmenter(server.http_url, crf=params, server_stats=True)
    got = remote(img, return_probabilities=True)
    want = local[0].with_crf(params)(img, return_probabilities=True)
    assert np.array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-5)
    assert got.timings["server_compute"] > 0 and "server_queue" in got.timings


def test_concurrent_clients_all_get_their_own_labels(server, local):
    images = [_small(k) for k in range(6)]
    expected = [local[0](im).labels for im in images]

    def client(worker: int):
        seg = TritonSegmenter(server.http_url if worker % 2 else server.grpc_url,
                              protocol="http" if worker % 2 else "grpc")
        wrong = 0
        for i in range(25):
            k = (worker + i) % len(images)
            wrong += not np.array_equal(seg(images[k]).labels, expected[k])
        seg.close()
        return wrong

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, w) for w in range(4)]
        assert [f.result(timeout=120) for f in futures] == [0, 0, 0, 0]


def _counts(server, at_least: int = 0):
    """(inference_count, execution_count) once settled: Triton counts a request as it releases it,
    which can be just after the client has its answer. Read until two reads 50 ms apart agree and
    the inference count is at least ``at_least`` (or 5 s have passed)."""
    client = httpclient.InferenceServerClient(server.http_url)

    def read():
        stats = client.get_inference_statistics("deeplab")["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])

    last, deadline = read(), time.monotonic() + 5.0
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now == last and now[0] >= at_least:
            break
        last = now
    client.close()
    return last


def test_same_size_frames_are_batched_by_the_server(server, local):
    frame = _small(2)
    want = local[0](frame).labels
    inferences0, executions0 = _counts(server)
    barrier = threading.Barrier(16)

    def one(_):
        seg = TritonSegmenter(server.http_url)
        barrier.wait()
        return np.array_equal(seg(frame).labels, want)

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(16)))
    inferences, executions = _counts(server, at_least=inferences0 + 16)
    assert inferences - inferences0 == 16
    assert executions - executions0 < 16  # several requests shared one model execution


@pytest.mark.parametrize("case, array, datatype, shape, words", [
    ("wrong dtype", np.zeros((1, 9, 9, 3), np.float32), "FP32", None, "data-type is 'FP32'"),
    ("wrong rank", np.zeros((1, 9, 27), np.uint8), "UINT8", None, "unexpected shape"),
    ("2 channels", np.zeros((1, 9, 9, 2), np.uint8), "UINT8", None, "unexpected shape"),
    ("empty", np.zeros((1, 0, 9, 3), np.uint8), "UINT8", None, "IMAGE is empty"),
    ("no width", np.zeros((1, 9, 0, 3), np.uint8), "UINT8", None, "IMAGE is empty"),
    ("1 GB declared", np.zeros((1, 5, 5, 3), np.uint8), "UINT8", (1, 18258, 18258, 3), "byte size"),
    ("over max_pixels", np.zeros((1, 500, 500, 3), np.uint8), "UINT8", None, "max_pixels"),
    ("over max_pixels together", np.zeros((2, 300, 400, 3), np.uint8), "UINT8", None, "max_pixels"),
])
def test_bad_requests_get_a_400_and_the_server_keeps_serving(server, case, array, datatype, shape, words):
    """Every one is the client's fault: 400, never 500 (an empty image used to get 500)."""
    with pytest.raises(InferenceServerException, match=words) as e:
        _raw_infer(server, array, datatype, shape)
    assert e.value.status() == "400", (case, e.value.status())
    good = _raw_infer(server, _small(0)[None])
    assert good.as_numpy("LABELS").shape == (1, 57, 73)


def test_an_image_too_long_for_the_crf_lattice_gets_a_400(server):
    """A 1 x 200000 image fits max_pixels but overflows the CRF's lattice keys: the request's fault."""
    with pytest.raises(InferenceServerException) as e:
        _raw_infer(server, np.zeros((1, 1, 200_000, 3), np.uint8))
    assert e.value.status() == "400", e.value.message()


_BAD_STATUS = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("parameters, words", [
    ({"crf": "maybe"}, ["'crf'", "bool"]),
    ({"bi_w": -1.0}, ["'bi_w'", "(0, 1000]"]),
    ({"bi_xy_std": 1e9}, ["'bi_xy_std'", "(0, 10000]"]),
    ({"iterations": 10 ** 6}, ["'iterations'", "0..50", "max_iterations"]),
    ({"normalization": "before"}, ["'normalization'"]),
    ({"bi_ww": 4.0}, ["unknown request parameter", "'bi_ww'", "bi_w, bi_xy_std"]),
    ({"crf": False, "tag": "x"}, ["unknown request parameter", "'tag'"]),
])
def test_bad_request_parameters_get_a_400_naming_them(server, protocol, parameters, words):
    seg = TritonSegmenter(_url(server, protocol), protocol=protocol)
    seg._parameters = parameters  # past the client's own CRFParams checks
    t0 = time.monotonic()
    with pytest.raises(TritonServerError) as e:
        seg(_small(0))
    assert time.monotonic() - t0 < 5  # refused before any work, however large the request asks
    assert e.value.status == _BAD_STATUS[protocol]
    assert all(w in str(e.value) for w in words), str(e.value)
    seg._parameters = {"crf": True, "iterations": 50}  # the bound itself is taken
    assert seg(_small(0)).labels.shape == (57, 73)


def test_the_default_repository_bounds_the_queue_wait_and_the_iterations(server):
    """The documented defaults (docs/triton.md), as the running server reads them: a request still queued after 10 s
    is refused, whatever it asks (no override), and at most 50 CRF iterations per request."""
    client = httpclient.InferenceServerClient(server.http_url)
    config = client.get_model_config("deeplab")
    client.close()
    policy = config["dynamic_batching"]["default_queue_policy"]
    assert policy["timeout_action"] == "REJECT" and not policy.get("allow_timeout_override", False)
    assert int(policy["default_timeout_microseconds"]) == 10_000_000
    assert config["parameters"]["max_iterations"]["string_value"] == "50"


def test_a_killed_model_process_is_replaced(server, local):
    stubs = launcher.stub_processes(server.process.pid)
    assert len(stubs) == 1
    os.kill(stubs[0], signal.SIGKILL)
    seg = TritonSegmenter(server.http_url)
    want = local[0](_small(3)).labels
    deadline, errors = time.monotonic() + 60, []
    while True:
        try:
            got = seg(_small(3))
            if server.restarts:
                break
        except Exception as e:  # "Stub process ... is not healthy", then connections closed or refused
            if not isinstance(e, (TritonServerError, OSError)) and "connection" not in str(e).lower():
                raise
            errors.append(str(e))
        assert time.monotonic() < deadline, f"not served again after 60 s: {errors[-3:]}"
        time.sleep(0.5)
    assert np.array_equal(got.labels, want)
    assert server.restarts == 1 and len(launcher.stub_processes(server.process.pid)) == 1
    assert all(np.array_equal(seg(_small(3)).labels, want) for _ in range(3))


def test_a_crashed_server_is_restarted(server, local):
    # A killed stub can take the server down with it (SIGABRT) before the watchdog sees the stub
    # gone: a crash of the server itself is restarted too; a server stopped on purpose is not.
    before, crashed = server.restarts, server.process
    os.kill(crashed.pid, signal.SIGABRT)
    want = local[0](_small(3)).labels
    deadline = time.monotonic() + 60
    while server.restarts == before:
        assert time.monotonic() < deadline, f"not restarted after 60 s; the server's log ends:\n{server.log_tail()}"
        time.sleep(0.5)
    assert crashed.returncode == -signal.SIGABRT and server.process is not crashed
    assert np.array_equal(TritonSegmenter(server.http_url)(_small(3)).labels, want)


# -- the tools' bad input -------------------------------------------------------------------------
def test_repository_tool_refuses_a_missing_model_and_an_unwritable_folder(tmp_path, capsys):
    assert triton_repo.main([str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.onnx: no such model file" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert triton_repo.main([str(MODEL), "--out", str(blocker / "r")]) == 2
    assert "cannot write the repository" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"bi_ww": 1}')
    assert triton_repo.main([str(MODEL), "--out", str(tmp_path / "r"), "--crf-params", str(tmp_path / "bad.json")]) == 2
    assert "unknown CRF parameter(s) bi_ww" in capsys.readouterr().err
    assert not (tmp_path / "r" / "deeplab").exists()


def test_repository_tool_writes_the_options_into_the_config(tmp_path):
    (tmp_path / "p.json").write_text('{"bi_w": 4.0, "iterations": 5}')
    assert triton_repo.main([str(MODEL), "--out", str(tmp_path), "--instances", "2", "--max-batch", "4",
                             "--crf-params", str(tmp_path / "p.json")]) == 0
    text = (tmp_path / "deeplab" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in text and "kind: KIND_CPU count: 2" in text
    assert '\\"bi_w\\": 4.0' in text and '\\"iterations\\": 5' in text
    assert (tmp_path / "deeplab" / "1" / "model.onnx").read_bytes() == MODEL.read_bytes()
    assert (tmp_path / "deeplab" / "1" / "crf" / "kernels" / "densecrf.cu").is_file()
    assert triton_repo.main([str(MODEL), "--out", str(tmp_path), "--no-crf"]) == 0  # replaced
    assert '"crf_defaults" value: { string_value: "null" }' in (tmp_path / "deeplab" / "config.pbtxt").read_text()


def test_repository_tool_sets_the_request_limits(tmp_path, capsys):
    from serving.config_check import validate_repository

    assert triton_repo.main([str(MODEL), "--out", str(tmp_path), "--max-iterations", "12",
                             "--queue-timeout", "2.5"]) == 0
    config = validate_repository(tmp_path)["deeplab"]  # Triton's own schema
    policy = config.dynamic_batching.default_queue_policy
    assert policy.default_timeout_microseconds == 2_500_000 and not policy.allow_timeout_override
    assert config.parameters["max_iterations"].string_value == "12"
    capsys.readouterr()
    # the model's default CRF (10 iterations) must stay askable
    assert triton_repo.main([str(MODEL), "--out", str(tmp_path), "--max-iterations", "9"]) == 2
    assert "max_iterations (9)" in capsys.readouterr().err
    assert triton_repo.main([str(MODEL), "--out", str(tmp_path), "--queue-timeout", "0"]) == 2
    assert "queue_timeout_s" in capsys.readouterr().err


def test_a_plan_goes_to_the_gpu_writer(tmp_path, capsys):
    plan = tmp_path / "m.engine"
    plan.write_bytes(b"not a plan")
    code = triton_repo.main([str(plan), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "the class count is unknown" in err  # the GPU writer ran: no sidecar, no class count


def test_serve_tool_refuses_a_port_in_use_and_a_missing_repository(repo, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert serve.main(["--repo", str(repo), "--http-port", str(port)]) == 1
    assert f"--http-port {port}: in use on 127.0.0.1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused before any server starts
        serve.main(["--repo", str(tmp_path)])
    assert e.value.code == 2 and "not a repository with model 'deeplab'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve.parse_args(["--repo", str(repo), "--grpc-port", "70000"])
    assert "--grpc-port" in capsys.readouterr().err


def test_segmenter_with_crf_views_share_the_network_and_match_fresh_segmenters(local):
    with_crf, without = local
    params = CRFParams(bi_w=8.0, iterations=3)
    img = _small(4)
    view = with_crf.with_crf(params)
    assert view.network is with_crf.network and with_crf.crf_params == CRFParams()
    assert np.array_equal(view(img).labels, Segmenter(MODEL, crf=params)(img).labels)
    assert np.array_equal(with_crf.with_crf(None)(img).labels, without(img).labels)
    with pytest.raises(ValueError, match="made with crf=None"):
        without.with_crf(params)
