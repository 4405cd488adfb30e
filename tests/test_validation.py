"""The shared argument checks (fastforget/_validation.py): each accepts what it documents and names the argument."""

import math

import numpy as np
import pytest
import torch

from fastforget import _validation as check


@pytest.mark.parametrize("value", [0, 1, 2.5, np.float32(0.5), np.int64(3)])
def test_check_real_accepts_finite_reals(value):
    assert check.check_real("x", value) == float(value)


@pytest.mark.parametrize(
    ("value", "error"),
    [(True, TypeError), ("1", TypeError), (None, TypeError), (torch.tensor(1.0), TypeError), (math.nan, ValueError),
     (math.inf, ValueError), (-math.inf, ValueError)],
)  # fmt: skip
def test_check_real_rejects(value, error):
    with pytest.raises(error, match="^lam "):
        check.check_real("lam", value)


def test_check_real_bounds():
    assert check.check_real("x", 0, minimum=0) == 0
    assert check.check_real("x", 1, maximum=1) == 1
    for kw, value in (({"minimum": 0}, -1e-9), ({"maximum": 1}, 1.5), ({"above": 0}, 0), ({"below": 1}, 1)):
        with pytest.raises(ValueError, match="^x must be"):
            check.check_real("x", value, **kw)


def test_check_int():
    assert check.check_int("n", np.int64(4), minimum=1) == 4
    for value in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match="^n must be an integer"):
            check.check_int("n", value)
    with pytest.raises(ValueError, match="^n must be >= 1, got 0"):
        check.check_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match="^n must be <= 3, got 4"):
        check.check_int("n", 4, maximum=3)


def test_check_probability():
    assert check.check_probability("p", 0) == 0.0 and check.check_probability("p", 1) == 1.0
    with pytest.raises(ValueError, match=r"^p must be in \(0, 1\]"):
        check.check_probability("p", 0, zero=False)
    with pytest.raises(ValueError, match=r"^p must be in \[0, 1\)"):
        check.check_probability("p", 1, one=False)
    with pytest.raises(ValueError, match="^p must be finite"):
        check.check_probability("p", math.nan)


def test_check_choice_backend_bool_optional():
    assert check.check_choice("mode", "online", ("online", "separate")) == "online"
    with pytest.raises(ValueError, match="^mode must be one of 'online', 'separate'; got 'x'"):
        check.check_choice("mode", "x", ("online", "separate"))
    with pytest.raises(ValueError, match="^mode must be one of"):
        check.check_choice("mode", 1, (True, 2))  # 1 == True, but not a bool
    assert check.check_backend("backend", "reference") == "reference"
    with pytest.raises(ValueError, match="^backend must be one of 'auto'"):
        check.check_backend("backend", "gpu")
    assert check.check_bool("flag", False) is False
    with pytest.raises(TypeError, match=r"^flag must be a bool \(True or False\)"):
        check.check_bool("flag", 0)
    assert check.optional(check.check_int, "n", None, minimum=1) is None
    with pytest.raises(ValueError, match="^n must be >= 1"):
        check.optional(check.check_int, "n", 0, minimum=1)
