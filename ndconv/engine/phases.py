"""Strided convolutions as stride-1 convolutions over phases; shared by every engine.

Output ``o`` of a strided convolution reads ``x[o*s + k*d]`` (padded coordinates).
With ``k*d = q*s + r`` that is phase ``r`` of x (every s-th element from r) at
``o + q``.  So:

* a strided **convolution** is a stride-1 convolution over x's ``S = prod(s)``
  phases stacked as channels (space-to-depth), with a kernel of ``Q = ceil`` taps
  per dim in which each phase holds the taps that fall on it;
* its **input gradient** (a strided transposed convolution) is a stride-1
  convolution of gy, fully padded by ``Q - 1``, whose ``S`` output phases are
  interleaved back (depth-to-space);
* its **weight gradient** is the stride-1 weight gradient over the phases, with
  the phase kernel gathered back to the real taps.

No zeros are inserted between input elements; the only waste is the taps a phase
lacks (none when the kernel is a multiple of the stride: k = s is a 1x1 per phase,
a single GEMM).  Every function takes the array module ``xp`` (NumPy or CuPy), and
the weight rearrangements are one gather through a tap index, so on a GPU each is
a few kernels whatever the kernel size.
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np

from . import array_module
from .registry import FLOATS as _FLOATS
from .registry import OPS, Algorithm


def unit_stride(g):
    return all(s == 1 for s in g.stride)


@functools.lru_cache(maxsize=512)
def _split(kernel, dilation, stride):
    r = [[(k * d) % s for k in range(n)] for n, d, s in zip(kernel, dilation, stride)]
    q = [[(k * d) // s for k in range(n)] for n, d, s in zip(kernel, dilation, stride)]
    extent = tuple(d * (n - 1) // s + 1 for n, d, s in zip(kernel, dilation, stride))
    return r, q, extent


def taps(g):
    """Per dim: each tap's phase r and offset q (k*d = q*s + r), and the taps per phase Q."""
    return _split(g.kernel, g.dilation, g.stride)


def waste(g):
    """Multiply-adds of the phase form over the real ones (taps a phase lacks are zeros)."""
    if unit_stride(g):
        return 1.0
    _, _, extent = taps(g)
    return math.prod(s * e for s, e in zip(g.stride, extent)) / g.taps


@functools.lru_cache(maxsize=512)
def geometry(g, transposed=False):
    """The stride-1 geometry of the phase form of ``g``.

    Convolution (``transposed=False``): x := the phases of the padded x, (N, G*S*Cx/G,
    *M) with M = Y - 1 + Q, kernel Q, no padding.  Transposed: x := gy (Cy channels),
    y := the phases of the padded x (G*S*Cx/G channels, M per dim), padding Q-1 on
    both sides.
    """
    phases = math.prod(g.stride)
    _, _, extent = taps(g)
    grid = tuple(o - 1 + e for o, e in zip(g.y_size, extent))
    ones, zeros = (1,) * g.nd, (0,) * g.nd
    if transposed:
        full = tuple(e - 1 for e in extent)
        return replace(g, x_channels=g.y_channels, y_channels=g.x_channels * phases, x_size=g.y_size,
                       y_size=grid, kernel=extent, stride=ones, dilation=ones, pad_lo=full, pad_hi=full)
    return replace(g, x_channels=g.x_channels * phases, x_size=grid, kernel=extent, stride=ones,
                   dilation=ones, pad_lo=zeros, pad_hi=zeros)


@functools.lru_cache(maxsize=256)
def _tap_index(kernel, dilation, stride, transposed):
    """For each (phase r, phase tap j) in C order, the real tap it holds, or K (none).

    Convolution: phase tap j = q.  Transposed (a correlation over gy padded by Q-1):
    phase tap j = Q-1-q.
    """
    r, q, extent = _split(kernel, dilation, stride)
    index = np.full(tuple(stride) + extent, math.prod(kernel), dtype=np.int64)
    for flat, tap in enumerate(np.ndindex(*kernel)):
        ph = tuple(r[i][t] for i, t in enumerate(tap))
        j = tuple((e - 1 - q[i][t]) if transposed else q[i][t] for i, (t, e) in enumerate(zip(tap, extent)))
        index[ph + j] = flat
    index.setflags(write=False)
    return index


