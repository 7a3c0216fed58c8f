"""The served model's request/config parameters (serving/contract.py) and CRFParams as JSON."""
import json
import re

import numpy as np
import pytest

from crf import CRFParams
from serving.contract import (DEFAULT_MAX_ITERATIONS, REQUEST_MAX, REQUEST_PARAMETERS, RequestError, check_image_batch,
                              config_parameters, crf_params_from_request, read_config_parameters, request_parameters)


def test_crf_off_by_request_or_by_model_default():
    assert crf_params_from_request({"crf": False}, CRFParams()) is None
    assert crf_params_from_request({"crf": "off"}, CRFParams()) is None
    assert crf_params_from_request({}, None) is None
    assert crf_params_from_request({"crf": True}, None) == CRFParams()


def test_request_fields_replace_the_defaults():
    defaults = CRFParams(bi_w=4.0, iterations=5)
    got = crf_params_from_request({"bi_rgb_std": 3, "iterations": 2.0}, defaults)
    assert got == CRFParams(bi_w=4.0, bi_rgb_std=3, iterations=2)


def test_unknown_request_parameters_are_refused_naming_them_and_the_known_ones():
    """A typo ("bi_ww") used to be ignored, leaving the default in place without a word."""
    for params in ({"bi_ww": 4.0}, {"sequence_id": 7, "crf": True}, {"crf": False, "tag": "x"}):
        with pytest.raises(RequestError, match="unknown request parameter") as e:
            crf_params_from_request(params, CRFParams())
        bad = (set(params) - set(REQUEST_PARAMETERS)).pop()
        assert repr(bad) in str(e.value)
        assert all(name in str(e.value) for name in REQUEST_PARAMETERS)


@pytest.mark.parametrize("params, words", [
    ({"crf": "maybe"}, "'crf' must be a bool"),
    ({"bi_w": -1.0}, "'bi_w' must be a number in \\(0, 1000\\]"),
    ({"bi_w": True}, "'bi_w' must be a number"),
    ({"pos_w": "3"}, "'pos_w' must be a number"),
    ({"bi_xy_std": float("nan")}, "'bi_xy_std' must be a number"),
    ({"iterations": 2.5}, "'iterations' must be a whole number in 0..50"),
    ({"iterations": -1}, "'iterations' must be a whole number in 0..50"),
    ({"normalization": "before"}, "'normalization' must be one of"),
])
def test_bad_request_parameters_are_refused_by_name(params, words):
    with pytest.raises(RequestError, match=words):
        crf_params_from_request(params, CRFParams())


@pytest.mark.parametrize("name", sorted(REQUEST_MAX))
def test_every_number_field_has_a_per_request_bound(name):
    bound = REQUEST_MAX[name]
    assert crf_params_from_request({name: bound}, CRFParams()).to_dict()[name] == bound
    with pytest.raises(RequestError, match=rf"{name!r} must be a number in \(0, {bound:g}\], got {bound * 1.5!r}"):
        crf_params_from_request({name: bound * 1.5}, CRFParams())


def test_iterations_are_bounded_by_the_models_max_iterations():
    """One request with an enormous iteration count used to hold the model instance for as long as it asked."""
    most = DEFAULT_MAX_ITERATIONS
    assert crf_params_from_request({"iterations": most}, CRFParams()).iterations == most
    for huge in (DEFAULT_MAX_ITERATIONS + 1, 10 ** 9):
        with pytest.raises(RequestError, match=f"'iterations' must be a whole number in 0..{DEFAULT_MAX_ITERATIONS}"):
            crf_params_from_request({"iterations": huge}, CRFParams())
    assert crf_params_from_request({"iterations": 7}, CRFParams(), max_iterations=7).iterations == 7
    with pytest.raises(RequestError, match="in 0..7 \\(the model's max_iterations\\), got 8"):
        crf_params_from_request({"iterations": 8}, CRFParams(), max_iterations=7)
    # Checked even when the request turns the CRF off: a bad request is refused, not half-read.
    with pytest.raises(RequestError, match="'iterations'"):
        crf_params_from_request({"crf": False, "iterations": 10 ** 9}, CRFParams())
    # The model's own defaults are the operator's, whatever a request may ask for.
    assert crf_params_from_request({}, CRFParams(iterations=80)).iterations == 80


