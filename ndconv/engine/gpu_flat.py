"""Stride-1 convolution as one GEMM per kernel tap over flattened, padded arrays.

Lay x out channel-major and zero-padded, ``xf = (Cx, N*L)`` with every sample at the
same padded pitch (``L = prod(E)``, ``E = Y + d*(k-1)`` per dim), and gy the same
way, ``gf = (Cy, N*L)``, zero wherever a padded position is not an output.  Output
position ``q`` then reads tap ``k`` at ``q + off(k)`` with ``off(k) = sum k_i d_i
pitch_i``: a shifted view of ``xf``, no im2col copy.  So, per group,

* weight gradient: ``gw[k] = gf @ xf[:, off(k):off(k)+N*L].T``, one (Cy/G x Cx/G)
  GEMM with the whole batch in its inner dimension, per tap;
* forward: ``yf += w[k] @ xf[:, off(k):...]`` over the taps, cropped afterwards;
* input gradient: ``xf[:, off(k):...] += w[k].T @ gf`` over the taps.

Shifts never cross into another sample where it matters: a real output of sample n
only reads inside sample n's padded block, and the positions that do cross are
zeros of gf (or are cropped).  Taps run in a fixed order and cuBLAS is reproducible,
so results are deterministic.  Strided calls reach this through the ``phases``
algorithm (space-to-depth), dilated ones directly (the offsets scale with d).
"""
from __future__ import annotations

import math

import cupy as cp
import numpy as np
from cupy.lib.stride_tricks import as_strided

from . import gpu_blas, phases
from .phases import need_extent as extent     # stride 1: the outputs plus the kernel span
from .registry import FLOATS, OPS, Algorithm

_INT_MAX = 2 ** 31 - 1


def _pitch(ext):
    return tuple(math.prod(ext[i + 1:]) for i in range(len(ext)))


def _offsets(g, ext):
    pitch = _pitch(ext)
    return [sum(t * d * p for t, d, p in zip(tap, g.dilation, pitch)) for tap in np.ndindex(*g.kernel)]