_device_indices = {}


def _on(xp, index):
    """A cached host index array as an array of ``xp`` (one upload per device)."""
    if xp is np:
        return index
    key = (xp.cuda.runtime.getDevice(), id(index))
    found = _device_indices.get(key)
    if found is None or found[0] is not index:
        if len(_device_indices) > 1024:
            _device_indices.clear()
        found = _device_indices[key] = (index, xp.asarray(index))
    return found[1]


def _phase_taps(xp, w, lead, g, dt, transposed):
    """w (*lead, *kernel) -> (*lead, S*Q): each (phase, phase tap)'s real tap, zero where
    a phase lacks that tap (then w gets one zero tap appended to gather from)."""
    wk = xp.asarray(w, dtype=dt).reshape(lead + (-1,))
    if _identity(g.kernel, g.dilation, g.stride, transposed):    # k = s: phase r holds tap r
        return wk
    index = _tap_index(g.kernel, g.dilation, g.stride, transposed)
    if index.max() == wk.shape[-1]:
        wk = xp.concatenate([wk, xp.zeros(lead + (1,), dtype=dt)], axis=-1)
    return wk[..., _on(xp, index).reshape(-1)]


@functools.lru_cache(maxsize=512)
def _identity(kernel, dilation, stride, transposed):
    """True when the phase form's taps are the real taps in their own order."""
    index = _tap_index(kernel, dilation, stride, transposed).reshape(-1)
    return index.size == math.prod(kernel) and bool(np.array_equal(index, np.arange(index.size)))


@functools.lru_cache(maxsize=256)
def _gather_order(kernel, dilation, stride):
    """Positions of taps 0..K-1 in the phase kernel's flat (r, q) order."""
    order = np.argsort(_tap_index(kernel, dilation, stride, False).reshape(-1), kind="stable")
    order = order[:math.prod(kernel)]
    order.setflags(write=False)
    return order


def weight(xp, w, g, dt):
    """Kernel of the phase-form convolution: (Cy, G-block of (S, Cx/G), *Q)."""
    cg = g.x_channels // g.groups
    _, _, extent = taps(g)
    # ws[cy, c, r, q] = w[cy, c, k(r, q)], then channels ordered (r, c) within the group
    ws = _phase_taps(xp, w, (g.y_channels, cg), g, dt, False)
    ws = ws.reshape((g.y_channels, cg, math.prod(g.stride)) + extent).swapaxes(1, 2)
    return xp.ascontiguousarray(ws).reshape(geometry(g).w_shape)


def weight_transposed(xp, w, g, dt):
    """Kernel of the transposed phase form: (G*S*Cx/G, Cy/G, *Q), output channels (G, S, c)."""
    yg, cg = g.y_channels // g.groups, g.x_channels // g.groups
    _, _, extent = taps(g)
    s = math.prod(g.stride)
    # wp[g, o, c, r, j] = w[(g, o), c, k(r, j)]  ->  (g, r, c, o, j)
    wp = _phase_taps(xp, w, (g.groups, yg, cg), g, dt, True)
    wp = wp.reshape((g.groups, yg, cg, s) + extent).transpose((0, 3, 2, 1) + tuple(range(4, 4 + g.nd)))
    return xp.ascontiguousarray(wp).reshape(geometry(g, transposed=True).w_shape)


@functools.lru_cache(maxsize=256)
def _gather_identity(kernel, dilation, stride):
    """True when every phase tap is a real tap, in the real taps' order (e.g. k = s)."""
    order = _gather_order(kernel, dilation, stride)
    return (order.size == _tap_index(kernel, dilation, stride, False).size
            and bool(np.array_equal(order, np.arange(order.size))))


