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
    The tensor cores' own additions are less careful than the CUDA cores' FMA,
    though: measured on an H200 (``tests/test_gpu.py``, random normal operands) the
    result errs by 9.6e-6 of its norm at K = 4096 where SGEMM errs by 1.2e-6 and one
    TF32 GEMM by 2.9e-4 (2.4e-6 against 5.8e-7 at K = 1024), and the gap grows with
    K.  So the tf32x3 algorithms take only calls whose GEMMs sum at most
    ``TF32X3_MAX_K`` products (forward and input gradient of most layers; a weight
    gradient, whose sums run over the whole batch, in pieces of that length).  On an H200 they run large GEMMs at about 3x the SGEMM rate.  Devices
    before compute capability 8.0 have no TF32 and use SGEMM.
"""
from __future__ import annotations

import math
from collections import namedtuple

import cupy as cp
import numpy as np

from . import gpu_kernels

FP32_MATH = ("tf32x3", "ieee")
#: the longest sum (products per result) a tf32x3 algorithm takes
TF32X3_MAX_K = 4096
_OP_N, _OP_T = 0, 1
_INT_MAX = 2 ** 31 - 1
_CUDA_R_32F = 0
_COMPUTE_32F_FAST_TF32 = 77     # cublasComputeType_t
_GEMM_DEFAULT = -1              # cublasGemmAlgo_t
_ONE = {np.dtype(np.float32): np.array(1, np.float32), np.dtype(np.float64): np.array(1, np.float64)}
_ZERO = {np.dtype(np.float32): np.array(0, np.float32), np.dtype(np.float64): np.array(0, np.float64)}
# host addresses of alpha and beta (the arrays above live as long as the module)
_ONE_PTR = {t: a.ctypes.data for t, a in _ONE.items()}
_ZERO_PTR = {t: a.ctypes.data for t, a in _ZERO.items()}
_GEMM_NAMES = {np.dtype(np.float32): "sgemmStridedBatched", np.dtype(np.float64): "dgemmStridedBatched"}
_cublas = None
_tf32_devices = {}

#: A float32 operand split into its two TF32 parts (arrays of one shape, any layout):
#: its products take three GEMMs.
Split = namedtuple("Split", "hi lo")
#: A float32 operand's TF32 parts stacked along K, so that the products take one GEMM
#: (``blocks`` 3) or two (2, sharing the first 2K): a left operand as ``[lo | hi | hi]``
#: (B, M, blocks*K), a right one as ``[hi ; lo ; hi]`` (B, blocks*K, N), so that
#: ``[lo|hi] @ [hi;lo]`` is the two cross terms and ``hi @ hi`` reads the middle of
#: one and the start of the other.
Stacked = namedtuple("Stacked", "data blocks")


def _lib():
    """CuPy's cuBLAS binding, imported at first use: importing it loads libcublas, which
    a machine with CuPy but no CUDA libraries (CI) does not have."""
    global _cublas
    if _cublas is None:
        from cupy.cuda import cublas
        _cublas = cublas
    return _cublas


class Fp32Twin:
    """For a GEMM algorithm registered twice: ``Cls()`` runs SGEMM, ``Cls("tf32x3")``
    (named ``tf32x3_name``) runs tf32x3 and takes only what ``gemm_k`` allows."""

    tf32x3_name = "?"

    def __init__(self, fp32_math="ieee"):
        self.fp32_math = check_fp32_math(fp32_math)
        if fp32_math == "tf32x3":
            self.name = self.tf32x3_name

    def gemm_k(self, op, g):  # pragma: no cover - interface
        """The products each of the algorithm's GEMM results sums."""
        raise NotImplementedError

    def tf32x3_refuses(self, op, g, dtype):
        return self.fp32_math == "tf32x3" and not tf32x3_takes(dtype, self.gemm_k(op, g))


def check_fp32_math(value, name="fp32_math"):
    if value not in FP32_MATH:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, FP32_MATH))}, got {name}={value!r}")
    return value


def has_tf32():
    """True when the current device has TF32 tensor cores (compute capability 8.0 or later)."""
    try:
        dev = cp.cuda.runtime.getDevice()
    except Exception:       # no driver or no device: nothing runs here anyway
        return False
    found = _tf32_devices.get(dev)
    if found is None:
        found = _tf32_devices[dev] = int(cp.cuda.Device(dev).compute_capability) >= 80
    return found