class FlatGemm(gpu_blas.Fp32Twin, Algorithm):
    """One cuBLAS GEMM per kernel tap on the flat padded arrays; stride 1 only."""

    name = "flat_gemm"
    deterministic = True
    max_groups = 64          # past that the per-group GEMMs are too small to pay

    tf32x3_name = "flat_tf32x3"

    def supports(self, op, g, dtype):
        if self.tf32x3_refuses(op, g, dtype):
            return False
        if op not in OPS or g.nd not in (1, 2, 3) or np.dtype(dtype).name not in FLOATS:
            return False
        if not phases.unit_stride(g) or g.groups > self.max_groups or g.depthwise:
            return False
        ext = extent(g)
        length = g.batch * math.prod(ext)
        return length + self._tail(g, ext) <= _INT_MAX and max(g.x_channels, g.y_channels) <= _INT_MAX // max(1, length)

    def gemm_k(self, op, g):
        """The products each GEMM result sums (one GEMM per tap; taps add in float32)."""
        if op == "forward":
            return g.x_channels // g.groups
        if op == "backward_input":
            return g.y_channels // g.groups
        return g.batch * math.prod(extent(g))

    def preferred(self, op, g, dtype):
        # cuDNN's deterministic weight-gradient kernels are weak outside 2-D (measured on
        # an H200: 15.2 against 9.3 ms for a 64^3 UNet layer, 9.1 against 3.0 ms for a
        # 1-D audio layer); in 2-D cuDNN's stay ahead (0.58 against 1.27 ms, ResNet 3x3).
        return op == "backward_weight" and g.groups == 1 and g.nd != 2

    @staticmethod
    def _tail(g, ext):
        """Elements past the last sample that the shifted views of the last taps read."""
        return sum((k - 1) * d * p for k, d, p in zip(g.kernel, g.dilation, _pitch(ext)))

    def run(self, engine, op, a, b, g):
        dt = np.dtype(np.float32) if a.dtype == np.float16 else a.dtype
        ext = extent(g)
        # the flat x and y, and under tf32x3 the two parts of the split ones
        copies = 3 if gpu_blas.uses_tf32x3(dt, self.fp32_math) else 1
        per_sample = copies * dt.itemsize * math.prod(ext) * (g.x_channels + g.y_channels)
        compute = getattr(self, "_" + op)

        def part(n0, n1, gc):
            return compute(engine, a[n0:n1], b if op != "backward_weight" else b[n0:n1], gc, ext, dt)

        out = phases.run_in_chunks(cp, engine, op, g, per_sample, a.dtype, part)
        return out.astype(a.dtype, copy=False)

    # ------------------------------------------------------------------ layouts

    def _x_flat(self, engine, x, g, ext, dt):
        """(Cx, N*L + tail): x zero-padded at pitch L, channel-major."""
        total = g.batch * math.prod(ext)
        xf = cp.zeros((g.x_channels, total + self._tail(g, ext)), dtype=dt)
        view = xf[:, :total].reshape((g.x_channels, g.batch) + ext).swapaxes(0, 1)
        phases.copy_unpadded(x, view, g.pad_lo, 0)
        engine._note(xf)
        return xf

    def _y_flat(self, engine, gy, g, ext, dt):
        """(Cy, N*L): gy at the padded pitch, zeros elsewhere."""
        gf = cp.zeros((g.y_channels, g.batch * math.prod(ext)), dtype=dt)
        view = gf.reshape((g.y_channels, g.batch) + ext).swapaxes(0, 1)
        view[phases.leading(g.y_size)] = gy
        engine._note(gf)
        return gf

    @staticmethod
    def _grouped(flat, groups, start, width):
        """flat[:, start:start+width] as (G, C/G, width), a view."""
        c = flat.shape[0] // groups
        item = flat.itemsize
        ld = flat.shape[1]
        return as_strided(flat[:, start:], shape=(groups, c, width),
                          strides=(c * ld * item, ld * item, item))

    @staticmethod
    def _taps(w, g, dt):
        """w (Cy, Cx/G, *k) -> (K, G, Cy/G, Cx/G), contiguous."""
        yg, cg = g.y_channels // g.groups, g.x_channels // g.groups
        v = w.reshape(g.groups, yg, cg, g.taps).astype(dt, copy=False)
        return cp.ascontiguousarray(v.transpose(3, 0, 1, 2))

    # ------------------------------------------------------------------ the three ops

    def _forward(self, engine, x, w, g, ext, dt):
        xf = self._x_flat(engine, x, g, ext, dt)
        total = g.batch * math.prod(ext)
        yf = cp.empty((g.y_channels, total), dtype=dt)
        engine._note(xf, yf)
        out = self._grouped(yf, g.groups, 0, total)
        # Under tf32x3 every tap's GEMM reads views of one split of xf and of w.
        wt = gpu_blas.presplit(self._taps(w, g, dt), self.fp32_math)
        src = gpu_blas.presplit(xf, self.fp32_math)
        for tap, off in enumerate(_offsets(g, ext)):
            gpu_blas.matmul(gpu_blas.view(wt, lambda a: a[tap]),
                            gpu_blas.view(src, lambda a: self._grouped(a, g.groups, off, total)),
                            out=out, accumulate=tap > 0, fp32_math=self.fp32_math)
        engine._note(xf, yf, *gpu_blas.parts(src))
        y = yf.reshape((g.y_channels, g.batch) + ext)[phases.leading(g.y_size)]
        return cp.ascontiguousarray(y.swapaxes(0, 1), dtype=dt)

    def _backward_input(self, engine, gy, w, g, ext, dt):
        gf = self._y_flat(engine, gy, g, ext, dt)
        total = g.batch * math.prod(ext)
        xf = cp.zeros((g.x_channels, total + self._tail(g, ext)), dtype=dt)
        engine._note(gf, xf)
        wt = self._taps(w, g, dt).transpose(0, 1, 3, 2)             # (K, G, Cx/G, Cy/G)
        wt = gpu_blas.presplit(cp.ascontiguousarray(wt), self.fp32_math)
        src = gpu_blas.presplit(self._grouped(gf, g.groups, 0, total), self.fp32_math)
        for tap, off in enumerate(_offsets(g, ext)):
            gpu_blas.matmul(gpu_blas.view(wt, lambda a: a[tap]), src,
                            out=self._grouped(xf, g.groups, off, total), accumulate=True,
                            fp32_math=self.fp32_math)
        engine._note(gf, xf, *gpu_blas.parts(src))
        buf = xf[:, :total].reshape((g.x_channels, g.batch) + ext).swapaxes(0, 1)
        return phases.crop(cp, buf, g, dt)

    def _backward_weight(self, engine, x, gy, g, ext, dt):
        # One GEMM per tap with the whole batch as its inner dimension; cuBLAS splits that
        # long dimension itself.  (Splitting it here into batch entries was measured
        # slower on an H200 at every slice width: the slices' odd offsets cost cuBLAS its
        # vectorised loads.)
        xf = self._x_flat(engine, x, g, ext, dt)
        gf = self._y_flat(engine, gy, g, ext, dt)
        total = g.batch * math.prod(ext)
        yg, cg = g.y_channels // g.groups, g.x_channels // g.groups
        gw = cp.empty((g.taps, g.groups, yg, cg), dtype=dt)
        engine._note(xf, gf, gw)
        a = gpu_blas.presplit(self._grouped(gf, g.groups, 0, total), self.fp32_math)  # (G, Cy/G, N*L)
        xs = gpu_blas.presplit(xf, self.fp32_math)
        for tap, off in enumerate(_offsets(g, ext)):
            b = gpu_blas.view(xs, lambda v: self._grouped(v, g.groups, off, total).transpose(0, 2, 1))
            gpu_blas.matmul(a, b, out=gw[tap], fp32_math=self.fp32_math)  # b: (G, N*L, Cx/G)
        engine._note(xf, gf, gw, *gpu_blas.parts(a), *gpu_blas.parts(xs))
        return gw.transpose(1, 2, 3, 0).reshape(g.w_shape)
