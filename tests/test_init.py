"""Init schemes: documented mean/variance (fixed seeds), fans, reproducibility, errors."""
import math

import numpy as np
import pytest

from ndconv import gpuarray
from ndconv.init import create_tensor, createTensorWithScheme, fans, parse_scheme
from ndconv.modules import Conv2D, Conv3D, Deconv2D

SHAPE = (64, 32, 3, 3)                 # fan_in = 288, fan_out = 576, 18432 samples


def _stats(a):
    a = a.astype(np.float64)
    return a.mean(), a.var()


def _check(a, var, n_sigma=5):
    mean, v = _stats(a)
    n = a.size
    # Standard errors of the sample mean and variance (normal: var*sqrt(2/n); uniform is tighter).
    assert abs(mean) < n_sigma * math.sqrt(var / n), (mean, var)
    assert abs(v - var) < n_sigma * var * math.sqrt(2.0 / n), (v, var)


def test_fans():
    assert fans(SHAPE) == (288, 576)
    assert fans(SHAPE, transposed=True) == (576, 288)
    assert fans((5, 7)) == (7, 5)


@pytest.mark.parametrize("scheme,var_of_f", [
    (None, lambda f: 1.0 / f),                          # xavier_uniform: U(±sqrt(3/f)) has variance 1/f
    ("xavier_uniform", lambda f: 1.0 / f),
    ("xavier", lambda f: 1.0 / f),
    ("xavier_normal", lambda f: 1.0 / f),
    ("he", lambda f: 2.0 / f),
])
@pytest.mark.parametrize("factor,f", [("in", 288), ("out", 576), ("avg", 432)])
def test_fan_schemes(scheme, var_of_f, factor, f):
    np.random.seed(123)
    spec = scheme if factor == "in" and scheme is not None else (scheme or "xavier_uniform", factor)
    a = create_tensor(SHAPE, spec)
    assert a.dtype == np.float32 and a.shape == SHAPE
    _check(a, var_of_f(f))
    if (scheme or "xavier_uniform") == "xavier_uniform":
        bound = math.sqrt(3.0 / f)
        assert a.min() >= -bound and a.max() <= bound and a.max() > 0.98 * bound


def test_gaussian_and_uniform_use_wscale():
    rng = np.random.default_rng(7)
    _check(create_tensor(SHAPE, "gaussian", 0.5, rng=rng), 0.25)
    _check(create_tensor(SHAPE, "gaussian", rng=rng), 1.0)
    u = create_tensor(SHAPE, "uniform", 2.0, rng=rng)
    _check(u, 4.0 / 3.0)                                  # U(-a, a): a^2 / 3
    assert u.min() >= -2.0 and u.max() <= 2.0


def test_transposed_weights_swap_fans():
    # Deconv weight (in=32, out=64, 3, 3): fan "in" is shape[0]*9 = 288, "out" shape[1]*9 = 576.
    np.random.seed(1)
    d = gpuarray.to_host(Deconv2D(32, 64, 3, initscheme="he").W)
    assert d.shape == (32, 64, 3, 3)
    _check(d, 2.0 / 288)
    d = gpuarray.to_host(Deconv2D(32, 64, 3, initscheme=("he", "out")).W)
    _check(d, 2.0 / 576)
    c = gpuarray.to_host(Conv2D(32, 64, 3, initscheme=("he", "out")).W)    # (64, 32, 3, 3)
    _check(c, 2.0 / 576)
    c = gpuarray.to_host(Conv2D(32, 64, 3, initscheme="he").W)
    _check(c, 2.0 / 288)


def test_reproducible_from_global_state_and_generators():
    np.random.seed(42)
    a = gpuarray.to_host(Conv3D(4, 4, 3).W)
    np.random.seed(42)
    b = gpuarray.to_host(Conv3D(4, 4, 3).W)
    np.testing.assert_array_equal(a, b)
    c = gpuarray.to_host(Conv3D(4, 4, 3, rng=np.random.default_rng(9)).W)
    d = gpuarray.to_host(Conv3D(4, 4, 3, rng=np.random.default_rng(9)).W)
    e = gpuarray.to_host(Conv3D(4, 4, 3, rng=9).W)
    np.testing.assert_array_equal(c, d)
    np.testing.assert_array_equal(c, e)
    f = gpuarray.to_host(Conv3D(4, 4, 3, rng=np.random.RandomState(9)).W)
    assert not np.array_equal(c, f)
    # A passed generator leaves the global state alone.
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    Conv2D(3, 3, 3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_none_scheme_allocates_without_drawing():
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    w = create_tensor((3, 2, 2), "none")
    assert w.shape == (3, 2, 2)
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    assert Conv2D(2, 2, 2, initscheme="none").W.shape == (2, 2, 2, 2)


def test_seed_spelling_and_dtype():
    a = createTensorWithScheme(("xavier", "avg"), (4, 4, 2), rng=1, dtype=np.float64)
    b = create_tensor((4, 4, 2), ("xavier", "avg"), rng=1, dtype=np.float64)
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scheme,exc", [
    ("kaiming", ValueError), (("he", "both"), ValueError), (("he",), TypeError), (3, TypeError),
])
def test_bad_schemes(scheme, exc):
    with pytest.raises(exc, match="initscheme"):
        parse_scheme(scheme)


def test_bad_rng_and_wscale():
    with pytest.raises(TypeError, match="rng must be"):
        create_tensor((2, 2), rng="seed")
    with pytest.raises(ValueError, match="wscale"):
        create_tensor((2, 2), "gaussian", float("nan"))