def tf32x3_takes(dtype, k):
    """Whether a tf32x3 GEMM may run: float32 on a TF32 device, at most TF32X3_MAX_K
    products per result (the GEMM's own K: sums across GEMMs add in float32)."""
    return uses_tf32x3(dtype, "tf32x3") and k <= TF32X3_MAX_K


def conv_sum_length(op, g):
    """Products summed into one result of a one-group convolution computed directly (no
    col2im): input channels x taps (forward), output channels x the most taps one
    stride phase of the input gradient reaches (taps t with d*t = r mod s)."""
    if op == "forward":
        return g.x_channels * g.taps
    return g.y_channels * math.prod(-(-k * math.gcd(d, s) // s) for k, s, d in zip(g.kernel, g.stride, g.dilation))


def uses_tf32x3(dtype, fp32_math):
    """Whether a GEMM of this dtype under this setting runs as three TF32 GEMMs."""
    return fp32_math == "tf32x3" and np.dtype(dtype) == np.float32 and has_tf32()


_split_kernels = {}


def _splitter(copies):
    """An elementwise kernel writing (hi, lo) or (hi, lo, hi again) of a float32 array."""
    fn = _split_kernels.get(copies)
    if fn is None:
        outs = "float32 hi, float32 lo" + (", float32 hi2" if copies == 3 else "")
        body = "tf32_split(a, hi, lo);" + (" hi2 = hi;" if copies == 3 else "")
        fn = _split_kernels[copies] = cp.ElementwiseKernel("float32 a", outs, body, f"ndconv_tf32_split{copies}",
                                                           preamble=gpu_kernels.TF32_SPLIT)
    return fn


_stack_functions = {}
_stack_plans = {}
_F32 = np.dtype(np.float32)


def _c_strides(shape):
    """C-order strides of ``shape``, in elements."""
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _stack_plan(shape, src_strides, dst_strides, h2):
    """The launch of the ``tf32_stack`` kernel for a source of ``shape`` and byte strides
    ``src_strides`` written with element strides ``dst_strides`` (see gpu_kernels), or
    None where more than 4 dims remain once size-1 dims are dropped and adjacent dims
    that both layouts keep contiguous are merged.  Worked out once per layout."""
    dev = cp.cuda.runtime.getDevice()
    key = (dev, shape, src_strides, dst_strides, h2)
    found = _stack_plans.get(key, False)
    if found is not False:
        return found
    dims = []
    ok = all(st % 4 == 0 for st in src_strides)
    for n, st, d in zip(shape, src_strides, dst_strides):
        if n == 1 or not ok:
            continue
        st //= 4
        if dims and dims[-1][1] == n * st and dims[-1][2] == n * d:
            dims[-1] = (dims[-1][0] * n, st, d)
        else:
            dims.append((n, st, d))
    if not ok or len(dims) > 4:
        found = None
    else:
        dims = [(1, 0, 0)] * (4 - len(dims)) + dims
        (n0, s0, d0), (n1, s1, d1), (n2, s2, d2), (n3, s3, d3) = dims
        params = cp.asarray(np.array([n1, n2, n3, s0, s1, s2, s3, d0, d1, d2, d3, h2], np.int64))
        rows = n0 * n1 * n2
        # float4 rows where every row start is a multiple of 4 elements (the addresses
        # are checked per call); each thread then takes 4 values
        vec = (s3 == 1 and d3 == 1 and n3 % 4 == 0 and (h2 < 0 or h2 % 4 == 0)
               and all(v % 4 == 0 for v in (s0, s1, s2, d0, d1, d2) if v))
        lanes = n3 // 4 if vec else n3
        threads = 256 if lanes >= 256 else 32 * -(-lanes // 32)
        grid_y = min(rows, 65535)
        grid_x = max(1, min(-(-lanes // threads), (1 << 20) // grid_y))
        found = ((grid_x, grid_y), (threads,), params, np.int64(rows), vec)
    if len(_stack_plans) > 1024:
        _stack_plans.clear()
    _stack_plans[key] = found
    return found


def _stack(a, hi, lo, dst_strides, h2=-1):
    """Write the TF32 parts of ``a`` (float32, any strides) through the raw kernel: hi and
    lo at device addresses ``hi``/``lo`` with element strides ``dst_strides``, hi again
    ``h2`` elements past hi when h2 >= 0.  False (nothing written) where it does not apply."""
    if a.dtype != _F32:
        return False
    if not a.size:
        return True
    plan = _stack_plan(a.shape, a.strides, dst_strides, h2)
    if plan is None:
        return False
    grid, block, params, rows, vec = plan
    vec = vec and not (a.data.ptr | hi | lo) % 16     # else the scalar loop (grid-stride)
    dev = cp.cuda.runtime.getDevice()
    fn = _stack_functions.get(dev)
    if fn is None:
        fn = _stack_functions[dev] = cp.RawModule(code=gpu_kernels.STACK_SOURCE).get_function("tf32_stack")
    fn(grid, block, (a, np.uint64(hi), np.uint64(lo), params, rows, np.int32(vec)))
    return True


def split(a, out=None):
    """``a`` (float32, any strides) as a :class:`Split` of two TF32-exact float32 arrays.

    ``out``: a Split of two arrays of ``a``'s shape to write into (views allowed).
    """
    if out is None:
        out = Split(cp.empty(a.shape, np.float32), cp.empty(a.shape, np.float32))
        dst = _c_strides(a.shape)
    else:
        dst = None
        if out.hi.strides == out.lo.strides and all(st % 4 == 0 for st in out.hi.strides):
            dst = tuple(st // 4 for st in out.hi.strides)
    if dst is None or not _stack(a, out.hi.data.ptr, out.lo.data.ptr, dst):
        _splitter(2)(a, out.hi, out.lo)
    return out


def stack_a(a, blocks):
    """A left operand (B, M, K) as :class:`Stacked` ``(B, M, blocks*K)``: ``[lo | hi | hi]``."""
    b, m, k = a.shape
    data = cp.empty((b, m, blocks * k), np.float32)
    ptr = data.data.ptr
    if not _stack(a, ptr + 4 * k, ptr, (m * blocks * k, blocks * k, 1), k if blocks == 3 else -1):
        parts = (data[:, :, k:2 * k], data[:, :, :k]) + ((data[:, :, 2 * k:],) if blocks == 3 else ())
        _splitter(blocks)(a, *parts)
    return Stacked(data, blocks)


def stack_b(b, blocks):
    """A right operand (B, K, N) as :class:`Stacked` ``(B, blocks*K, N)``: ``[hi ; lo ; hi]``.
    ``b`` may also be (B, K, n1, n2, ...) with N = n1*n2*... (any strides)."""
    shape = b.shape
    k = shape[1]
    n = math.prod(shape[2:])
    data = cp.empty((shape[0], blocks * k, n), np.float32)
    ptr = data.data.ptr
    dst = (blocks * k * n, n) + _c_strides(shape[2:])
    if not _stack(b, ptr, ptr + 4 * k * n, dst, 2 * k * n if blocks == 3 else -1):
        parts = data.reshape((shape[0], blocks) + shape[1:])
        _splitter(blocks)(b, *(parts[:, i] for i in range(blocks)))
    return Stacked(data, blocks)


def stack_parts(a, axis, order):
    """``a`` (float32, C-ordered) with its TF32 parts as three blocks along ``axis``, in
    ``order`` (``"hlh"`` or ``"hhl"``: hi, lo, hi or hi, hi, lo): shape ``a.shape`` with
    ``axis`` three times as long.  A sum over that axis then carries two cross terms and
    ``hi * hi`` once the other operand is stacked in the matching order."""
    outer = math.prod(a.shape[:axis])
    inner = a.size // max(outer, 1)
    shape = a.shape[:axis] + (3 * a.shape[axis],) + a.shape[axis + 1:]
    data = cp.empty(shape, np.float32)
    h1, h2, lo = (0, 2, 1) if order == "hlh" else (0, 1, 2)
    flat = a.reshape(outer, inner)                                   # (outer, axis * inner)
    ptr = data.data.ptr
    # two dims, float32: always within the stack kernel's reach
    _stack(flat, ptr + 4 * inner * h1, ptr + 4 * inner * lo, (3 * inner, 1), inner * (h2 - h1))
    return data


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
    k = a.shape[2]
    op_a, lda, sa, a = _operand(a)
    op_b, ldb, sb, b = _operand(b)
    _gemm_ptr(out, k, a.dtype, (op_a, lda, sa, a.data.ptr), (op_b, ldb, sb, b.data.ptr), accumulate, tf32)


def _gemm_ptr(out, k, dtype, da, db, accumulate, tf32):
    """out (+)= A @ B in one cuBLAS call, A and B given as (op, leading dim, batch stride,
    device address), as :func:`_operand` describes them."""
    batch, m, n = out.shape
    item = dtype.itemsize
    so0, so1 = out.strides[:2]
    ldc = max(n, so1 // item)
    sc = so0 // item
    cublas = _cublas or _lib()
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
    beta = (_ONE_PTR if accumulate else _ZERO_PTR)[dtype]
    op_a, lda, sa, pa = da
    op_b, ldb, sb, pb = db
    # Row-major C = A B is column-major C^T = B^T A^T: cuBLAS gets (b, a) swapped.
    if tf32:
        cublas.gemmStridedBatchedEx(handle, op_b, op_a, n, m, k, _ONE_PTR[dtype],
                                    pb, _CUDA_R_32F, ldb, sb, pa, _CUDA_R_32F, lda, sa,
                                    beta, out.data.ptr, _CUDA_R_32F, ldc, sc, batch,
                                    _COMPUTE_32F_FAST_TF32, _GEMM_DEFAULT)
    else:
        gemm = getattr(cublas, _GEMM_NAMES[dtype])
        gemm(handle, op_b, op_a, n, m, k, _ONE_PTR[dtype], pb, ldb, sb, pa, lda, sa, beta, out.data.ptr,
             ldc, sc, batch)


def _stacked_gemm(a, b, k0, kk, out, accumulate):
    """out (+)= columns k0:k0+kk of Stacked ``a`` @ rows 0:kk of Stacked ``b`` (tf32x3), on
    the stacked arrays themselves where they are C-ordered (no sliced views)."""
    da, db = a.data, b.data
    if da.flags.c_contiguous and db.flags.c_contiguous:
        batch_a, m, wa = da.shape
        batch_b, _, n = db.shape
        _gemm_ptr(out, kk, _F32, (_OP_N, wa, 0 if batch_a == 1 else m * wa, da.data.ptr + 4 * k0),
                  (_OP_N, n, 0 if batch_b == 1 else db.shape[1] * n, db.data.ptr), accumulate, True)
    else:
        _gemm(da[:, :, k0:k0 + kk], db[:, :kk], out, accumulate, True)


def _logical(op, side):
    """The (B, M, K) or (B, K, N) shape an operand stands for."""
    if isinstance(op, Split):
        return op.hi.shape
    if isinstance(op, Stacked):
        b, r, c = op.data.shape
        return (b, r, c // op.blocks) if side == "a" else (b, r // op.blocks, c)
    return op.shape


def matmul(a, b, out=None, accumulate=False, fp32_math="ieee"):
    """``a @ b`` for 3-D arrays ``(B or 1, M, K) @ (B or 1, K, N)`` -> ``(B, M, N)``.

    float32/float64 go to cuBLAS in strided-batched calls (a batch of 1 is broadcast
    with stride 0); other dtypes and sizes past cuBLAS's int limits fall back to
    ``cupy.matmul``.  ``out`` (optional) is a (B, M, N) view with unit column stride;
    ``accumulate`` adds the product to it (beta = 1).  float32 follows ``fp32_math``
    (see the module notes); either operand may come already split, as a
    :class:`Split` or a :class:`Stacked`, which implies tf32x3.  cuBLAS results are
    bitwise reproducible run to run, so every path stays deterministic.
    """
    (ba, m, k), (bb, kb, n) = _logical(a, "a"), _logical(b, "b")
    batch = max(ba, bb)
    given_split = isinstance(a, (Split, Stacked)) or isinstance(b, (Split, Stacked))
    dtype = np.dtype(np.float32) if given_split else a.dtype
    item = dtype.itemsize
    direct = (dtype in _GEMM_NAMES and (given_split or b.dtype == dtype) and kb == k and ba in (1, batch)
              and bb in (1, batch) and 3 * max(m, n, k, batch) <= _INT_MAX and 0 not in (m, n, k, batch))
    if out is not None:
        direct = (direct and out.dtype == dtype and out.shape == (batch, m, n) and out.strides[2] == item
                  and out.strides[1] % item == 0 and out.strides[0] % item == 0
                  and (m == 1 or out.strides[1] >= n * item))
    if not direct:
        if given_split:
            raise ValueError("gpu_blas.matmul: split operands need a float32 GEMM cuBLAS can run directly")
        res = cp.matmul(a, b)
        if out is None:
            return res
        if accumulate:
            out += res
        else:
            out[...] = res
        return out
    if out is None:
        out = cp.empty((batch, m, n), dtype=dtype)
    if not given_split and not uses_tf32x3(dtype, fp32_math):
        _gemm(a, b, out, accumulate, False)
        return out
    if isinstance(a, Split) or isinstance(b, Split):
        a = a if isinstance(a, Split) else split(a)
        b = b if isinstance(b, Split) else split(b)
        # The two small cross terms first, then the large one, each added in float32.
        _gemm(a.hi, b.lo, out, accumulate, True)
        _gemm(a.lo, b.hi, out, True, True)
        _gemm(a.hi, b.hi, out, True, True)
        return out
    # Stacked operands: three blocks cost one more copy of each operand, two blocks one
    # more pass over the result; take the cheaper.
    blocks = min(op.blocks for op in (a, b) if isinstance(op, Stacked)) if given_split else \
        (3 if ba * m * k + bb * k * n < 2 * batch * m * n else 2)
    a = a if isinstance(a, Stacked) else stack_a(a, blocks)
    b = b if isinstance(b, Stacked) else stack_b(b, blocks)
    if blocks == 3:
        _stacked_gemm(a, b, 0, 3 * k, out, accumulate)
    else:
        _stacked_gemm(a, b, 0, 2 * k, out, accumulate)   # lo_a hi_b + hi_a lo_b
        _stacked_gemm(a, b, k, k, out, True)              # + hi_a hi_b
    return out



def matmul_samples(a, cols, out, fp32_math="ieee"):
    """``out[n] = a @ cols[:, n*P:(n+1)*P]`` for one (1, M, K) matrix ``a`` and the columns
    ``cols`` (1, K, nb*P) of nb samples, written into ``out`` (nb, M, P), C-ordered: one
    strided-batched GEMM over the samples (its B_n is the sample's column block), so an
    im2col forward lands in y's (N, C, P) layout with no transposed copy of its result.
    ``cols`` may be a :class:`Stacked` of 2 or 3 blocks (tf32x3; ``a`` is then split
    here), else ``a`` and ``cols`` share out's dtype, C-ordered."""
    nb, m, p = out.shape
    if isinstance(cols, Stacked):
        data, blocks = cols.data, cols.blocks
        k = data.shape[1] // blocks
        q = data.shape[2]
        sa = stack_a(a, blocks).data                                  # (1, M, blocks*K)
        da = (_OP_N, blocks * k, 0, sa.data.ptr)
        db = (_OP_N, q, p, data.data.ptr)
        if blocks == 3:
            _gemm_ptr(out, 3 * k, _F32, da, db, False, True)
        else:                                                         # lo_a hi_b + hi_a lo_b, + hi_a hi_b
            _gemm_ptr(out, 2 * k, _F32, da, db, False, True)
            _gemm_ptr(out, k, _F32, (_OP_N, 2 * k, 0, sa.data.ptr + 4 * k), db, True, True)
        return out
    if uses_tf32x3(out.dtype, fp32_math):
        return matmul_samples(a, stack_b(cols, 3), out)
    k, q = cols.shape[1], cols.shape[2]
    a = cp.ascontiguousarray(a)
    _gemm_ptr(out, k, out.dtype, (_OP_N, k, 0, a.data.ptr), (_OP_N, q, p, cols.data.ptr), False, False)
    return out

def view(operand, fn):
    """``fn`` applied to an array, or to both parts of a :class:`Split`."""
    return Split(fn(operand.hi), fn(operand.lo)) if isinstance(operand, Split) else fn(operand)


def arrays(operand):
    """The arrays an operand occupies: its parts when split, else itself."""
    return parts(operand) or (operand,)


def parts(operand):
    """The arrays a split operand holds (none for a plain array), for memory accounting."""
    if isinstance(operand, Stacked):
        return (operand.data,)
    return tuple(operand) if isinstance(operand, Split) else ()