def weight_gather(xp, gw, g):
    """Weight gradient of the phase form back to the real taps: (Cy, Cx/G, *kernel)."""
    cg = g.x_channels // g.groups
    _, _, extent = taps(g)
    s = math.prod(g.stride)
    # (Cy, (r, c), *Q) -> (Cy, c, r*Q) -> the taps' entries
    v = gw.reshape((g.y_channels, s, cg, math.prod(extent))).swapaxes(1, 2)
    if _gather_identity(g.kernel, g.dilation, g.stride):    # (c, r*Q) is the kernel already
        return xp.ascontiguousarray(v).reshape(g.w_shape)
    v = v.reshape(g.y_channels, cg, -1)
    order = _on(xp, _gather_order(g.kernel, g.dilation, g.stride))
    return xp.ascontiguousarray(v[..., order]).reshape(g.w_shape)


def _gpu_shuffle(xp, a, g, grid, to_phases):
    """The GPU engine's one-kernel phase shuffle, for CuPy arrays (None elsewhere)."""
    if getattr(xp, "__name__", "") != "cupy":
        return None
    from .gpu import phase_shuffle
    return phase_shuffle(xp.ascontiguousarray(a), g.groups, g.stride, tuple(grid), to_phases)


def space_to_depth(xp, x, g, dt):
    """x (nb, Cx, *X) -> its padded phases (nb, G*S*Cx/G, *M), channels (G, S, Cx/G)."""
    nb = x.shape[0]
    grid = geometry(g).x_size
    size = tuple(s * m for s, m in zip(g.stride, grid))
    if not any(g.pad_lo) and tuple(x.shape[2:]) == size:
        padded = x.astype(dt, copy=False)        # nothing to pad or cut (e.g. k = s): x itself
    else:
        padded = xp.zeros((nb, g.x_channels) + size, dtype=dt)
        copy_unpadded(x, padded, g.pad_lo, 0)
    fast = _gpu_shuffle(xp, padded, g, grid, True)
    if fast is not None:
        return fast
    cg = g.x_channels // g.groups
    split = (nb, g.groups, cg) + tuple(v for m, s in zip(grid, g.stride) for v in (m, s))
    order = (0, 1) + tuple(4 + 2 * i for i in range(g.nd)) + (2,) + tuple(3 + 2 * i for i in range(g.nd))
    out = xp.ascontiguousarray(padded.reshape(split).transpose(order))
    return out.reshape((nb, g.x_channels * math.prod(g.stride)) + grid)


def depth_to_space(xp, ph, g):
    """Phase outputs (nb, G*S*Cx/G, *M) -> x's gradient (nb, Cx, *X), padding dropped."""
    nb, cg, nd = ph.shape[0], g.x_channels // g.groups, g.nd
    grid = ph.shape[2:]
    fast = _gpu_shuffle(xp, ph, g, grid, False)
    if fast is not None:
        return crop(xp, fast, g, ph.dtype)
    v = ph.reshape((nb, g.groups) + g.stride + (cg,) + tuple(grid))
    # n, g, r_0.., c, m_0..  ->  n, g, c, (m_0, r_0), (m_1, r_1), ..
    order = (0, 1, 2 + nd) + tuple(a for i in range(nd) for a in (3 + nd + i, 2 + i))
    full = v.transpose(order).reshape((nb, g.x_channels) + tuple(m * s for m, s in zip(grid, g.stride)))
    return crop(xp, full, g, ph.dtype)


