"""A GEMM that takes strided operands and accumulates: NumPy's own BLAS, called directly.

``np.matmul`` cannot add into its output (``C += A @ B``) and copies operands whose
rows are not packed.  The ``taps`` algorithm needs both: one GEMM per kernel tap
over a shifted view of a flat padded input (a row pitch longer than the row),
summed into one output block.  NumPy's wheels ship OpenBLAS with a CBLAS
interface; threadpoolctl says which library NumPy loaded, and ctypes calls its
``cblas_?gemm`` in that same library, so the thread limits set for NumPy hold.
When it cannot be found (another BLAS, no threadpoolctl), ``AVAILABLE`` is False
and the engine's other algorithms run instead.
"""
from __future__ import annotations

import ctypes

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

# (symbol suffix, integer type): ILP64 builds (NumPy >= 2 wheels) name theirs with "64_".
_NAMES = (("scipy_cblas_{}gemm64_", ctypes.c_int64), ("cblas_{}gemm64_", ctypes.c_int64),
          ("scipy_cblas_{}gemm", ctypes.c_int), ("cblas_{}gemm", ctypes.c_int))


def _load():
    try:
        from threadpoolctl import threadpool_info
        libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    except Exception:       # threadpoolctl missing or unable to inspect the process
        return {}
    np.ones((2, 2)) @ np.ones((2, 2))      # make sure NumPy's BLAS is loaded
    for info in libs:
        try:
            lib = ctypes.CDLL(info["filepath"])
        except OSError:
            continue
        found = {}
        for pattern, int_t in _NAMES:
            for char, real in (("s", ctypes.c_float), ("d", ctypes.c_double)):
                fn = getattr(lib, pattern.format(char), None)
                if fn is None or char in found:
                    continue
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, int_t, int_t, int_t, real,
                               ctypes.c_void_p, int_t, ctypes.c_void_p, int_t, real, ctypes.c_void_p, int_t]
                fn.restype = None
                found[char] = fn
        if len(found) == 2:
            return {np.dtype(np.float32): found["s"], np.dtype(np.float64): found["d"]}
    return {}


_GEMM = _load()
AVAILABLE = bool(_GEMM)


def gemm(a, a_offset, a_shape, lda, b, b_offset, b_shape, ldb, c, c_offset, ldc, beta,
         trans_b=False):
    """``C = A @ op(B) + beta * C`` on row-major strided blocks of three arrays.

    ``a_shape`` (M, K) and ``b_shape`` ((K, N), or (N, K) with ``trans_b``) are the
    blocks' sizes; ``*_offset`` the element index of a block's first element and
    ``ld*`` its row pitch in elements, inside the C-contiguous arrays ``a``, ``b``,
    ``c`` (all one dtype, float32 or float64).  Every element a block touches is
    checked to lie inside its array before BLAS sees a pointer.
    """
    m, k = a_shape
    n = b_shape[0] if trans_b else b_shape[1]
    if (b_shape[1] if trans_b else b_shape[0]) != k:
        raise ValueError(f"gemm: inner sizes differ, A {a_shape}, B {b_shape}, trans_b={trans_b}")
    fn = _GEMM[a.dtype]
    for arr, off, rows, cols, ld in ((a, a_offset, m, k, lda), (b, b_offset, *b_shape, ldb),
                                     (c, c_offset, m, n, ldc)):
        if arr.dtype != a.dtype or not arr.flags.c_contiguous:
            raise ValueError("gemm: operands must be C-contiguous arrays of one dtype")
        if rows and cols and (off < 0 or cols > ld or off + (rows - 1) * ld + cols > arr.size):
            raise ValueError(f"gemm: a block of {rows}x{cols} at {off} with pitch {ld} "
                             f"leaves an array of {arr.size} elements")
    if m == 0 or n == 0:
        return
    item = a.itemsize
    fn(_ROW_MAJOR, _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k, 1.0,
       a.ctypes.data + a_offset * item, lda, b.ctypes.data + b_offset * item, ldb,
       beta, c.ctypes.data + c_offset * item, ldc)
