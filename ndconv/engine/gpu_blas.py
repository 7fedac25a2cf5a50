"""Batched GEMM straight through cuBLAS (strided-batched), for the GPU engine's GEMM paths.

``cupy.matmul`` spends about 50 us of host time per call on an H200 machine (shape
checks, broadcasting, contiguity copies); one ``cublas<t>gemmStridedBatched`` call
through CuPy's binding spends about 13 us and runs the same GEMM a little faster,
because a broadcast operand is passed with batch stride 0 instead of being copied.
Convolutions call GEMMs on every step, so that host time is part of every layer.

float32 GEMMs run in one of two ways (``fp32_math``):

``"ieee"``
    plain SGEMM on the CUDA cores.
``"tf32x3"``
    on the tensor cores at float32 accuracy ("3xTF32"): every operand is split into
    ``hi = tf32(a)`` and ``lo = tf32(a - hi)`` (TF32 keeps float32's exponent and 10
    of its 23 fraction bits; both parts are rounded to nearest, so ``hi + lo``
    carries 22 bits of ``a``), and ``a @ b = hi_a @ lo_b + lo_a @ hi_b + hi_a @ hi_b``
    in three TF32 GEMMs, the small terms first, all accumulated in float32.  The
    products of TF32 values are exact in float32; what is dropped is ``lo_a @ lo_b``
    and the last rounding of each ``lo``, both below 2^-21 of each product, against
    2^-24 for a float32 product and a far larger error from summing ``K`` of them.
    This is not TF32 arithmetic (which keeps 10 bits and errs by ~1e-3): the tests
    hold it to the float32 tolerances.  On an H200 it runs about 3x the SGEMM rate
    on large GEMMs.  Devices before compute capability 8.0 have no TF32 and use SGEMM.
"""
from __future__ import annotations

from collections import namedtuple

import cupy as cp
import numpy as np

FP32_MATH = ("tf32x3", "ieee")
_OP_N, _OP_T = 0, 1
_INT_MAX = 2 ** 31 - 1
_CUDA_R_32F = 0
_COMPUTE_32F_FAST_TF32 = 77     # cublasComputeType_t
_GEMM_DEFAULT = -1              # cublasGemmAlgo_t
_ONE = {np.dtype(np.float32): np.array(1, np.float32), np.dtype(np.float64): np.array(1, np.float64)}
_ZERO = {np.dtype(np.float32): np.array(0, np.float32), np.dtype(np.float64): np.array(0, np.float64)}
_GEMM_NAMES = {np.dtype(np.float32): "sgemmStridedBatched", np.dtype(np.float64): "dgemmStridedBatched"}
_cublas = None
_tf32_devices = {}
_split_kernel = None

#: A float32 operand split into its two TF32 parts (arrays of one shape).
Split = namedtuple("Split", "hi lo")


def _lib():
    """CuPy's cuBLAS binding, imported at first use: importing it loads libcublas, which
    a machine with CuPy but no CUDA libraries (CI) does not have."""
    global _cublas
    if _cublas is None:
        from cupy.cuda import cublas
        _cublas = cublas
    return _cublas


def check_fp32_math(value, name="fp32_math"):
    if value not in FP32_MATH:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, FP32_MATH))}, got {name}={value!r}")
    return value


def has_tf32():
    """True when the current device has TF32 tensor cores (compute capability 8.0 or later)."""
    dev = cp.cuda.runtime.getDevice()
    found = _tf32_devices.get(dev)
    if found is None:
        found = _tf32_devices[dev] = cp.cuda.Device(dev).compute_capability >= "80"
    return found


def uses_tf32x3(dtype, fp32_math):
    """Whether a GEMM of this dtype under this setting runs as three TF32 GEMMs."""
    return fp32_math == "tf32x3" and np.dtype(dtype) == np.float32 and has_tf32()


# The bit operations below are those of tf32_split_reference in the tests: round to
# nearest (ties away from zero) at fraction bit 13; infinities and NaN keep lo = 0.
_SPLIT_SOURCE = r"""
    if (!isfinite(a)) { hi = a; lo = 0.0f; }
    else {
        unsigned int u = __float_as_uint(a);
        float h = __uint_as_float((u + 0x1000u) & 0xffffe000u);
        if (!isfinite(h)) h = __uint_as_float(u & 0xffffe000u);   // rounding up overflowed
        float r = a - h;                                             // exact
        hi = h;
        lo = __uint_as_float((__float_as_uint(r) + 0x1000u) & 0xffffe000u);
    }
"""


def split(a, out=None):
    """``a`` (float32, any strides) as a :class:`Split` of two TF32-exact float32 arrays.

    ``out``: a Split of two arrays of ``a``'s shape to write into (views allowed).
    """
    global _split_kernel
    if _split_kernel is None:
        _split_kernel = cp.ElementwiseKernel("float32 a", "float32 hi, float32 lo", _SPLIT_SOURCE,
                                             "ndconv_tf32_split")
    if out is None:
        out = Split(cp.empty(a.shape, np.float32), cp.empty(a.shape, np.float32))
    _split_kernel(a, out.hi, out.lo)
    return out


def presplit(a, fp32_math):
    """``a`` split once, for an operand that several tf32x3 GEMMs share; else ``a`` itself."""
    return split(a) if uses_tf32x3(a.dtype, fp32_math) else a