def test_request_parameter_text_is_a_json_object():
    assert request_parameters('{"crf": false, "bi_w": 3}') == {"crf": False, "bi_w": 3}
    assert request_parameters("") == {} and request_parameters(None) == {}
    with pytest.raises(RequestError, match="request parameters are not JSON"):
        request_parameters("{crf: false")
    with pytest.raises(RequestError, match="request parameters must be a JSON object, got '\\[1, 2\\]'"):
        request_parameters("[1, 2]")


def test_config_parameters_round_trip_as_triton_hands_them_over():
    names, palette = ["background", "disc"], [[0, 0, 0], [128, 0, 0]]
    for defaults in (CRFParams(pos_w=2.0), None):
        stored = config_parameters(names, palette, defaults)
        assert all(isinstance(v, str) for v in stored.values())
        as_triton = {k: {"string_value": v} for k, v in stored.items()}
        assert read_config_parameters(as_triton) == (names, palette, defaults)
        assert read_config_parameters(stored) == (names, palette, defaults)


def test_crf_params_json_round_trip_and_errors(tmp_path):
    p = CRFParams(bi_w=4.0, bi_xy_std=60.0, bi_rgb_std=5.0)
    (tmp_path / "p.json").write_text(json.dumps(p.to_dict()))
    assert CRFParams.load(tmp_path / "p.json") == p
    (tmp_path / "wrapped.json").write_text(json.dumps({"mean_iou": 0.9, "crf": p.to_dict()}))
    assert CRFParams.load(tmp_path / "wrapped.json") == p
    (tmp_path / "typo.json").write_text(json.dumps({"bi_ww": 4.0}))
    with pytest.raises(ValueError, match="typo.json: unknown CRF parameter.*bi_ww"):
        CRFParams.load(tmp_path / "typo.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        CRFParams.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="must be a JSON object"):
        CRFParams.from_dict([1, 2])


@pytest.mark.parametrize("array, words", [
    (np.zeros((1, 4, 4, 3), np.float32), "must be UINT8"),
    (np.zeros((4, 4, 3), np.uint8), "must be N x H x W x 3"),
    (np.zeros((1, 4, 4, 2), np.uint8), "must be N x H x W x 3"),
    (np.zeros((1, 0, 4, 3), np.uint8), "is empty"),
    (np.zeros((1, 5, 4, 3), np.uint8), "1 image\\(s\\) of 5x4 = 20 pixels, more than the model's max_pixels \\(19\\)"),
    (np.zeros((2, 4, 3, 3), np.uint8), "2 image\\(s\\) of 4x3 = 24 pixels, more than the model's max_pixels \\(19\\)"),
])
def test_the_models_own_image_checks(array, words):
    with pytest.raises(RequestError, match=words):
        check_image_batch(array, max_pixels=19)
    assert check_image_batch(np.zeros((1, 4, 4, 3), np.uint8), max_pixels=19).shape == (1, 4, 4, 3)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_without_a_server_says_where_it_looked(protocol):
    """Nothing listens on the port: one TritonServerError naming the address, for HTTP as for gRPC
    (HTTP used to raise a bare ConnectionRefusedError)."""
    pytest.importorskip("tritonclient." + protocol)
    from serving.client import TritonSegmenter, TritonServerError

    url = f"127.0.0.1:{_free_port()}"
    where = re.escape(url)
    with pytest.raises(TritonServerError, match=rf"cannot reach a Triton server at {where} \(http\): .*refused|"
                       rf"{where} model 'deeplab': failed to connect"):
        TritonSegmenter(url, protocol=protocol, timeout=5)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "127.0.0.1", "127.0.0.1:99999", ":8000", ""])
def test_client_url_must_be_host_and_port(url):
    pytest.importorskip("tritonclient.http")
    from serving.client import TritonSegmenter

    with pytest.raises(ValueError, match=rf"url must be host:port without a scheme, e\.g\. 127\.0\.0\.1:8000, got '{url}'"):
        TritonSegmenter(url)
