"""Weight initialisation schemes of the seed framework (its ``createTensorWithScheme``).

A scheme is a name or a ``(name, factor)`` pair; ``factor`` chooses the fan ``f``:

    "in"  (default)  f = fan_in  = shape[1] * prod(kernel)
    "out"            f = fan_out = shape[0] * prod(kernel)
    "avg"            f = (fan_in + fan_out) / 2

For a transposed convolution weight ``(C_in, C_out/G, *k)`` the two fans swap
(``transposed=True``), so "in" still counts what one output position reads.

    None, "xavier_uniform"      U(-sqrt(3/f), +sqrt(3/f))      variance 1/f
    "xavier", "xavier_normal"   N(0, sqrt(1/f))                variance 1/f
    "he"                        N(0, sqrt(2/f))                variance 2/f
    "gaussian"                  N(0, wscale)                   (fan ignored)
    "uniform"                   U(-wscale, +wscale)            (fan ignored)
    "none"                      uninitialised memory (np.empty)

Random numbers come from NumPy's global state (``np.random.seed`` makes runs
reproducible) or from ``rng``: a ``np.random.Generator``, a ``RandomState`` or an
int seed.  They are drawn on the host in float64 and then cast, so a seed gives
the same weights on CPU and GPU.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["SCHEMES", "FACTORS", "parse_scheme", "fans", "create_tensor", "createTensorWithScheme"]

SCHEMES = ("xavier_uniform", "xavier", "xavier_normal", "he", "gaussian", "uniform", "none")
FACTORS = ("in", "out", "avg")


def parse_scheme(scheme):
    """Normalise ``scheme`` to ``(name, factor)``; ValueError/TypeError on anything else."""
    if scheme is None:
        return "xavier_uniform", "in"
    if isinstance(scheme, str):
        name, factor = scheme, "in"
    elif isinstance(scheme, (tuple, list)) and len(scheme) == 2 and all(isinstance(v, str) for v in scheme):
        name, factor = scheme
    else:
        raise TypeError(f"initscheme must be None, a name or a (name, factor) pair, got initscheme={scheme!r}")
    if name not in SCHEMES:
        raise ValueError(f"initscheme name must be one of {SCHEMES}, got initscheme={scheme!r}")
    if factor not in FACTORS:
        raise ValueError(f"initscheme factor must be one of {FACTORS}, got initscheme={scheme!r}")
    return name, factor


def fans(shape, transposed=False):
    """``(fan_in, fan_out)`` of a weight of ``shape`` = (out, in, *kernel) or, transposed, (in, out, *k)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"a weight shape needs at least 2 dims, got shape={shape}")
    k = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * k, shape[0] * k
    return (fan_out, fan_in) if transposed else (fan_in, fan_out)


def _rng(rng):
    if rng is None:
        return np.random              # the global state: np.random.seed applies
    if isinstance(rng, (np.random.Generator, np.random.RandomState)):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be None, an int seed, a numpy Generator or RandomState, got rng={rng!r}")


def create_tensor(shape, scheme=None, wscale=1.0, *, transposed=False, rng=None, dtype=np.float32):
    """A host (NumPy) array of ``shape`` filled by ``scheme`` (see the module doc)."""
    name, factor = parse_scheme(scheme)
    shape = tuple(int(s) for s in shape)
    if not isinstance(wscale, (int, float, np.floating, np.integer)) or isinstance(wscale, bool) \
            or not math.isfinite(wscale) or wscale < 0:
        raise ValueError(f"wscale must be a finite non-negative number, got wscale={wscale!r}")
    dtype = np.dtype(dtype)
    if name == "none":
        return np.empty(shape, dtype=dtype)
    gen = _rng(rng)
    if name == "gaussian":
        return gen.normal(0.0, float(wscale), size=shape).astype(dtype)
    if name == "uniform":
        return gen.uniform(-float(wscale), float(wscale), size=shape).astype(dtype)
    fan_in, fan_out = fans(shape, transposed)
    f = {"in": fan_in, "out": fan_out, "avg": (fan_in + fan_out) / 2}[factor]
    if f <= 0:
        raise ValueError(f"initscheme {name!r} needs a positive fan, got shape={shape} (fan {f})")
    if name == "xavier_uniform":
        a = math.sqrt(3.0 / f)
        return gen.uniform(-a, a, size=shape).astype(dtype)
    if name in ("xavier", "xavier_normal"):
        return gen.normal(0.0, math.sqrt(1.0 / f), size=shape).astype(dtype)
    return gen.normal(0.0, math.sqrt(2.0 / f), size=shape).astype(dtype)    # "he"


def createTensorWithScheme(scheme, shape, wscale=1.0, *, transposed=False, rng=None, dtype=np.float32):
    """The seed framework's spelling of :func:`create_tensor` (scheme first)."""
    return create_tensor(shape, scheme, wscale, transposed=transposed, rng=rng, dtype=dtype)
