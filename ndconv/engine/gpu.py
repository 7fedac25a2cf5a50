"""The CuPy engine: the three primitives on an NVIDIA GPU, through a registry of algorithms.

Algorithms (the registry at the end of this module gives their order and the choice for
calls nobody tuned; ``cudnn`` is one more candidate where installed).
``phases`` and ``space_to_batch`` rewrite a call and hand the rewritten call back to
the engine, which picks (or tunes) the algorithm for it like for any other call.

``cudnn_tf32x3``
    cuDNN's TF32 tensor-core engines at float32 accuracy, for one-group float32
    forwards and input gradients: both operands split into TF32 parts and stacked
    three times along the summed channels (:mod:`.cudnn_graph`), so one TF32
    convolution sums ``hi*hi + lo*hi + hi*lo``.  Measured on an H200: 0.43-0.73 of
    PyTorch's float32 time on the suite's 3-D rows and strided transposed forwards;
    slower where the call is memory bound (the stacked copies triple the reads).
``depthwise_rows``
    Stride-1 depthwise forward and input gradient with no shared memory
    (:mod:`ndconv.engine.gpu_depthwise`): each thread keeps a few rows of outputs in
    registers and reads every input row they need once, as float4 blocks where the
    rows allow; the untuned choice in 2-D and 3-D.
``depthwise_tiled``
    Tiled kernels for ``Cx/G == 1`` (see :mod:`ndconv.engine.gpu_depthwise`): input
    tiles with halos in shared memory, loops over taps unrolled per compiled
    (dtype, kernel, stride, dilation); input gradient for stride 1 only.
``depthwise_direct``
    Direct CUDA kernels for ``Cx/G == 1`` (depthwise, any channel multiplier), 1-D
    to 3-D.  Forward and input gradient are gathers (one thread per output
    element); the weight gradient is a two-stage reduction: per-block partial sums
    to a buffer, then a fixed-order final sum.
``implicit_gemm``
    Forward and input gradient of one-group float32 calls as a tiled GEMM kernel that
    reads its operand straight from the input (padding by bounds checks, no im2col
    buffer) and writes its result straight to its place (:mod:`.gpu_implicit`); the
    input gradient runs one GEMM per stride phase.  The untuned choice for k = s
    transposed convolutions (one GEMM, the depth-to-space folded into its stores).
``implicit_tf32x3``
    The same kernel on the tensor cores at float32 accuracy (3xTF32); the untuned
    choice for k = s transposed float32 calls on devices with TF32.
``phases``
    Strided calls as stride-1 calls over the input's phases (:mod:`.phases`); the
    untuned choice for strided transposed convolutions whose kernel is a multiple
    of the stride (k = s is one GEMM and a depth-to-space copy).
``space_to_batch``
    Dilated stride-1 calls as one undilated call over the dilation phases stacked
    into the batch.
``flat_gemm``
    Stride-1 calls as one cuBLAS GEMM per kernel tap over flattened, padded arrays
    (:mod:`.gpu_flat`): no im2col buffer, the whole batch in each GEMM.
``im2col_gemm``
    Any geometry.  An im2col kernel lays out the columns as ``(G, Cx/G*K, nb*P)``
    (one column per output position of the chunk), so each group is one large
    cuBLAS GEMM (one strided-batched call over the groups, :mod:`.gpu_blas`); col2im
    is a gather kernel.  The work is
    split by batch, then by first output dim, so that the temporaries of one chunk
    stay under ``workspace_limit``.  A 1x1 stride-1 call skips im2col: one batched
    GEMM on x itself.

Every algorithm is deterministic (no floating-point atomics), so the same inputs
give bitwise-identical results on every run.  float16 is accumulated in float32.
Every kernel indexes with 64-bit integers.
"""
from __future__ import annotations

import contextlib
import functools
import math

import cupy as cp
import numpy as np
from cupy.lib.stride_tricks import as_strided

from . import autotune, gpu_blas, gpu_kernels, phases
from .cudnn import Cudnn
from .cudnn_graph import CudnnGraph, CudnnGraphTF32x3
from .cudnn import version as cudnn_version
from .gpu_depthwise import DepthwiseRows, DepthwiseTiled
from .gpu_plane import Plane
from .gpu_flat import FlatGemm
from .gpu_implicit import ImplicitGemm
from .registry import FLOATS as _FLOATS
from .registry import OPS, Algorithm, NotApplicable, Registry, cached, check_op

DEFAULT_WORKSPACE = 1 << 30
_THREADS = 256
_MAX_BLOCKS = 1 << 20          # grid-stride loops cover the rest