def crop(xp, buf, g, dt):
    """The part of a padded-coordinate buffer (nb, Cx, *extent) that lies inside x, as a
    new (nb, Cx, *X) array; positions of x no window reaches are zero."""
    nb = buf.shape[0]
    src = [slice(None), slice(None)]
    covered = True
    for size, lo, extent in zip(g.x_size, g.pad_lo, buf.shape[2:]):
        r0, r1, s0 = overlap(size, lo, 0, extent)
        covered = covered and s0 == 0 and r1 - r0 == size
        src.append(slice(r0, max(r0, r1)))
    if covered:
        return xp.ascontiguousarray(buf[tuple(src)], dtype=dt)
    out = xp.zeros((nb, g.x_channels) + g.x_size, dtype=dt)
    add_unpadded(buf, out, g, 0, nb, 0)
    return out


# ---------------------------------------------------------------- dilation through the batch

@functools.lru_cache(maxsize=512)
def batch_geometry(g):
    """The undilated stride-1 geometry of a dilated one, with the D = prod(d) phases of x
    and y stacked into the batch (space-to-batch): output ``o = m*d + r`` reads
    ``x[(m + k)*d + r]``, i.e. phase r of the padded x at ``m + k``.  Each phase has
    ``ceil(Y/d)`` outputs (the few past Y read zeros and are dropped)."""
    m_out = tuple(-(-y // d) for y, d in zip(g.y_size, g.dilation))
    m_in = tuple(m + k - 1 for m, k in zip(m_out, g.kernel))
    zeros, ones = (0,) * g.nd, (1,) * g.nd
    return replace(g, batch=g.batch * math.prod(g.dilation), x_size=m_in, y_size=m_out, dilation=ones,
                   pad_lo=zeros, pad_hi=zeros, stride=ones)


def _to_batch(xp, buf, dilation):
    """(N, C, *(m*d)) -> (D*N, C, *m), phase-major."""
    n, c, nd = buf.shape[0], buf.shape[1], len(dilation)
    grid = tuple(e // d for e, d in zip(buf.shape[2:], dilation))
    v = buf.reshape((n, c) + tuple(a for m, d in zip(grid, dilation) for a in (m, d)))
    order = tuple(3 + 2 * i for i in range(nd)) + (0, 1) + tuple(2 + 2 * i for i in range(nd))
    return xp.ascontiguousarray(v.transpose(order)).reshape((-1, c) + grid)


def _from_batch(xp, b, dilation, n):
    """(D*N, C, *m) -> (N, C, *(m*d)), the inverse of _to_batch."""
    c, grid, nd = b.shape[1], b.shape[2:], len(dilation)
    v = b.reshape(tuple(dilation) + (n, c) + tuple(grid))
    order = (nd, nd + 1) + tuple(a for i in range(nd) for a in (nd + 2 + i, i))
    return v.transpose(order).reshape((n, c) + tuple(m * d for m, d in zip(grid, dilation)))


def x_to_batch(xp, x, g, dt):
    """x (N, Cx, *X) -> the padded phases (D*N, Cx, *m_in) of batch_geometry(g)."""
    gb = batch_geometry(g)
    buf = xp.zeros(x.shape[:2] + tuple(m * d for m, d in zip(gb.x_size, g.dilation)), dtype=dt)
    copy_unpadded(x, buf, g.pad_lo, 0)
    return _to_batch(xp, buf, g.dilation)


def y_to_batch(xp, y, g, dt):
    """y (N, Cy, *Y) -> (D*N, Cy, *m_out), zeros past Y."""
    gb = batch_geometry(g)
    buf = xp.zeros(y.shape[:2] + tuple(m * d for m, d in zip(gb.y_size, g.dilation)), dtype=dt)
    buf[leading(g.y_size)] = y
    return _to_batch(xp, buf, g.dilation)


class SpaceToBatch(Algorithm):
    """A dilated stride-1 call as one undilated call over the dilation phases stacked
    into the batch (see :func:`batch_geometry`); the undilated call goes back
    through the engine, where dense kernels (Winograd, implicit GEMM) are at home."""

    name = "space_to_batch"
    deterministic = True

    def supports(self, op, g, dtype):
        return (op in OPS and g.nd in (1, 2, 3) and np.dtype(dtype).name in _FLOATS
                and unit_stride(g) and any(d > 1 for d in g.dilation))

    def preferred(self, op, g, dtype):
        # Dense kernels (cuDNN's included) handle undilated calls far better: on an H200,
        # 1.13 against 2.72 ms for a 3x3 dilation-2 layer (256 channels, 64x64, N=16).
        # Depthwise calls keep their own kernels, which take any dilation directly.
        return not g.depthwise

    def run(self, engine, op, a, b, g):
        xp = array_module(a)
        dt = a.dtype
        gb = batch_geometry(g.with_batch(1))
        per_sample = 2 * dt.itemsize * math.prod(g.dilation) * (
            g.x_channels * math.prod(gb.x_size) + g.y_channels * math.prod(gb.y_size))
        inside = leading(g.y_size)

        def part(n0, n1, gc):
            if op == "forward":
                xb = x_to_batch(xp, a[n0:n1], gc, dt)
                engine._note(xb)
                yb = engine._run("forward", xb, b, batch_geometry(gc), inner=True)
                return xp.ascontiguousarray(_from_batch(xp, yb, g.dilation, n1 - n0)[inside])
            if op == "backward_input":
                yb = y_to_batch(xp, a[n0:n1], gc, dt)
                engine._note(yb)
                gxb = engine._run("backward_input", yb, b, batch_geometry(gc), inner=True)
                return crop(xp, _from_batch(xp, gxb, g.dilation, n1 - n0), gc, dt)
            xb, yb = x_to_batch(xp, a[n0:n1], gc, dt), y_to_batch(xp, b[n0:n1], gc, dt)
            engine._note(xb, yb)
            return engine._run("backward_weight", xb, yb, batch_geometry(gc), inner=True)

        return run_in_chunks(xp, engine, op, g, per_sample, dt, part)


def run_in_chunks(xp, engine, op, g, per_sample, dtype, part):
    """``part(n0, n1, geometry of the chunk)`` over batch chunks that fit the engine's
    workspace limit, put together: summed for the weight gradient (in chunk order),
    else placed along the batch of a ``dtype`` result."""
    out = None
    for n0, n1 in batch_chunks(engine, g, per_sample):
        piece = part(n0, n1, g if n1 - n0 == g.batch else g.with_batch(n1 - n0))
        if op == "backward_weight":
            out = piece if out is None else out + piece
        elif n0 == 0 and n1 == g.batch:
            return piece
        else:
            if out is None:
                out = xp.empty(g.y_shape if op == "forward" else g.x_shape, dtype=dtype)
            out[n0:n1] = piece
    return out


def batch_chunks(engine, g, per_sample):
    """(n0, n1) slices of the batch whose temporaries fit the engine's workspace limit."""
    nb = int(max(1, min(g.batch, engine.workspace_limit // max(1, per_sample))))
    return [(n0, min(g.batch, n0 + nb)) for n0 in range(0, g.batch, nb)]


# ---------------------------------------------------------------- padded coordinates

def need_extent(g):
    """Per dim, how much of the padded input the windows read: (o-1)s + d(k-1) + 1."""
    return tuple((o - 1) * s + d * (k - 1) + 1
                 for o, s, d, k in zip(g.y_size, g.stride, g.dilation, g.kernel))


def leading(size):
    """Index of the leading ``size`` positions of every spatial dim of an (N, C, ...) array."""
    return (slice(None), slice(None)) + tuple(slice(0, v) for v in size)


def overlap(size, lo, start, extent):
    """Buffer range [r0, r1) of a padded-coordinate buffer (first element at padded
    coordinate ``start``) that holds real positions of an axis of ``size``, and the
    real position s0 of r0."""
    r0 = max(0, lo - start)
    r1 = min(extent, size + lo - start)
    return r0, r1, r0 + start - lo


def copy_unpadded(x, buf, pad_lo, start0, channels_last=False):
    """Copy x (nb, C, *size) into a zeroed padded-coordinate buffer (nb, C, *extent);
    with ``channels_last`` both are (nb, *spatial, C)."""
    dst, src = [slice(None)] * (1 if channels_last else 2), [slice(None)] * (1 if channels_last else 2)
    spatial = slice(1, -1) if channels_last else slice(2, None)
    for i, (size, lo, extent) in enumerate(zip(x.shape[spatial], pad_lo, buf.shape[spatial])):
        r0, r1, s0 = overlap(size, lo, start0 if i == 0 else 0, extent)
        if r1 <= r0:
            return
        dst.append(slice(r0, r1))
        src.append(slice(s0, s0 + r1 - r0))
    buf[tuple(dst)] = x[tuple(src)]


def add_unpadded(buf, gx, g, n0, n1, start0):
    """Add the part of a padded-coordinate buffer (nb, Cx, *extent) that lies inside x.

    Padding, and any tail of x that no window reaches, get nothing.
    """
    dst, src = [slice(n0, n1), slice(None)], [slice(None), slice(None)]
    for i, (size, lo, extent) in enumerate(zip(g.x_size, g.pad_lo, buf.shape[2:])):
        r0, r1, s0 = overlap(size, lo, start0 if i == 0 else 0, extent)
        if r1 <= r0:
            return
        src.append(slice(r0, r1))
        dst.append(slice(s0, s0 + r1 - r0))
    gx[tuple(dst)] += buf[tuple(src)]


# ---------------------------------------------------------------- as an engine algorithm

class Phases(Algorithm):
    """A strided call as a stride-1 call over the input's phases (see the module docstring).

    Written for any array module; the GPU engine registers it.  The stride-1 call
    goes back through the engine (``engine._run(..., inner=True)``), so it runs with
    whichever algorithm wins there (cuDNN, the GEMM path, ...).  k = stride transposed
    convolutions become one 1x1 convolution (a GEMM) and a depth-to-space copy.
    """

    name = "phases"
    deterministic = True
    max_waste = 2.0      # phase taps over real taps: beyond that the zero taps cost too much

    def supports(self, op, g, dtype):
        return (op in OPS and g.nd in (1, 2, 3) and np.dtype(dtype).name in _FLOATS
                and not unit_stride(g) and waste(g) <= self.max_waste)

    def preferred(self, op, g, dtype):
        # The strided transposed convolution without wasted taps: cuDNN (and any
        # scatter) do it at a fraction of their dense rate; the phase form is dense.
        return op == "backward_input" and waste(g) == 1.0

    def run(self, engine, op, a, b, g):
        xp = array_module(a)
        dt = a.dtype
        per_sample = 2 * dt.itemsize * g.x_channels * math.prod(
            m * s for m, s in zip(geometry(g).x_size, g.stride))
        if op == "forward":
            w = weight(xp, b, g, dt)
        elif op == "backward_input":
            w = weight_transposed(xp, b, g, dt)

        def part(n0, n1, gc):
            whole = n1 - n0 == g.batch
            an = a if whole else a[n0:n1]
            if op == "forward":
                xs = space_to_depth(xp, an, gc, dt)
                engine._note(xs)
                return engine._run("forward", xs, w, geometry(gc), inner=True)
            if op == "backward_input":
                ph = engine._run("forward", an, w, geometry(gc, transposed=True), inner=True)
                engine._note(ph)
                return depth_to_space(xp, ph, gc)
            xs = space_to_depth(xp, an, gc, dt)
            engine._note(xs)
            return engine._run("backward_weight", xs, xp.ascontiguousarray(b if whole else b[n0:n1]),
                               geometry(gc), inner=True)

        out = run_in_chunks(xp, engine, op, g, per_sample, dt, part)
        return weight_gather(xp, out, g) if op == "backward_weight" else out
