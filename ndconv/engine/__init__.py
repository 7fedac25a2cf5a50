"""Engines: one per array library, each with the same three primitives.

``forward(x, w, g)``          y  = conv(x, w)              (N, Cy, *y_size)
``backward_input(gy, w, g)``  gx = conv^T(gy, w)           (N, Cx, *x_size)
``backward_weight(x, gy, g)`` gw = d<y, gy>/dw             (Cy, Cx/G, *kernel)

``g`` is a :class:`ndconv.geometry.ConvGeometry` with zero padding mode; arrays
arrive channels-first and batched, of one float dtype, with any strides; results
are new arrays of that dtype (float16 accumulates in float32).
"""
import numpy as np

_engines = {}
_cupy_types = {}     # type -> whether it is CuPy's (asked on every call)


def _is_cupy(a):
    t = type(a)
    found = _cupy_types.get(t)
    if found is None:
        found = _cupy_types[t] = t.__module__.split(".")[0] == "cupy"
    return found


def array_module(a):
    if _is_cupy(a):
        import cupy
        return cupy
    return np


def get_engine(*arrays):
    """The engine for these arrays: NumPy -> CPU, CuPy -> GPU; mixing them is an error."""
    kind = None
    for a in arrays:
        if a is None:
            continue
        k = "cupy" if _is_cupy(a) else "numpy"
        if kind is None:
            kind = k
        elif k != kind:
            names = ", ".join(f"{type(a).__module__}.{type(a).__name__}" for a in arrays if a is not None)
            raise TypeError(f"all arrays must live on one device (all NumPy or all CuPy), got {names}")
    kind = kind or "numpy"
    engine = _engines.get(kind)
    if engine is None:
        if kind == "cupy":
            from .gpu import GPUEngine
            engine = _engines[kind] = GPUEngine()
        else:
            from .cpu import CPUEngine
            engine = _engines[kind] = CPUEngine()
    return engine


def cpu_engine():
    return get_engine(np.empty(0))