def compute_dtype(dtype):
    """float16 is computed (accumulated) in float32."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


# ------------------------------------------------------------------ compiled modules and params

_modules = {}


def _kernel(nd, dtype, name, index32=False, g=None):
    """A kernel of the shared module; with ``g``, of a module compiled for that geometry."""
    dev, dtype_name = cp.cuda.runtime.getDevice(), np.dtype(dtype).name

    def module():
        code = gpu_kernels.source(nd, dtype_name, index32, None if g is None else _param_values(g))
        return cp.RawModule(code=code)
    return cached(_modules, (dev, nd, dtype_name, name, index32, g),
                  lambda: cached(_modules, (dev, nd, dtype_name, index32, g), module).get_function(name))


#: im2col / col2im calls of at least this many elements run a module compiled for
#: their geometry (divisions by constants; compiled once, then cached on disk by CuPy)
SPECIALIZE_ELEMENTS = 1 << 22


def _special(g, elements):
    """``g`` where a call this large gets a module of its own, else None."""
    return g if elements >= SPECIALIZE_ELEMENTS else None


_params = {}


def _geometry_params(g):
    """The geometry as a device int64 array (see gpu_kernels for the layout), cached."""
    key = (cp.cuda.runtime.getDevice(), g)
    arr = _params.get(key)
    if arr is None:
        host = np.array(_param_values(g), dtype=np.int64)
        if len(_params) > 1024:
            _params.clear()
        arr = _params[key] = cp.asarray(host)
    return arr


def _param_values(g):
    return ((g.batch, g.x_channels, g.y_channels, g.groups) + tuple(g.x_size) + tuple(g.y_size)
            + tuple(g.kernel) + tuple(g.stride) + tuple(g.dilation) + tuple(g.pad_lo))


def _fits32(*arrays):
    """True when every flat index into these arrays fits a 32-bit int."""
    return max(a.size for a in arrays) < 2 ** 31


def _blocks(total, threads=_THREADS):
    return max(1, min(-(-int(total) // threads), _MAX_BLOCKS))


def _launch(kernel, total, args, threads=_THREADS):
    kernel((_blocks(total, threads),), (threads,), args)


def _part(a, n0, n1, r0, r1):
    """a[n0:n1, :, r0:r1] (batch and first output dim of a chunk); ``a`` itself for the whole."""
    if n0 == 0 and r0 == 0 and n1 == a.shape[0] and r1 == a.shape[2]:
        return a
    return a[n0:n1, :, r0:r1]


def phase_shuffle(src, groups, stride, grid, to_phases):
    """phases.space_to_depth / depth_to_space's rearrangement in one kernel, or None.

    ``to_phases``: ``src`` is (nb, C, *(grid*stride)) and the result (nb, G*S*C/G,
    *grid), channels (G, phase, C/G); else the way back.  None where 32-bit indices
    do not reach (the caller then uses the array-module route).
    """
    if src.size >= 2 ** 31 or not src.flags.c_contiguous or src.dtype.itemsize not in (2, 4, 8):
        return None
    fn, grid_dims, out_shape, ints = cached(
        _shuffle_plans, (cp.cuda.runtime.getDevice(), src.shape, src.dtype.itemsize, groups, tuple(stride),
                         tuple(grid), bool(to_phases)),
        lambda: _shuffle_plan(src.shape, src.dtype.itemsize, groups, stride, grid, to_phases))
    out = cp.empty(out_shape, dtype=src.dtype)
    fn(grid_dims, (32, 8), (src, out) + ints)
    return out


_shuffle_plans = {}


def _shuffle_plan(shape, itemsize, groups, stride, grid, to_phases):
    """(kernel, grid, result shape, int arguments) of one phase shuffle."""
    nb, nd = shape[0], len(stride)
    channels = shape[1]
    pad = 3 - nd
    m = (1,) * pad + tuple(grid)
    s = (1,) * pad + tuple(stride)
    cg = channels // groups if to_phases else channels // (groups * math.prod(stride))
    fn = cached(_modules, (cp.cuda.runtime.getDevice(), "phase_shuffle", itemsize, s[2]),
                lambda: cp.RawModule(code=gpu_kernels.shuffle_source(itemsize, s[2])).get_function("phase_shuffle"))
    if to_phases:
        out_shape = (nb, channels * math.prod(stride)) + tuple(grid)
    else:
        out_shape = (nb, groups * cg) + tuple(a * b for a, b in zip(grid, stride))
    rows = nb * groups * cg * m[0] * s[0] * m[1] * s[1]
    rpt = gpu_kernels.shuffle_rows_per_thread(s[2])
    grid_dims = (min(-(-m[2] // 32), 1024), min(-(-rows // (8 * rpt)), 65535))
    ints = tuple(np.int32(v) for v in (1 if to_phases else 0, nb * groups, cg, *m, *s[:2]))
    return fn, grid_dims, out_shape, ints


def _i64(v):
    return np.int64(v)


_NULL = np.uint64(0)     # a null pointer argument


# ------------------------------------------------------------------ algorithms

@functools.lru_cache(maxsize=1024)
def _im2col_chunks(g, itemsize, limit, copies):
    """(n0, n1, a, b) chunks of batch and first output dim whose temporaries fit ``limit``."""
    rest = math.prod(g.y_size[1:])
    # columns + transposed rows of y (each with its two TF32 parts under tf32x3)
    # + the result, per output row of one sample
    per_row = itemsize * rest * (copies * (g.x_channels * g.taps + g.y_channels) + g.y_channels)
    per_sample = per_row * g.y_size[0]
    if per_sample <= limit:
        nb = max(1, min(g.batch, limit // max(per_sample, 1)))
        return tuple((n0, min(g.batch, n0 + nb), 0, g.y_size[0]) for n0 in range(0, g.batch, nb))
    rows = max(1, limit // per_row)
    return tuple((n0, n0 + 1, a, min(g.y_size[0], a + rows))
                 for n0 in range(g.batch) for a in range(0, g.y_size[0], rows))


_column_plans = {}
_col2im_plans = {}


class Im2colGemm(gpu_blas.Fp32Twin, Algorithm):
    """im2col/col2im kernels + one cuBLAS GEMM per group, chunked by the workspace limit."""

    name = "im2col_gemm"

    tf32x3_name = "im2col_tf32x3"

    def supports(self, op, g, dtype):
        if self.tf32x3_refuses(op, g, dtype):
            return False
        return op in OPS and g.nd in (1, 2, 3) and np.dtype(dtype).name in _FLOATS

    def gemm_k(self, op, g):
        """The products each GEMM result sums (col2im and chunks add in float32; under
        tf32x3 the weight gradient cuts its long sums into pieces of at most TF32X3_MAX_K)."""
        if op == "forward":
            return g.x_channels // g.groups * g.taps
        if op == "backward_input":
            return g.y_channels // g.groups
        return min(g.batch * math.prod(g.y_size), gpu_blas.TF32X3_MAX_K)

    def preferred(self, op, g, dtype):
        # 1x1: plain GEMMs on the arrays themselves beat cuDNN's (measured on an H200:
        # 0.31 against 0.84 ms for the weight gradient of a ResNet 1x1 layer).
        return pointwise(g)

    def run(self, engine, op, a, b, g):
        return getattr(self, "_" + op)(engine, a, b, g)

    def _chunks(self, engine, g, itemsize):
        """Split (batch, first output dim) so that one chunk's temporaries fit the limit."""
        copies = 3 if self.fp32_math == "tf32x3" and itemsize == 4 else 1
        return _im2col_chunks(g, itemsize, engine.workspace_limit, copies)

    def _columns(self, x, g, n0, n1, a, b, dt, stacked=False):
        """The columns (G, Cx/G*K, nb*P) of batch n0:n1, output rows a:b.  Under tf32x3
        the same kernel writes their TF32 parts: a gpu_blas.Stacked right operand
        ``[hi ; lo]`` per group (``stacked``), else a gpu_blas.Split."""
        split = gpu_blas.uses_tf32x3(dt, self.fp32_math)
        key = (cp.cuda.runtime.getDevice(), g, n0, n1, a, b, x.dtype.char, dt.char, split, stacked, _fits32(x))
        kernel, grid, block, shape, lo_offset, ints = cached(
            _column_plans, key, lambda: self._column_plan(x, g, n0, n1, a, b, dt, split, stacked))
        cols = cp.empty(shape, dtype=dt)
        # y: one block row per column row (c, tap); x: the (n, p) of that row
        lo = np.uint64(cols.data.ptr + lo_offset) if split else _NULL
        kernel(grid, block, (x, cols, lo) + ints)
        if not split:
            return cols
        if stacked:
            return gpu_blas.Stacked(cols, 2)
        return gpu_blas.Split(cols[0], cols[1])

    @staticmethod
    def _column_plan(x, g, n0, n1, a, b, dt, split, stacked):
        """(kernel, grid, block, shape of the columns, byte offset of their lo part, the
        kernel's arguments after (x, cols, lo)) of one chunk, worked out once."""
        nb, rows = n1 - n0, b - a
        q, r = nb * rows * math.prod(g.y_size[1:]), g.x_channels * g.taps
        per_group = r // g.groups
        threads = min(_THREADS, 32 * -(-q // 32))
        grid = (min(-(-q // threads), _MAX_BLOCKS), min(r, 65535))
        full_rows = (a, b) == (0, g.y_size[0])
        kernel = _kernel(g.nd, x.dtype, "im2col", _fits32(x) and 2 * r * q < 2 ** 31,
                         _special(g, r * q) if full_rows else None)
        tail = (_geometry_params(g), _i64(n0), _i64(nb), _i64(a), _i64(rows))
        if not split:
            return kernel, grid, (threads,), (g.groups, per_group, q), 0, (_i64(1), _i64(0)) + tail
        if stacked:      # (G, [hi ; lo] rows, Q): each group's hi rows, then its lo rows
            return (kernel, grid, (threads,), (g.groups, 2 * per_group, q), per_group * q * dt.itemsize,
                    (_i64(per_group), _i64(per_group)) + tail)
        return (kernel, grid, (threads,), (2, g.groups, per_group, q), g.groups * per_group * q * dt.itemsize,
                (_i64(per_group), _i64(0)) + tail)

    @staticmethod
    def _rows_t(gy, g, n0, n1, a, b, dt):
        """gy[n0:n1, :, a:b] as (G, Cy/G, nb*P), in the compute dtype."""
        nb = n1 - n0
        part = _part(gy, n0, n1, a, b).reshape(nb, g.y_channels, -1).transpose(1, 0, 2)
        part = cp.ascontiguousarray(part, dtype=dt)
        return part.reshape(g.groups, g.y_channels // g.groups, -1)

    def _forward(self, engine, x, w, g):
        dt = compute_dtype(x.dtype)
        wm = w.reshape(g.groups, g.y_channels // g.groups, -1).astype(dt, copy=False)
        if pointwise(g):   # the columns are x itself: one batched GEMM, no im2col
            xv = x.reshape(g.batch, g.groups, g.x_channels // g.groups, -1).astype(dt, copy=False)
            return _per_group(wm, xv, self.fp32_math).astype(x.dtype, copy=False).reshape(g.y_shape)  # (N, G, Cy/G, P)
        y = cp.empty(g.y_shape, dtype=x.dtype)
        # one group, computed in y's dtype: the GEMM of each chunk of whole samples writes
        # y[n0:n1] in place, one batched GEMM over its samples (no transposed copy)
        in_place = g.groups == 1 and dt == x.dtype and dt in (np.float32, np.float64)
        for n0, n1, a, b in self._chunks(engine, g, dt.itemsize):
            cols = self._columns(x, g, n0, n1, a, b, dt, stacked=True)
            if in_place and (a, b) == (0, g.y_size[0]):
                out = y[n0:n1].reshape(n1 - n0, g.y_channels, -1)           # (nb, Cy, P)
                gpu_blas.matmul_samples(wm, cols, out, self.fp32_math)
                engine._note(*gpu_blas.arrays(cols))
                del cols
                continue
            res = gpu_blas.matmul(wm, cols, fp32_math=self.fp32_math)   # (G, Cy/G, nb*P)
            engine._note(res, *gpu_blas.arrays(cols))
            del cols
            res = res.reshape((g.y_channels, n1 - n0, b - a) + g.y_size[1:])
            y[n0:n1, :, a:b] = res.swapaxes(0, 1)
        return y

    def _backward_input(self, engine, gy, w, g):
        dt = compute_dtype(gy.dtype)
        wt = w.reshape(g.groups, g.y_channels // g.groups, -1).astype(dt, copy=False).transpose(0, 2, 1)
        if pointwise(g):    # cuBLAS reads the transposed weights as they are (op T)
            gyv = gy.reshape(g.batch, g.groups, g.y_channels // g.groups, -1).astype(dt, copy=False)
            return _per_group(wt, gyv, self.fp32_math).astype(gy.dtype, copy=False).reshape(g.x_shape)  # (N, G, Cx/G, P)
        # tf32x3: both operands go straight from their strided views into one GEMM of
        # 3K (the result, the columns, is the big array here), with no transposed copies.
        stacked = gpu_blas.uses_tf32x3(dt, self.fp32_math)
        wt = gpu_blas.stack_a(wt, 3) if stacked else cp.ascontiguousarray(wt)   # (G, Cx/G*K, Cy/G)
        gx = cp.empty(g.x_shape, dtype=gy.dtype)
        params = _geometry_params(g)
        buf = None
        for n0, n1, a, b in self._chunks(engine, g, dt.itemsize):
            if stacked:      # gy[n0:n1, :, a:b] as (G, Cy/G, nb, P), stacked along Cy/G
                nb, yg = n1 - n0, g.y_channels // g.groups
                rows = _part(gy, n0, n1, a, b).reshape(nb, g.groups, yg, -1).transpose(1, 2, 0, 3)
                gyt = gpu_blas.stack_b(rows, 3)
            else:
                gyt = self._rows_t(gy, g, n0, n1, a, b, dt)
            gcols = gpu_blas.matmul(wt, gyt, fp32_math=self.fp32_math)  # (G, Cx/G*K, nb*P)
            engine._note(gcols, *gpu_blas.arrays(gyt))
            del gyt
            if (a, b) == (0, g.y_size[0]):
                fits = _fits32(gcols, gx)
                fn, blocks, ints = cached(
                    _col2im_plans, (cp.cuda.runtime.getDevice(), g, gy.dtype.char, fits, n0, n1),
                    lambda: (_kernel(g.nd, gy.dtype, "col2im_store", fits, _special(g, gcols.size)),
                             _blocks((n1 - n0) * g.x_channels * math.prod(g.x_size)),
                             (params, _i64(n0), _i64(n1 - n0))))
                fn((blocks,), (_THREADS,), (gcols, gx) + ints)
                continue
            # Row chunks of one sample overlap in the input rows they feed: add them, in
            # chunk order, into a float buffer of that sample.
            if a == 0:
                buf = cp.zeros((g.x_channels,) + g.x_size, dtype=dt)
                engine._note(buf, gcols)
            s0, d0, k0, lo0 = g.stride[0], g.dilation[0], g.kernel[0], g.pad_lo[0]
            i0 = max(0, a * s0 - lo0)
            i1 = min(g.x_size[0], (b - 1) * s0 - lo0 + d0 * (k0 - 1) + 1)
            if i1 > i0:
                _launch(_kernel(g.nd, gy.dtype, "col2im_add", _fits32(gcols, buf)),
                        g.x_channels * (i1 - i0) * math.prod(g.x_size[1:]),
                        (gcols, buf, params, _i64(a), _i64(b - a), _i64(i0), _i64(i1 - i0)))
            if b == g.y_size[0]:
                gx[n0] = buf
                buf = None
        return gx

    def _backward_weight(self, engine, x, gy, g):
        dt = compute_dtype(x.dtype)
        if pointwise(g):
            # per sample (G, Cy/G, P) @ (G, P, Cx/G), summed over the batch in a fixed order
            gyv = gy.reshape(g.batch, g.groups, g.y_channels // g.groups, -1).astype(dt, copy=False)
            xv = x.reshape(g.batch, g.groups, g.x_channels // g.groups, -1).astype(dt, copy=False)
            # per-sample sums over the positions: tf32x3 only while they stay short
            math_ = self.fp32_math if math.prod(g.y_size) <= gpu_blas.TF32X3_MAX_K else "ieee"
            gw = sum_batch(_per_group(gyv, xv.transpose(0, 1, 3, 2), math_))
            return gw.reshape(g.w_shape).astype(x.dtype, copy=False)
        gw = None
        max_k = gpu_blas.TF32X3_MAX_K if gpu_blas.uses_tf32x3(dt, self.fp32_math) else None
        for n0, n1, a, b in self._chunks(engine, g, dt.itemsize):
            cols = self._columns(x, g, n0, n1, a, b, dt)   # (G, Cx/G*K, nb*P)
            gyt = gpu_blas.presplit(self._rows_t(gy, g, n0, n1, a, b, dt), self.fp32_math)  # (G, Cy/G, nb*P)
            engine._note(*gpu_blas.arrays(gyt), *gpu_blas.arrays(cols))
            q = (n1 - n0) * (b - a) * math.prod(g.y_size[1:])
            step = weight_piece(q, g.y_channels // g.groups, g.x_channels // g.groups * g.taps, g.groups,
                                max_k, _sm_count(cp.cuda.runtime.getDevice()), dt.itemsize, engine.workspace_limit)
            if step < q:
                part = self._weight_pieces(gyt, cols, step, dt)
            else:
                part = gpu_blas.matmul(gyt, gpu_blas.view(cols, lambda v: v.transpose(0, 2, 1)))  # (G, Cy/G, Cx/G*K)
            gw = part if gw is None else gw + part
        return gw.reshape(g.w_shape).astype(x.dtype, copy=False)

    @staticmethod
    def _weight_pieces(gyt, cols, step, dt):
        """``gyt @ cols.T`` per group with the long sum over positions cut into pieces of
        ``step`` (see :func:`weight_piece`): one batched GEMM over the pieces and a
        fixed-order sum of their results."""
        groups, yg, q = gpu_blas.arrays(gyt)[0].shape
        rows = gpu_blas.arrays(cols)[0].shape[1]
        full, rest = divmod(q, step)
        out = cp.empty((groups, full + (rest > 0), yg, rows), dt)
        item = dt.itemsize
        for gi in range(groups):
            a = gpu_blas.view(gyt, lambda v: v[gi])                          # (Cy/G, Q)
            b = gpu_blas.view(cols, lambda v: v[gi])                         # (Cx/G*K, Q)
            if full:       # (pieces, Cy/G, step) @ (pieces, step, Cx/G*K)
                ap = gpu_blas.view(a, lambda v: as_strided(v, (full, yg, step), (step * item, q * item, item)))
                bp = gpu_blas.view(b, lambda v: as_strided(v, (full, step, rows), (step * item, item, q * item)))
                gpu_blas.matmul(ap, bp, out=out[gi, :full])
            if rest:
                ar = gpu_blas.view(a, lambda v: v[None, :, full * step:])
                br = gpu_blas.view(b, lambda v: v[None, :, full * step:].transpose(0, 2, 1))
                gpu_blas.matmul(ar, br, out=out[gi, full:])
        if groups == 1:
            return sum_batch(out[0])[None]                                   # (1, Cy, Cx*K)
        return out.sum(axis=1)                                               # (G, Cy/G, Cx/G*K)


#: GEMM output tile edge assumed when counting the blocks a weight-gradient GEMM runs
_GEMM_TILE = 128
#: shortest piece of a split weight-gradient sum (shorter ones run GEMMs inefficiently)
_MIN_PIECE = 1024


@functools.lru_cache(maxsize=1024)
def weight_piece(q, m, n, groups, max_k, sms, itemsize, limit):
    """The length of the pieces a weight gradient's GEMM ``(M, Q) @ (Q, N)`` (per group)
    cuts its long sum over positions into ("split-K"): ``q`` itself for one piece.

    A weight gradient has few outputs (M x N) and a long sum: its GEMM alone would run
    on a handful of tiles (18 of 132 SMs for a strided ResNet layer), so the sum is cut
    into pieces, run as one batched GEMM, and the pieces' results are added in a fixed
    order.  As many pieces as fill every SM twice, none shorter than _MIN_PIECE, their
    results within a quarter of ``limit`` bytes; under tf32x3 (``max_k``) the fewest
    that are no longer than ``max_k``.  Pieces are multiples of 4 long (16-byte
    aligned operands for cuBLAS).
    """
    if max_k:
        # tf32x3: as few pieces as its accuracy allows (more pieces measured slower there:
        # 0.53 against 0.38 ms for a strided ResNet layer, three GEMM calls per batch)
        pieces = -(-q // max_k)
    else:
        tiles = groups * -(-m // _GEMM_TILE) * -(-n // _GEMM_TILE)
        pieces = min(-(-2 * sms // tiles), max(1, q // _MIN_PIECE),
                     max(1, limit // 4 // (groups * m * n * itemsize)))
    if pieces <= 1:
        return q
    # (not under tf32x3) up to twice as many pieces where that makes them all one
    # length: no second GEMM call for a shorter last piece
    for p in range(pieces, (pieces if max_k else 2 * pieces) + 1):
        if q % (4 * p) == 0:
            return q // p
    return 4 * -(-q // (4 * pieces))


@functools.lru_cache(maxsize=16)
def _sm_count(device):
    return int(cp.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])


class DepthwiseDirect(Algorithm):
    """Direct kernels for Cx/G == 1 (depthwise with any multiplier), no workspace but partials."""

    name = "depthwise_direct"

    def supports(self, op, g, dtype):
        return (op in OPS and g.nd in (1, 2, 3) and np.dtype(dtype).name in _FLOATS
                and g.x_channels == g.groups and g.x_channels > 0)

    def run(self, engine, op, a, b, g):
        return getattr(self, "_" + op)(engine, a, b, g)

    @staticmethod
    def splits(g):
        """Slices of the N*prod(Y) reduction per weight element: fixed by the geometry alone,
        so the summation order (and the result) never changes between runs."""
        length = g.batch * math.prod(g.y_size)
        return max(1, min(1024, -(-length // 8192)))

    def _forward(self, engine, x, w, g):
        y = cp.empty(g.y_shape, dtype=x.dtype)
        _launch(_kernel(g.nd, x.dtype, "dw_forward"), y.size, (x, w, y, _geometry_params(g)))
        return y

    def _backward_input(self, engine, gy, w, g):
        gx = cp.empty(g.x_shape, dtype=gy.dtype)
        _launch(_kernel(g.nd, gy.dtype, "dw_backward_input"), gx.size,
                (gy, w, gx, _geometry_params(g)))
        return gx

    def _backward_weight(self, engine, x, gy, g):
        splits = self.splits(g)
        gw = cp.empty(g.w_shape, dtype=x.dtype)
        partial = cp.empty(g.y_channels * g.taps * splits, dtype=compute_dtype(x.dtype))
        engine._note(partial)
        params = _geometry_params(g)
        blocks = min(partial.size, _MAX_BLOCKS)
        _kernel(g.nd, x.dtype, "dw_wgrad_partial")(
            (blocks,), (gpu_kernels.WGRAD_THREADS,), (x, gy, partial, params, _i64(splits)))
        _launch(_kernel(g.nd, x.dtype, "dw_wgrad_final"), gw.size, (partial, gw, params, _i64(splits)))
        return gw


def _per_group(a, b, fp32_math):
    """``a @ b`` per group: ``a`` is (G, M, K) or (N, G, M, K), ``b`` is (N, G, K, P).

    One strided-batched cuBLAS call per group (the batch runs over N); many small
    groups go to ``cupy.matmul`` instead of a long loop of calls.
    """
    n, groups = b.shape[:2]
    per_sample = a.ndim == 4
    if groups > 8:
        return cp.matmul(a, b)
    parts = [gpu_blas.matmul(a[:, i] if per_sample else a[i:i + 1], b[:, i], fp32_math=fp32_math)
             for i in range(groups)]
    return parts[0][:, None] if groups == 1 else cp.stack(parts, axis=1)


def sum_batch(a):
    """``a.sum(axis=0)`` of a float32/float64 array, each element summed in batch order
    in one kernel (deterministic; a CuPy reduction costs several times its host time)."""
    if a.dtype.char not in "fd" or a.ndim < 2:
        return a.sum(axis=0)
    if a.shape[0] == 0:
        return cp.zeros(a.shape[1:], dtype=a.dtype)
    a = cp.ascontiguousarray(a)
    out = cp.empty(a.shape[1:], dtype=a.dtype)
    m = out.size
    if m:
        fn = cached(_modules, (cp.cuda.runtime.getDevice(), "sum_batch", a.dtype.char),
                    lambda: cp.RawModule(code=gpu_kernels.SUM_BATCH_SOURCE).get_function("sum_batch_" + a.dtype.char))
        fn((_blocks(m),), (_THREADS,), (a, out, np.int64(a.shape[0]), np.int64(m)))
    return out


def pointwise(g):
    """A 1x1 stride-1 convolution without padding: y = w @ x per sample."""
    return g.taps == 1 and phases.unit_stride(g) and not any(g.pad_lo) and g.y_size == g.x_size


# The heuristic for calls nobody tuned: the first algorithm (in this order) whose
# ``preferred`` says yes for the call -- each states the measurement behind it: the
# whole-plane kernels for depthwise and small groups, phases for strided transposed
# calls without wasted taps, space_to_batch for dilated dense calls, flat_gemm for
# dense weight gradients outside 2-D, the plain GEMMs for 1x1 -- else the first that supports it: cuDNN where it is
# installed, then the generic paths.
ALGORITHMS = Registry()
ALGORITHMS.register(Cudnn())
ALGORITHMS.register(CudnnGraph())
ALGORITHMS.register(CudnnGraphTF32x3())
ALGORITHMS.register(ImplicitGemm("tf32x3"))
ALGORITHMS.register(ImplicitGemm())
ALGORITHMS.register(phases.Phases())
ALGORITHMS.register(phases.SpaceToBatch())
ALGORITHMS.register(FlatGemm("tf32x3"))
ALGORITHMS.register(FlatGemm())
ALGORITHMS.register(DepthwiseRows())
ALGORITHMS.register(Plane())
ALGORITHMS.register(DepthwiseTiled())
ALGORITHMS.register(DepthwiseDirect())
ALGORITHMS.register(Im2colGemm("tf32x3"))
ALGORITHMS.register(Im2colGemm())

_default_tuner = None


def default_tuner():
    """The autotuner every GPUEngine shares unless given its own (cache in cache_dir())."""
    global _default_tuner
    if _default_tuner is None:
        _default_tuner = autotune.Autotuner(timer=cuda_timer)
    return _default_tuner


_flush_buffers = {}


def flush_l2():
    """Overwrite this device's L2 cache (a memset of twice its size, on the current
    stream), and wait for it.

    Timed back to back, a call finds its operands still in L2 (50 MB on an H200) and an
    algorithm that rereads them looks faster than it is where other work runs between
    calls.  The wait matters as much: a call timed while the memset still runs has its
    host work (Python, the library's own) hidden behind it, and the host decides short
    calls -- with the memset queued, legacy ``cudnn`` and ``cudnn_graph`` both timed 0.23
    ms for ``t2d_unet_k2s2``'s input gradient; from an idle device 0.30 and 0.24, as they
    ran between PyTorch's calls (0.35 and 0.28 ms with the sync)."""
    dev = cp.cuda.runtime.getDevice()
    buf = _flush_buffers.get(dev)
    if buf is None:
        size = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrL2CacheSize, dev)
        buf = _flush_buffers[dev] = cp.empty(2 * max(size, 1 << 20), dtype=np.uint8)
    stream = cp.cuda.get_current_stream()
    cp.cuda.runtime.memsetAsync(buf.data.ptr, 0, buf.nbytes, stream.ptr)
    stream.synchronize()


def cuda_timer(fn, repeat, warmup=True):
    """Fastest milliseconds of ``fn()`` over ``repeat`` calls on the current stream (CUDA
    events), after a warm-up call (unless ``warmup`` is False: the caller made one), each
    call starting on an idle device with a cold L2
    (``flush_l2``), as a call does after its caller's sync: its host time counts.  The
    fastest, not the median: a busy device or host only adds time (with medians, one bench
    run on a noisy H200 took ``cudnn_tf32x3`` at 0.38-0.52 ms for ``c2d_1x1``'s input
    gradient, where other runs' choices took 0.25)."""
    if warmup:
        fn()                                     # compilation, allocator, cuDNN's own search
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(max(1, int(repeat))):
        flush_l2()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return min(times)


_contexts = {}


def device_context(device_id):
    """What makes a timing on this device valid elsewhere: device, libraries, versions."""
    ctx = _contexts.get(device_id)
    if ctx is None:
        from .. import __version__
        props = cp.cuda.runtime.getDeviceProperties(device_id)
        name = props["name"]
        ctx = _contexts[device_id] = {
            "engine": "gpu", "device": name.decode() if isinstance(name, bytes) else str(name),
            "cc": f"{props['major']}.{props['minor']}", "ndconv": __version__, "cupy": cp.__version__,
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "cudnn": cudnn_version(),
            "algorithms": list(ALGORITHMS.names())}
    return ctx


# ------------------------------------------------------------------ the engine

class GPUEngine:
    """CuPy engine.

    ``algorithm`` forces one algorithm for every op (tests, benchmarks).  Calls nobody
    tuned use the choice an earlier :meth:`optimize` left in the autotune cache (this
    process or an earlier one on the same device and library versions), else the
    registry's priority order.  ``autotune=True`` (or ``NDCONV_AUTOTUNE=1``) tunes each
    new (op, geometry, dtype) on its first call instead.  ``tuner`` is the
    :class:`~ndconv.engine.autotune.Autotuner` holding the choices (default: one shared
    tuner whose file lives in the user's cache directory).  ``fp32_math`` picks how
    float32 GEMMs run (see :attr:`fp32_math`).
    """

    name = "gpu"

    def __init__(self, workspace_limit=DEFAULT_WORKSPACE, algorithm=None, deterministic=True,
                 autotune=None, tuner=None, fp32_math=None):
        self.workspace_limit = workspace_limit
        if fp32_math is None:
            import os
            fp32_math = os.environ.get("NDCONV_GPU_FP32", "") or "tf32x3"
        self.fp32_math = fp32_math
        self.peak_temp_bytes = 0
        self.deterministic = bool(deterministic)
        self.algorithms = ALGORITHMS
        if autotune is None:
            import os
            autotune = os.environ.get("NDCONV_AUTOTUNE", "") not in ("", "0")
        self.autotune = bool(autotune)
        self._tuner = tuner
        self._forced = {}
        #: (op, geometry, dtype name) -> algorithm name: tuned here or found in the cache
        self._tuned = {}
        self._untuned = {}
        #: op -> name of the algorithm that ran the last call of that op
        self.last_algorithm = {}
        if algorithm is not None:
            self.algorithms.get(algorithm)
            self._forced = {op: algorithm for op in OPS}

    @property
    def tuner(self):
        return self._tuner if self._tuner is not None else default_tuner()

    @tuner.setter
    def tuner(self, value):
        if value is not None and not isinstance(value, autotune.Autotuner):
            raise TypeError(f"tuner must be an ndconv.engine.autotune.Autotuner or None, got tuner={value!r}")
        self._tuner = value
        self._untuned.clear()

    @property
    def fp32_math(self):
        """How float32 GEMMs run: ``"tf32x3"`` (the default: tensor cores at float32
        accuracy, see :mod:`.gpu_blas`) or ``"ieee"`` (plain SGEMM).  The environment
        variable ``NDCONV_GPU_FP32`` sets the default of new engines."""
        return self._fp32_math

    @fp32_math.setter
    def fp32_math(self, value):
        self._fp32_math = gpu_blas.check_fp32_math(value)
        if hasattr(self, "_untuned"):
            self._untuned.clear()
            self._tuned.clear()

    @property
    def workspace_limit(self):
        return self._workspace_limit

    @workspace_limit.setter
    def workspace_limit(self, nbytes):
        if not isinstance(nbytes, (int, np.integer)) or isinstance(nbytes, bool) or nbytes <= 0:
            raise ValueError(f"workspace_limit must be a positive int of bytes, got workspace_limit={nbytes!r}")
        self._workspace_limit = int(nbytes)
        if hasattr(self, "_untuned"):
            self._untuned.clear()

    # ------------------------------------------------------------ the three primitives

    def forward(self, x, w, g):
        x, w = self._prepare("forward", g, ("x", x, g.x_shape), ("weight", w, g.w_shape))
        if 0 in g.y_shape:
            return cp.empty(g.y_shape, dtype=x.dtype)
        if g.x_channels == 0:
            return cp.zeros(g.y_shape, dtype=x.dtype)
        return self._run("forward", x, w, g)

    def backward_input(self, gy, w, g):
        gy, w = self._prepare("backward_input", g, ("grad_output", gy, g.y_shape), ("weight", w, g.w_shape))
        if 0 in g.x_shape:
            return cp.empty(g.x_shape, dtype=gy.dtype)
        if g.y_channels == 0 or g.batch == 0:
            return cp.zeros(g.x_shape, dtype=gy.dtype)
        return self._run("backward_input", gy, w, g)

    def backward_weight(self, x, gy, g):
        x, gy = self._prepare("backward_weight", g, ("x", x, g.x_shape), ("grad_output", gy, g.y_shape))
        if 0 in g.w_shape:
            return cp.empty(g.w_shape, dtype=x.dtype)
        if g.batch == 0:
            return cp.zeros(g.w_shape, dtype=x.dtype)
        return self._run("backward_weight", x, gy, g)

    # ------------------------------------------------------------ algorithm choice

    def choose(self, op, g, dtype, inner=False):
        """The algorithm this engine would use for ``op`` on geometry ``g``.

        ``inner``: the call is a part of another algorithm's (e.g. the stride-1 call
        of ``phases``); a forced algorithm applies to the outer call only.
        """
        check_op(op)
        dtype = np.dtype(dtype)
        forced = None if inner else self._forced.get(op)
        if forced is not None:
            alg = self.algorithms.get(forced)
            if not alg.supports(op, g, dtype):
                raise ValueError(f"algorithm {forced!r} does not support {op} for this geometry "
                                 f"(x {g.x_shape}, weight {g.w_shape}, groups {g.groups}, {dtype})")
            return alg
        key = (op, g, dtype.char)
        tuned = self._tuned.get(key)
        if tuned is not None:
            return self.algorithms.get(tuned)
        found = self._untuned.get(key)
        if found is not None:
            return found
        candidates = self.algorithms.candidates(op, g, dtype, self.deterministic, self.fp32_math)
        if not candidates:
            raise ValueError(f"no GPU algorithm supports {op} for x {g.x_shape}, weight {g.w_shape}, "
                             f"{dtype}")
        # A choice an earlier optimize() stored (maybe in another process) beats the heuristic.
        remembered = self._cached_choice(op, g, dtype, candidates)
        if remembered is not None:
            self._tuned[key] = remembered.name
            return remembered
        if self.autotune and len(candidates) > 1 and (inner or not self._forced):
            self.optimize(g, dtype, ops=(op,))
            return self.algorithms.get(self._tuned[key])
        if len(self._untuned) > 4096:
            self._untuned.clear()
        preferred = [a for a in candidates if a.preferred(op, g, dtype)]
        found = self._untuned[key] = (preferred or candidates)[0]
        return found

    @contextlib.contextmanager
    def force(self, op, name):
        """Within the block, run ``op`` (or every op when ``op`` is None) with algorithm ``name``."""
        ops = check_op(op, allow_all=True)
        self.algorithms.get(name)
        saved = dict(self._forced)
        self._forced.update({o: name for o in ops})
        try:
            yield self
        finally:
            self._forced = saved

    def optimize(self, geometry, dtype, ops=OPS, repeat=3):
        """Time the applicable algorithms once for this geometry and remember the fastest.

        The choice goes to this engine and to its autotuner (memory and the cache file),
        so later calls, and later processes on the same device and versions, use it
        without timing again.  Returns ``{op: name}``.  A forced algorithm still wins.
        """
        g = geometry if geometry.padding_mode == "zeros" else geometry.with_zero_padding()
        dtype = np.dtype(dtype)
        if dtype.name not in _FLOATS:
            raise TypeError(f"dtype must be float16, float32 or float64, got dtype={dtype}")
        if isinstance(ops, str):
            ops = (ops,)
        for op in ops:
            check_op(op)
        tuner, context = self._tuner_context()
        choice = {}
        arrays = None
        for op in ops:
            key = (op, g, dtype.char)
            if key in self._tuned:
                choice[op] = self._tuned[key]
                continue
            found = self.algorithms.candidates(op, g, dtype, self.deterministic, self.fp32_math)
            if not found:
                continue
            if len(found) == 1 or 0 in g.x_shape or 0 in g.y_shape or 0 in g.w_shape:
                self._tuned[key] = choice[op] = found[0].name
                continue
            if arrays is None:
                arrays = {name: cp.random.standard_normal(shape, dtype=np.float32).astype(dtype)
                          for name, shape in (("x", g.x_shape), ("w", g.w_shape), ("y", g.y_shape))}
            a, b = {"forward": ("x", "w"), "backward_input": ("y", "w"),
                    "backward_weight": ("x", "y")}[op]
            cands = {alg.name: (lambda alg=alg: alg.run(self, op, arrays[a], arrays[b], g)) for alg in found}
            best = tuner.tune(context, self._call_key(op, g, dtype), cands, timer=cuda_timer,
                              repeat=repeat)
            self._tuned[key] = choice[op] = best.algorithm
            self._untuned.pop(key, None)
        return choice

    def _call_key(self, op, g, dtype):
        # Arrays reach the algorithms C-contiguous (see _prepare), hence one layout.
        return autotune.call_key(op, g, np.dtype(dtype).name, layout="contiguous",
                                 deterministic=self.deterministic, workspace_limit=self.workspace_limit,
                                 fp32_math=self.fp32_math)

    def _tuner_context(self):
        return self.tuner, device_context(cp.cuda.runtime.getDevice())

    def _cached_choice(self, op, g, dtype, candidates):
        tuner, context = self._tuner_context()
        name = tuner.lookup(context, self._call_key(op, g, dtype))
        for alg in candidates:
            if alg.name == name:
                return alg
        return None

    # ------------------------------------------------------------ internals

    def _run(self, op, a, b, g, inner=False):
        alg = self.choose(op, g, a.dtype, inner)
        try:
            out = alg.run(self, op, a, b, g)
        except NotApplicable as e:
            if not inner and self._forced.get(op) is not None:
                raise RuntimeError(f"forced algorithm {alg.name!r} cannot run {op} here: {e}") from e
            # Only found out at run time: remember the next candidate for this call.
            rest = self.algorithms.candidates(op, g, a.dtype, self.deterministic, self.fp32_math)
            rest = rest[rest.index(alg) + 1:] if alg in rest else rest
            if not rest:
                raise
            self._tuned[(op, g, a.dtype.char)] = rest[0].name
            return self._run(op, a, b, g, inner)
        if not inner:
            self.last_algorithm[op] = alg.name
        return out

    def _prepare(self, op, g, *named):
        out = []
        dtype = None
        for name, arr, shape in named:
            if not isinstance(arr, cp.ndarray):
                raise TypeError(f"GPUEngine.{op}: {name} must be a CuPy array, got "
                                f"{type(arr).__module__}.{type(arr).__name__}")
            if arr.dtype.char not in "efd":          # float16, float32, float64
                raise TypeError(f"GPUEngine.{op}: {name} must be float16, float32 or float64, "
                                f"got {name}.dtype={arr.dtype}")
            if dtype is not None and arr.dtype != dtype:
                raise TypeError(f"GPUEngine.{op}: arrays must share one dtype, got {dtype} and {arr.dtype}")
            dtype = arr.dtype
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"GPUEngine.{op}: {name} must have shape {tuple(shape)} for this "
                                 f"geometry, got {name} of shape {tuple(arr.shape)}")
            out.append(cp.ascontiguousarray(arr))
        if g.padding_mode != "zeros":
            raise ValueError(f"GPUEngine.{op}: the engine takes zero-padded geometries, got "
                             f"padding_mode={g.padding_mode!r}")
        return out

    def _note(self, *arrays):
        self.peak_temp_bytes = max(self.peak_temp_bytes, sum(a.nbytes for a in arrays))