def _operand(a):
    """(op, leading dim, batch stride in elements, array) of a 3-D operand whose matrices
    are row-major (op N) or stored transposed (op T), with any leading dimension and
    batch stride (0: one matrix for the whole batch); other layouts are copied first."""
    item = a.itemsize
    rows, cols = a.shape[1:]
    s0, s1, s2 = a.strides
    if s0 % item == 0 and s1 % item == 0 and s2 % item == 0 and min(s0, s1, s2) >= 0:
        if s2 == item and (rows == 1 or s1 >= cols * item):
            return _OP_N, max(cols, s1 // item), (0 if a.shape[0] == 1 else s0 // item), a
        if s1 == item and (cols == 1 or s2 >= rows * item):
            return _OP_T, max(rows, s2 // item), (0 if a.shape[0] == 1 else s0 // item), a
    # Copy into a fresh C-ordered buffer.  (Not ascontiguousarray: it returns arrays whose
    # size-1 axes have odd strides unchanged, and those strides are what failed above.)
    fresh = cp.empty(a.shape, dtype=a.dtype)
    fresh[...] = a
    return _OP_N, max(1, cols), (0 if a.shape[0] == 1 else rows * cols), fresh


def _gemm(a, b, out, accumulate, tf32):
    """out (+)= a @ b in one cuBLAS call; shapes and strides already checked by matmul."""
    batch, m, n = out.shape
    k = a.shape[2]
    item = a.itemsize
    op_a, lda, sa, a = _operand(a)
    op_b, ldb, sb, b = _operand(b)
    ldc = max(n, out.strides[1] // item)
    sc = out.strides[0] // item
    cublas = _lib()
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
    beta = (_ONE if accumulate else _ZERO)[a.dtype].ctypes.data
    # Row-major C = A B is column-major C^T = B^T A^T: cuBLAS gets (b, a) swapped.
    if tf32:
        cublas.gemmStridedBatchedEx(handle, op_b, op_a, n, m, k, _ONE[a.dtype].ctypes.data,
                                    b.data.ptr, _CUDA_R_32F, ldb, sb, a.data.ptr, _CUDA_R_32F, lda, sa,
                                    beta, out.data.ptr, _CUDA_R_32F, ldc, sc, batch,
                                    _COMPUTE_32F_FAST_TF32, _GEMM_DEFAULT)
    else:
        gemm = getattr(cublas, _GEMM_NAMES[a.dtype])
        gemm(handle, op_b, op_a, n, m, k, _ONE[a.dtype].ctypes.data, b.data.ptr, ldb, sb,
             a.data.ptr, lda, sa, beta, out.data.ptr, ldc, sc, batch)


def matmul(a, b, out=None, accumulate=False, fp32_math="ieee"):
    """``a @ b`` for 3-D arrays ``(B or 1, M, K) @ (B or 1, K, N)`` -> ``(B, M, N)``.

    float32/float64 go to cuBLAS in strided-batched calls (a batch of 1 is broadcast
    with stride 0); other dtypes and sizes past cuBLAS's int limits fall back to
    ``cupy.matmul``.  ``out`` (optional) is a (B, M, N) view with unit column stride;
    ``accumulate`` adds the product to it (beta = 1).  float32 follows ``fp32_math``
    (see the module notes); either operand may be a :class:`Split` from
    :func:`presplit`, whose parts must have the shape and strides the operand would.
    cuBLAS results are bitwise reproducible run to run, so both stay deterministic.
    """
    parts_a, parts_b = isinstance(a, Split), isinstance(b, Split)
    first_a, first_b = (a.hi if parts_a else a), (b.hi if parts_b else b)
    batch = max(first_a.shape[0], first_b.shape[0])
    m, k = first_a.shape[1:]
    n = first_b.shape[2]
    dtype = first_a.dtype
    item = first_a.itemsize
    if parts_a or parts_b:
        fp32_math = "tf32x3"
    direct = (dtype in _GEMM_NAMES and first_b.dtype == dtype and first_b.shape[1] == k
              and first_a.shape[0] in (1, batch) and first_b.shape[0] in (1, batch)
              and max(m, n, k, batch) <= _INT_MAX and 0 not in (m, n, k, batch))
    if out is not None:
        direct = (direct and out.dtype == dtype and out.shape == (batch, m, n) and out.strides[2] == item
                  and out.strides[1] % item == 0 and out.strides[0] % item == 0
                  and (m == 1 or out.strides[1] >= n * item))
    tf32 = direct and uses_tf32x3(dtype, fp32_math)
    if not direct:
        res = cp.matmul(a.hi + a.lo if parts_a else a, b.hi + b.lo if parts_b else b)
        if out is None:
            return res
        if accumulate:
            out += res
        else:
            out[...] = res
        return out
    if out is None:
        out = cp.empty((batch, m, n), dtype=dtype)
    if not tf32:
        _gemm(a, b, out, accumulate, False)
        return out
    a = a if parts_a else split(a)
    b = b if parts_b else split(b)
    # The two small cross terms first, then the large one: each adds into float32.
    _gemm(a.hi, b.lo, out, accumulate, True)
    _gemm(a.lo, b.hi, out, True, True)
    _gemm(a.hi, b.hi, out, True, True)
    return out


def view(operand, fn):
    """``fn`` applied to an array, or to both parts of a :class:`Split`."""
    return Split(fn(operand.hi), fn(operand.lo)) if isinstance(operand, Split) else fn(operand)


def parts(operand):
    """The arrays a :class:`Split` holds (none for a plain array), for memory accounting."""
    return tuple(operand) if isinstance(operand, Split) else ()
