"""CRFParams: strict types and documented upper bounds, each refusal naming the field and the bound."""
from __future__ import annotations

import json

import numpy as np
import pytest

from crf import CRFParams
from crf.params import MAX_ITERATIONS, MAX_RGB_STD, MAX_WEIGHT, MAX_XY_STD


@pytest.mark.parametrize("field", ["bi_w", "pos_w", "bi_xy_std", "pos_xy_std", "bi_rgb_std", "iterations"])
@pytest.mark.parametrize("value", [True, False, "5", None, [3]])
def test_non_numbers_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CRFParams(**{field: value})


@pytest.mark.parametrize("field,bound", [("bi_w", MAX_WEIGHT), ("pos_w", MAX_WEIGHT), ("bi_xy_std", MAX_XY_STD),
                                         ("pos_xy_std", MAX_XY_STD), ("bi_rgb_std", MAX_RGB_STD),
                                         ("iterations", MAX_ITERATIONS)])
def test_upper_bounds_are_enforced_and_named(field, bound):
    CRFParams(**{field: type(CRFParams().to_dict()[field])(bound)})  # the bound itself is allowed
    over = bound + 1 if field == "iterations" else bound * 1.5
    with pytest.raises(ValueError, match=field) as e:
        CRFParams(**{field: over})
    assert f"{bound:g}" in str(e.value)


def test_iteration_counts_in_the_millions_are_refused():
    for n in (10**6, 2**63):
        with pytest.raises(ValueError, match="iterations"):
            CRFParams(iterations=n)


def test_iterations_must_be_whole():
    with pytest.raises(ValueError, match="iterations"):
        CRFParams(iterations=2.5)


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    p = CRFParams(bi_w=np.float32(4.0), iterations=np.int64(7))
    assert p.bi_w == 4.0 and type(p.bi_w) is float
    assert p.iterations == 7 and type(p.iterations) is int
    json.dumps(p.to_dict())  # plain JSON again


def test_json_file_with_bool_weight_is_refused(tmp_path):
    f = tmp_path / "crf.json"
    f.write_text(json.dumps({"bi_w": True}))
    with pytest.raises(ValueError, match="bi_w") as e:
        CRFParams.load(f)
    assert str(f) in str(e.value)
