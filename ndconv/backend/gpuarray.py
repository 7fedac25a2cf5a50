"""Device arrays in the seed framework's ``gpuarray`` style.

``to_gpu`` puts an array on the GPU (a CuPy array) when CuPy imports *and* a CUDA
device answers; otherwise it returns a NumPy copy, so the seed examples
(``gpuarray.to_gpu(np.arange(...))``) run unchanged on a CPU-only machine.
Setting the environment variable ``NDCONV_DEVICE=cpu`` forces the host path even
when a GPU is present (useful to compare the two engines).
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["gpu_available", "to_gpu", "to_host", "empty", "zeros", "zeros_like", "empty_like",
           "is_device_array", "array_module"]

_state = {"checked": False, "cupy": None}


def _cupy():
    """The cupy module when a usable device is present, else None (probed once)."""
    if not _state["checked"]:
        _state["checked"] = True
        if os.environ.get("NDCONV_DEVICE", "").lower() != "cpu":
            try:
                import cupy
                if cupy.cuda.runtime.getDeviceCount() > 0:
                    _state["cupy"] = cupy
            except Exception:   # no CuPy, no driver, no device: all mean "host only"
                _state["cupy"] = None
    return _state["cupy"]


def gpu_available():
    """True when arrays made here live on a CUDA device."""
    return _cupy() is not None


def is_device_array(a):
    return type(a).__module__.split(".")[0] == "cupy"


def array_module(a):
    """``cupy`` for CuPy arrays, ``numpy`` for everything else."""
    if is_device_array(a):
        import cupy
        return cupy
    return np


def to_gpu(ary, dtype=None):
    """A new device array holding ``ary`` (a NumPy copy when there is no GPU)."""
    cp = _cupy()
    if cp is not None:
        return cp.array(ary, dtype=dtype, copy=True)
    if is_device_array(ary):
        ary = ary.get()
    return np.array(ary, dtype=dtype, copy=True)


def to_host(ary):
    """A NumPy array with the values of ``ary`` (no copy when it already is one)."""
    if is_device_array(ary):
        return ary.get()
    return np.asarray(ary)


def _xp():
    cp = _cupy()
    return np if cp is None else cp


def empty(shape, dtype=np.float32):
    """Uninitialised array on the default device."""
    return _xp().empty(shape, dtype=dtype)


def zeros(shape, dtype=np.float32):
    """Zero-filled array on the default device."""
    return _xp().zeros(shape, dtype=dtype)


def zeros_like(a):
    """Zeros with the shape, dtype and device of ``a``."""
    return array_module(a).zeros(a.shape, dtype=a.dtype)


def empty_like(a):
    return array_module(a).empty(a.shape, dtype=a.dtype)
