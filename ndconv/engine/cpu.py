"""The NumPy engine: the three primitives, each with a few algorithms chosen per geometry.

Algorithms (``CPUEngine.algorithms``):

* ``flat``  - stride 1. Every kernel tap reads the flattened, padded sample at a
  fixed offset, so a block of im2col columns is one strided copy with a
  contiguous inner axis, and one BLAS GEMM per block does all taps at once.
  Outputs are computed at the padded row pitch; the wrap-around columns are
  dropped when copied out.  Strides > 1 reach this path through phases:
  ``x[o*s + k*d]`` with ``k*d = q*s + r`` reads phase ``r`` of x at ``o + q``, so a
  strided convolution is a stride-1 convolution over the s^nd phases stacked as
  channels (space-to-depth), and a strided *transposed* convolution is a
  stride-1 convolution whose s^nd output phases are interleaved (depth-to-space).
  No zeros are ever inserted into an input; the only waste is kernel taps that
  a phase lacks (none when the kernel is a multiple of the stride).
* ``flat_cf`` - the same with channels-first columns (weight @ columns); which
  of the two is faster depends on the shape, so the autotuner measures both.
* ``taps`` - stride 1 (or through phases) without any column copy: the batch is
  folded into the columns of one flat padded copy of x, and each kernel tap is
  one BLAS GEMM over a shifted view of it, added into an output block that stays
  in cache (``cpu_blas``: NumPy's own OpenBLAS, called with strides and beta = 1).
  For channel counts where per-tap GEMMs are large enough (at least
  ``TAPS_MIN_CHANNELS`` per group).
* ``direct`` - register-blocked compiled tiles (``cpu_direct``, numba) over a
  channels-last copy of the padded input: each tile keeps up to 6 outputs x 64
  channels in vector registers for the whole sum over taps and input channels.
  Strides natively in the forward and weight gradient; the input gradient is the
  flipped forward, or when strided one forward per phase of x over that phase's taps
  (written into x with step s: no phase shuffles, no missing-tap waste).  The untuned choice for kernels
  larger than 1x1 with at least 16 channels per group.
* ``depthwise`` - compiled loops (numba) when each group reads one channel; stride 1
  (forward, input gradient) through a register-blocked sliding kernel.
* ``grouped`` - compiled direct loops (numba) for a few channels per group, where
  the per-group GEMMs are too small for BLAS (see ``cpu_grouped``).
* ``im2col`` - the general fallback: gathered columns, GEMM, scatter-add (col2im).

Temporaries are bounded by ``workspace_limit`` by splitting the batch (and, for
im2col, the first output dim).  ``peak_temp_bytes`` records the largest seen.
"""
from __future__ import annotations

import functools
import math
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import autotune
from . import cpu_blas
from . import cpu_col2im
from . import cpu_depthwise as dw
from . import cpu_direct as cd
from . import cpu_grouped as gr
from . import phases
from .phases import need_extent

DEFAULT_WORKSPACE = 256 << 20
GROUPED_MAX = 32   # channels per group (in and out) up to which "grouped" may run; see supports
TAPS_MIN_CHANNELS = 16   # per group, in and out, for "taps": narrower per-tap GEMMs waste BLAS
OPS = ("forward", "backward_input", "backward_weight")
TUNE_SETTLE = 0.2   # seconds of pause before timing a candidate after another one (autotuning)
TUNE_ROUNDS = 5     # autotuning: round-robin rounds over the candidates at most (each keeps its fastest call) ...
TUNE_BUDGET = 2.5   # ... and no new round after this many seconds (2 rounds at least)
TUNE_PRUNE = 1.6    # autotuning: after the first round, candidates this much slower than the fastest drop out
TUNE_TIE = 0.1      # autotuning: the first of `algorithms` within this fraction of the fastest is chosen
FLAT_FAMILY = ("flat", "flat_cf", "taps", "direct")   # stride 1 at the padded pitch (strides via phases)


def compute_dtype(dtype):
    """float16 is computed (accumulated) in float32."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


class CPUEngine:
    name = "cpu"
    algorithms = ("depthwise", "grouped", "direct", "taps", "flat_cf", "flat", "im2col")

    def __init__(self, workspace_limit=DEFAULT_WORKSPACE):
        self.workspace_limit = workspace_limit
        self.peak_temp_bytes = 0
        self.block_bytes = 4 << 20    # column block of the flat path (measured: 1-8 MiB all close)
        # output block of the taps path, kept in L2 while every tap adds into it (measured on
        # 2 MiB of L2 per core: 2 MiB 1.2-1.5x faster than whole-batch GEMMs)
        self.taps_block_bytes = 2 << 20
        self.min_block = 256          # narrower GEMMs lose BLAS efficiency
        self.max_phase_waste = 1.3    # flat-through-phases when missing taps cost at most this
        self._forced = None
        self._tuned = {}
        self._untuned = {}   # heuristic choices, so the cache file is asked once per call shape
        #: op -> name of the algorithm that ran the last call of that op
        self.last_algorithm = {}
        # autotune: time the candidates on the first call of each (op, geometry, dtype)
        self.autotune = os.environ.get("NDCONV_AUTOTUNE", "") not in ("", "0")
        self.tuner = None   # an autotune.Autotuner; the shared one (with its cache file) by default

    # ------------------------------------------------------------ choosing an algorithm

    def supports(self, algorithm, op, g, itemsize=4):
        """Whether ``algorithm`` computes ``op`` for ``g`` within the workspace limit.

        flat and depthwise split only the batch, so one sample's temporaries must fit;
        im2col also splits rows and always fits.
        """
        one = self._sample_bytes(g, itemsize) <= self.workspace_limit
        if algorithm == "depthwise":
            return dw.AVAILABLE and g.x_channels == g.groups and g.groups > 1 and one
        if algorithm == "grouped":
            return (gr.AVAILABLE and g.groups > 1 and g.x_channels != g.groups
                    and g.x_channels // g.groups <= GROUPED_MAX and g.y_channels // g.groups <= GROUPED_MAX
                    and gr.buffer_bytes(g, itemsize, _threads()) <= self.workspace_limit)
        if algorithm == "direct":
            if not (cd.AVAILABLE and itemsize in (4, 8)):
                return False
            if op != "backward_input" or not phases.unit_stride(g):   # any stride, per phase
                return one
        if algorithm == "taps" and not (cpu_blas.AVAILABLE and g.x_channels // g.groups >= TAPS_MIN_CHANNELS
                                        and g.y_channels // g.groups >= TAPS_MIN_CHANNELS):
            return False
        if algorithm in FLAT_FAMILY:
            if op == "backward_input" and phases.unit_stride(g):
                # the flipped kernel needs non-negative complementary padding
                if any(lo > d * (k - 1) for lo, d, k in zip(g.pad_lo, g.dilation, g.kernel)):
                    return False
            return phases.waste(g) <= self.max_phase_waste and one
        return algorithm == "im2col"

    @staticmethod
    def _preferred(algorithm, g):
        """Whether the untuned choice may take a supported algorithm (autotuning times them all).

        The grouped loops lose to one GEMM per sample for 1x1 kernels (measured 2.5x
        slower with 16 channels per group); with a larger kernel they were at least as
        fast as the BLAS paths up to 32 channels per group.  The direct tiles lose on
        1x1 kernels too (4.7x on c2d_1x1) and waste lanes on narrow groups.
        """
        if algorithm == "direct":
            # register tiles pay once a tile's columns are filled; 1x1 kernels are one GEMM
            return g.taps > 1 and g.y_channels // g.groups >= 16 and g.x_channels // g.groups >= 16
        return not (algorithm == "grouped" and g.taps == 1)

    def choose(self, op, g, dtype):
        """Forced, else tuned (here or in the cache file), else autotuned, else the first supported."""
        algorithm = self.last_algorithm[op] = self._choose(op, g, dtype)
        return algorithm

    def _choose(self, op, g, dtype):
        itemsize = np.dtype(dtype).itemsize
        if self._forced is not None:
            if not self.supports(self._forced, op, g, itemsize):
                raise ValueError(f"algorithm {self._forced!r} does not support {op} for {g}")
            return self._forced
        key = (op, g, np.dtype(dtype).str)
        if key in self._tuned:
            return self._tuned[key]
        if key in self._untuned and not self.autotune:
            return self._untuned[key]
        candidates = [a for a in self.algorithms if self.supports(a, op, g, itemsize)]
        remembered = self._tuner().lookup(_context(), self._call_key(op, g, dtype))
        if remembered in candidates:
            self._tuned[key] = remembered
        elif self.autotune and len(candidates) > 1:
            self.optimize(g, dtype, ops=(op,))
        else:
            if len(self._untuned) > 4096:
                self._untuned.clear()
            preferred = [a for a in candidates if self._preferred(a, g)]
            self._untuned[key] = (preferred or candidates)[0]
            return self._untuned[key]
        return self._tuned[key]

    @contextmanager
    def force(self, algorithm):
        """Use one algorithm for every call inside the block (for tests and measurements)."""
        if algorithm not in self.algorithms:
            raise ValueError(f"algorithm must be one of {self.algorithms}, got algorithm={algorithm!r}")
        previous, self._forced = self._forced, algorithm
        try:
            yield
        finally:
            self._forced = previous

    def optimize(self, g, dtype=np.float32, ops=OPS, repeat=2):
        """Time every applicable algorithm for this geometry; later calls use the fastest.

        Candidates are timed round-robin (``repeat`` timed calls each per round, see
        ``Autotuner.tune_interleaved``).  The choice is kept in memory and in the autotune cache file, so later
        processes on this machine reuse it.  Returns ``{op: algorithm}``.
        """
        g = g if g.padding_mode == "zeros" else g.with_zero_padding()
        dtype = np.dtype(dtype)
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        rng = np.random.default_rng(0)
        arrays = {name: rng.standard_normal(shape).astype(dtype)
                  for name, shape in (("x", g.x_shape), ("w", g.w_shape), ("y", g.y_shape))}
        operands = {"forward": ("x", "w"), "backward_input": ("y", "w"), "backward_weight": ("x", "y")}
        chosen = {}
        for op in ops:
            if op not in OPS:
                raise ValueError(f"op must be one of {OPS}, got op={op!r}")
            found = [a for a in self.algorithms if self.supports(a, op, g, dtype.itemsize)]
            a, b = (arrays[name] for name in operands[op])

            def run(algorithm, op=op, a=a, b=b):
                with self.force(algorithm):
                    getattr(self, op)(a, b, g)
            candidates = {name: (lambda name=name: run(name)) for name in found}
            # Round-robin rounds, each candidate's timed calls after a TUNE_SETTLE pause
            # (worker threads still spinning from the previous one -- OpenBLAS's, another
            # library's OpenMP -- made the first candidate timed after them up to 2.6x
            # slow) and one untimed call; each keeps its fastest call.  Timings of one
            # candidate after another let a drift of the host's speed (1.5-2x, lasting
            # seconds) decide: direct 179 ms vs 67 ms for c2d_dilated, and the choice of
            # 5 of 18 strided rows changed between fresh runs.  Times within TUNE_TIE of
            # the fastest are noise here: the first in `algorithms` order among them wins.
            settle = TUNE_SETTLE if _threads() > 1 else 0.0
            best = self._tuner().tune_interleaved(
                _context(), self._call_key(op, g, dtype), candidates, rounds=TUNE_ROUNDS,
                calls=repeat, settle=settle, prune=TUNE_PRUNE, budget=TUNE_BUDGET,
                tie=TUNE_TIE)
            chosen[op] = self._tuned[(op, g, dtype.str)] = best.algorithm
        return chosen

    def _tuner(self):
        if self.tuner is None:
            self.tuner = _shared_tuner()
        return self.tuner

    def _call_key(self, op, g, dtype):
        return autotune.call_key(op, g, np.dtype(dtype).name, workspace_limit=self.workspace_limit)

    # ------------------------------------------------------------ the three primitives

    def forward(self, x, w, g):
        dt = compute_dtype(x.dtype)
        if 0 in g.y_shape or g.x_channels == 0:
            return np.zeros(g.y_shape, dtype=x.dtype)
        algorithm = self.choose("forward", g, dt)
        if algorithm == "depthwise":
            y = self._forward_depthwise(x, w, g, dt)
        elif algorithm == "grouped":
            y = self._forward_grouped(x, w, g, dt)
        elif algorithm == "direct":                     # strides natively, no phases
            y = np.empty(g.y_shape, dtype=dt)
            for n0, n1 in self._batches(g, dt):
                self._forward_direct(x[n0:n1], w, g.with_batch(n1 - n0), dt, y[n0:n1])
        elif algorithm in FLAT_FAMILY:
            y = np.empty(g.y_shape, dtype=dt)
            for n0, n1 in self._batches(g, dt):
                xs, ws, gs = _to_unit_stride(x[n0:n1], w, g.with_batch(n1 - n0), dt)
                self._forward_flat(xs, ws, gs, dt, y[n0:n1], algorithm)
        else:
            y = self._forward_im2col(x, w, g, dt)
        return y.astype(x.dtype, copy=False)

    def backward_input(self, gy, w, g):
        dt = compute_dtype(gy.dtype)
        if 0 in g.y_shape or 0 in g.x_shape:
            return np.zeros(g.x_shape, dtype=gy.dtype)
        algorithm = self.choose("backward_input", g, dt)
        # Paths that write every element get an uninitialised buffer: zeroing a reused
        # allocation costs a full pass over gx (2.8 of 12.9 ms for a 1-D depthwise layer).
        writes_all = algorithm in FLAT_FAMILY + ("grouped",) or (algorithm == "depthwise" and self._depthwise_flat_ok(g))
        gx = np.empty(g.x_shape, dtype=dt) if writes_all else np.zeros(g.x_shape, dtype=dt)
        if algorithm == "depthwise":
            self._backward_input_depthwise(gy, w, g, dt, gx)
        elif algorithm == "grouped":
            self._backward_input_grouped(gy, w, g, dt, gx)
        elif algorithm == "direct" and not phases.unit_stride(g):
            for n0, n1 in self._batches(g, dt):
                self._backward_input_direct(gy[n0:n1], w, g.with_batch(n1 - n0), dt, gx[n0:n1])
        elif algorithm in FLAT_FAMILY and phases.unit_stride(g):
            # The input gradient is a forward convolution of gy with the flipped,
            # group-transposed kernel and the complementary padding.
            g2 = _flipped_geometry(g)
            flipped = _flip_weight(w, g, dt)
            for n0, n1 in self._batches(g, dt):
                self._forward_flat(gy[n0:n1], flipped, g2.with_batch(n1 - n0), dt, gx[n0:n1], algorithm)
        elif algorithm in FLAT_FAMILY:
            # Each output phase r of x is a stride-1 "full" convolution of gy with the
            # taps k*d = q*s + r; all phases come out of one GEMM, then interleave.
            wp, gp = phases.weight_transposed(np, w, g, dt), phases.geometry(g, transposed=True)
            for n0, n1 in self._batches(g, dt):
                nb = n1 - n0
                out = np.empty((nb, gp.y_channels) + gp.y_size, dtype=dt)
                self._forward_flat(gy[n0:n1], wp, gp.with_batch(nb), dt, out, algorithm)
                gx[n0:n1] = phases.depth_to_space(np, out, g.with_batch(nb))
                self._note(out, gx[n0:n1])
        else:
            self._backward_input_im2col(gy, w, g, dt, gx)
        return gx.astype(gy.dtype, copy=False)

    def backward_weight(self, x, gy, g):
        dt = compute_dtype(x.dtype)
        if 0 in g.y_shape or g.x_channels == 0:
            return np.zeros(g.w_shape, dtype=x.dtype)
        algorithm = self.choose("backward_weight", g, dt)
        if algorithm == "depthwise":
            gw = self._backward_weight_depthwise(x, gy, g, dt)
        elif algorithm == "grouped":
            gw = self._backward_weight_grouped(x, gy, g, dt)
        elif algorithm == "direct":
            gw = None
            for n0, n1 in self._batches(g, dt):
                part = self._backward_weight_direct(x[n0:n1], gy[n0:n1], g.with_batch(n1 - n0), dt)
                gw = part if gw is None else gw + part
        elif algorithm in FLAT_FAMILY:
            gw = None
            for n0, n1 in self._batches(g, dt):
                xs, _, gs = _to_unit_stride(x[n0:n1], None, g.with_batch(n1 - n0), dt)
                part = self._backward_weight_flat(xs, gy[n0:n1], gs, dt, algorithm)
                gw = part if gw is None else gw + part
            if not phases.unit_stride(g):
                gw = phases.weight_gather(np, gw, g)
        else:
            gw = self._backward_weight_im2col(x, gy, g, dt)
        return gw.astype(x.dtype, copy=False)

    # ------------------------------------------------------------ flat (stride 1) columns

    def _flat_layout(self, g, dt):
        """Element pitch of a padded sample, flat extent L of the outputs, column block width."""
        need = need_extent(g)
        pitch = tuple(math.prod(need[i + 1:]) for i in range(g.nd))
        length = sum((o - 1) * p for o, p in zip(g.y_size, pitch)) + 1
        per_col = dt.itemsize * (g.x_channels * g.taps + 2 * g.y_channels)
        block = max(self.min_block, min(length, self.block_bytes // per_col))
        return pitch, length, block

    def _padded_last(self, x, g, n, dt):
        """Sample n zero-padded and channels-last, flattened: (prod(need), Cx)."""
        need = need_extent(g)
        buf = np.zeros(need + (g.x_channels,), dtype=dt)
        phases.copy_unpadded(np.moveaxis(x[n:n + 1], 1, -1), buf[None], g.pad_lo, 0, channels_last=True)
        return buf.reshape(-1, g.x_channels)

    def _flat_cols(self, flat, g, pitch, q0, width, buf):
        """Columns q0:q0+width of a flat channels-last sample into buf (G, width, K*Cx/G).

        Tap k of column p is row p + offset(k): for each tap a contiguous run of
        channels, so the copy streams whole rows.
        """
        cg = g.x_channels // g.groups
        item = flat.itemsize
        row = flat.strides[0]
        view = as_strided(flat[q0:], shape=(g.groups, width) + g.kernel + (cg,),
                          strides=(cg * item, row) + tuple(d * p * row for d, p in zip(g.dilation, pitch))
                          + (item,), writeable=False)
        out = buf[:, :width]
        np.copyto(out.reshape(view.shape), view)   # splitting an axis: always a view
        return out

    def _forward_flat(self, x, w, g, dt, y, mode="flat"):
        """y[...] = conv(x, w) for a stride-1 geometry, one sample at a time.

        Channels-last inside: columns (width, K*Cx/G) @ weight (K*Cx/G, Cy/G), the
        orientation BLAS runs fastest when channel counts are small; mode "flat_cf"
        takes the channels-first twin (faster for some grouped and wide shapes:
        measured), "taps" the copy-free per-tap GEMMs.
        """
        pitch, length, block = self._flat_layout(g, dt)
        cg, yg = g.x_channels // g.groups, g.y_channels // g.groups
        if _pointwise(g):   # the columns are x itself: one GEMM per sample, no copy
            wm = _weight_matrix(w, g, dt)                              # (G, Cy/G, Cx/G)
            xv = np.asarray(x, dtype=dt).reshape(g.batch, g.groups, cg, -1)
            np.matmul(wm, xv, out=y.reshape(g.batch, g.groups, yg, -1))
            return y
        if mode == "taps":
            return self._forward_taps(x, w, g, dt, y)
        if mode == "direct":
            return self._forward_direct(x, w, g, dt, y)
        if mode == "flat_cf":
            return self._forward_flat_first(x, w, g, dt, y)
        wl = _weight_last(w, g, dt)                                    # (G, K*Cx/G, Cy/G)
        full = np.empty((g.groups, length, yg), dtype=dt)              # y at padded pitch, channels-last
        buf = np.empty((g.groups, block, g.taps * cg), dtype=dt)
        item = full.itemsize
        valid = as_strided(full, shape=(g.groups, yg) + g.y_size,
                           strides=(length * yg * item, item) + tuple(p * yg * item for p in pitch),
                           writeable=False)
        for n in range(g.batch):
            flat = self._padded_last(x, g, n, dt)
            self._note(flat, full, buf)
            for q0 in range(0, length, block):
                width = min(block, length - q0)
                cols = self._flat_cols(flat, g, pitch, q0, width, buf)
                np.matmul(cols, wl, out=full[:, q0:q0 + width])
            y[n].reshape((g.groups, yg) + g.y_size)[...] = valid
        return y

    def _backward_weight_flat(self, x, gy, g, dt, mode="flat"):
        pitch, length, block = self._flat_layout(g, dt)
        cg, yg = g.x_channels // g.groups, g.y_channels // g.groups
        if _pointwise(g):
            xv = np.asarray(x, dtype=dt).reshape(g.batch, g.groups, cg, -1)
            gyv = np.asarray(gy, dtype=dt).reshape(g.batch, g.groups, yg, -1)
            return np.matmul(gyv, np.swapaxes(xv, 2, 3)).sum(axis=0).reshape(g.w_shape)
        if mode == "taps":
            return self._backward_weight_taps(x, gy, g, dt)
        if mode == "flat_cf":
            return self._backward_weight_flat_first(x, gy, g, dt)
        gwl = np.zeros((g.groups, g.taps * cg, yg), dtype=dt)          # (G, K*Cx/G, Cy/G)
        full = np.zeros((g.groups, length, yg), dtype=dt)               # gy at padded pitch, zero between rows
        buf = np.empty((g.groups, block, g.taps * cg), dtype=dt)
        item = full.itemsize
        rows = as_strided(full, shape=(g.groups, yg) + g.y_size,
                          strides=(length * yg * item, item) + tuple(p * yg * item for p in pitch))
        for n in range(g.batch):
            flat = self._padded_last(x, g, n, dt)
            self._note(flat, full, buf)
            rows[...] = gy[n].reshape((g.groups, yg) + g.y_size)
            for q0 in range(0, length, block):
                width = min(block, length - q0)
                cols = self._flat_cols(flat, g, pitch, q0, width, buf)
                gwl += np.matmul(np.swapaxes(cols, 1, 2), full[:, q0:q0 + width])
        # (G, *k, Cx/G, Cy/G) -> (G, Cy/G, Cx/G, *k) -> (Cy, Cx/G, *k)
        v = gwl.reshape((g.groups,) + g.kernel + (cg, yg))
        order = (0, g.nd + 2, g.nd + 1) + tuple(range(1, g.nd + 1))
        return np.ascontiguousarray(v.transpose(order)).reshape(g.w_shape)

    def _flat_cols_first(self, flat, g, pitch, q0, width, buf):
        """Columns q0:q0+width of one padded sample (Cx, prod(need)) into buf (G, Cx/G*K, width)."""
        cg = g.x_channels // g.groups
        item = flat.itemsize
        view = as_strided(flat[:, q0:], shape=(g.groups, cg) + g.kernel + (width,),
                          strides=(cg * flat.strides[0], flat.strides[0])
                          + tuple(d * p * item for d, p in zip(g.dilation, pitch)) + (item,),
                          writeable=False)
        out = buf[..., :width]
        np.copyto(out.reshape(view.shape), view)   # splitting an axis: always a view
        return out

    def _forward_flat_first(self, x, w, g, dt, y):
        """As :meth:`_forward_flat`, channels-first: weight (Cy/G, K*Cx/G) @ columns (K*Cx/G, width)."""
        pitch, length, block = self._flat_layout(g, dt)
        cg, yg = g.x_channels // g.groups, g.y_channels // g.groups
        wm = _weight_matrix(w, g, dt)                                  # (G, Cy/G, Cx/G*K)
        full = np.empty((g.groups, yg, length), dtype=dt)              # y at padded pitch
        buf = np.empty((g.groups, cg * g.taps, block), dtype=dt)
        item = full.itemsize
        valid = as_strided(full, shape=(g.y_channels,) + g.y_size,
                           strides=(length * item,) + tuple(p * item for p in pitch), writeable=False)
        for n in range(g.batch):
            flat = self._padded(x, g, n, n + 1, 0, g.y_size[0], dt).reshape(g.x_channels, -1)
            self._note(flat, full, buf)
            for q0 in range(0, length, block):
                width = min(block, length - q0)
                cols = self._flat_cols_first(flat, g, pitch, q0, width, buf)
                np.matmul(wm, cols, out=full[:, :, q0:q0 + width])
            y[n] = valid
        return y

    def _backward_weight_flat_first(self, x, gy, g, dt):
        pitch, length, block = self._flat_layout(g, dt)
        cg, yg = g.x_channels // g.groups, g.y_channels // g.groups
        gw = np.zeros((g.groups, yg, cg * g.taps), dtype=dt)
        full = np.zeros((g.groups, yg, length), dtype=dt)               # gy at padded pitch, zero between rows
        buf = np.empty((g.groups, cg * g.taps, block), dtype=dt)
        item = full.itemsize
        rows = as_strided(full, shape=(g.y_channels,) + g.y_size,
                          strides=(length * item,) + tuple(p * item for p in pitch))
        for n in range(g.batch):
            flat = self._padded(x, g, n, n + 1, 0, g.y_size[0], dt).reshape(g.x_channels, -1)
            self._note(flat, full, buf)
            rows[...] = gy[n]
            for q0 in range(0, length, block):
                width = min(block, length - q0)
                cols = self._flat_cols_first(flat, g, pitch, q0, width, buf)
                gw += np.matmul(full[:, :, q0:q0 + width], np.swapaxes(cols, 1, 2))
        return gw.reshape(g.w_shape)

    # ------------------------------------------------------------ taps: a strided GEMM per tap

    def _taps_layout(self, x, g, dt):
        """x (nb, Cx, *s) zero-padded and flattened with the batch folded into the columns.

        Returns (xf (Cx, nb*P + slack), need, tap offsets, nb*P): output column
        q = n*P + (its position at the padded pitch) reads xf[:, q + offset] for
        each tap; the slack after the last sample keeps every shifted view inside.
        """
        need = need_extent(g)
        pitch = [math.prod(need[i + 1:]) for i in range(g.nd)]
        offsets = [sum(k * d * p for k, d, p in zip(tap, g.dilation, pitch)) for tap in np.ndindex(*g.kernel)]
        length = g.batch * math.prod(need)
        xf = np.zeros((g.x_channels, length + offsets[-1]), dtype=dt)
        # (nb, Cx, *s) -> (Cx, nb, *s) into the (Cx, nb, *need) view of the first columns
        phases.copy_unpadded(np.swapaxes(x, 0, 1), xf[:, :length].reshape((g.x_channels, g.batch) + need),
                             g.pad_lo, 0)
        return xf, need, offsets, length

    def _taps_block(self, rows, itemsize):
        return max(1024, self.taps_block_bytes // (rows * itemsize))

    def _forward_taps(self, x, w, g, dt, y):
        """y = conv(x, w), stride 1: per column block, sum over taps of W_t @ xf[:, block + offset_t]."""
        xf, need, offsets, length = self._taps_layout(x, g, dt)
        cg, yg, ng = g.x_channels // g.groups, g.y_channels // g.groups, g.groups
        # (Cy, Cx/G, *k) -> (K, G, Cy/G, Cx/G): one (Cy/G, Cx/G) matrix per tap and group
        wt = np.ascontiguousarray(np.asarray(w, dtype=dt).reshape(ng, yg, cg, -1).transpose(3, 0, 1, 2))
        full = np.empty((g.y_channels, length), dtype=dt)        # y at the padded pitch
        self._note(xf, full)
        ldx = xf.shape[1]
        block = self._taps_block(yg, dt.itemsize)
        for q0 in range(0, length, block):
            width = min(block, length - q0)
            for t, off in enumerate(offsets):
                for j in range(ng):
                    cpu_blas.gemm(wt, (t * ng + j) * yg * cg, (yg, cg), cg,
                                  xf, j * cg * ldx + q0 + off, (cg, width), ldx,
                                  full, j * yg * length + q0, length, 0.0 if t == 0 else 1.0)
        # (Cy, nb, *need) -> the outputs' leading corner -> (nb, Cy, *out)
        valid = full.reshape((g.y_channels, g.batch) + need)[phases.leading(g.y_size)]
        y[...] = np.swapaxes(valid, 0, 1)
        return y

    def _backward_weight_taps(self, x, gy, g, dt):
        """gw_t = sum over columns of gy (zero between rows) times xf shifted by tap t."""
        xf, need, offsets, length = self._taps_layout(x, g, dt)
        cg, yg, ng = g.x_channels // g.groups, g.y_channels // g.groups, g.groups
        gyf = np.zeros((g.y_channels, length), dtype=dt)
        gyf.reshape((g.y_channels, g.batch) + need)[phases.leading(g.y_size)] = np.swapaxes(gy, 0, 1)
        gwt = np.empty((len(offsets), ng, yg, cg), dtype=dt)     # (K, G, Cy/G, Cx/G)
        self._note(xf, gyf, gwt)
        ldx = xf.shape[1]
        block = self._taps_block(max(yg, cg), dt.itemsize)
        for q0 in range(0, length, block):
            width = min(block, length - q0)
            for t, off in enumerate(offsets):
                for j in range(ng):
                    cpu_blas.gemm(gyf, j * yg * length + q0, (yg, width), length,
                                  xf, j * cg * ldx + q0 + off, (cg, width), ldx,
                                  gwt, (t * ng + j) * yg * cg, cg, 0.0 if q0 == 0 else 1.0, trans_b=True)
        # (K, G, Cy/G, Cx/G) -> (G, Cy/G, Cx/G, K) -> (Cy, Cx/G, *k)
        return np.ascontiguousarray(gwt.transpose(1, 2, 3, 0)).reshape(g.w_shape)

    # ------------------------------------------------------------ direct: register tiles, channels last

    def _direct_grid(self, g):
        """The padded grid the windows read (channels-last rows of xl) and the tap offsets on it."""
        need = need_extent(g)
        pitch = [math.prod(need[i + 1:]) for i in range(g.nd)]
        offsets = np.array([sum(k * d * p for k, d, p in zip(tap, g.dilation, pitch)) for tap in np.ndindex(*g.kernel)],
                           dtype=np.int64)
        return need, offsets

    def _direct_pack(self, a, channels, size, lo, need, rows, columns, dt):
        """a (nb, channels, *size) -> (rows, len(columns)) channels last on the padded grid
        ``need``; ``columns[j]`` is the channel in column j, or -1 for a zero column."""
        src = cd.position_map(a.shape[0], need, size, lo, channels, rows)
        plane = math.prod(size)
        cmap = np.where(columns >= 0, columns * plane, -1).astype(np.int64)
        out = cd.aligned_empty((rows, len(columns)), dt)
        cd.pack(np.ascontiguousarray(a, dtype=dt).reshape(-1), src, cmap, plane, out)
        return out

    @staticmethod
    def _direct_columns(g, dt, per_group=None):
        """Output channels padded per group to whole vectors: (Cy/G padded, column of each
        channel, vectors per tile, the tile rows of every column block).  ``per_group``:
        another count of output channels per group (the input gradient's Cx/G)."""
        yg = g.y_channels // g.groups if per_group is None else per_group
        lanes = cd.lanes(dt)
        ygp = cd.round_up(yg, lanes)
        c = np.arange(yg * g.groups)
        nv = cd.vectors(ygp, dt)
        tail = (ygp % (nv * lanes)) // lanes
        rows = {cd.MR_FOR[nv]} | ({cd.MR_FOR[tail]} if tail else set())
        return ygp, (c // yg) * ygp + c % yg, nv, rows

    @staticmethod
    def _direct_plan(items, seg, cg, groups, ygp, nv, tile_rows, dt, stride=1):
        """(rows of a segment in a job's tile, segments per job) of cpu_direct.forward."""
        pitch = max(cd.round_up(seg, r) for r in tile_rows)
        # jobs: runs of segments whose rows of xl (stride: positions per output) fit
        # BLOCK_BYTES, times groups and column blocks; at least 8 per thread where there
        # are enough segments.  Strided: STRIDED_BLOCK_BYTES and at least 16 per thread
        # (t3d_k4s2p1's 256 rows in 19 jobs lost 5% to the imbalance).
        blocks = -(-ygp // (nv * cd.lanes(dt))) * groups
        block, least = (cd.BLOCK_BYTES, 8) if stride == 1 else (cd.STRIDED_BLOCK_BYTES, 16)
        per_job = max(1, block // (pitch * stride * cg * dt.itemsize))
        return pitch, max(1, min(per_job, len(items) * blocks // (least * _threads())))

    def _forward_direct(self, x, w, g, dt, y):
        """y = conv(x, w), any stride: cpu_direct's register tiles over channels-last rows."""
        need, offsets = self._direct_grid(g)
        cg, yg, ng = g.x_channels // g.groups, g.y_channels // g.groups, g.groups
        ygp, cols, nv, tile_rows = self._direct_columns(g, dt)
        items, _ = cd.segments(g, cd.SEGMENT)
        pitch, per_job = self._direct_plan(items, min(g.y_size[-1], cd.SEGMENT), cg, ng, ygp, nv, tile_rows, dt,
                                           math.prod(g.stride))
        # the last tile of a segment reads up to 15 positions past its end
        xl = self._direct_pack(x, g.x_channels, g.x_size, g.pad_lo, need,
                               g.batch * math.prod(need) + 16 * g.stride[-1], np.arange(g.x_channels), dt)
        # (Cy, Cx/G, *k) -> (G, K, Cx/G, Cy/G), output channels padded with zeros
        wl = cd.aligned_empty((ng, g.taps, cg, ygp), dt)
        cd.weights(np.ascontiguousarray(w, dtype=dt).reshape(ng, yg, cg, g.taps), _all_taps(g.taps), False, wl)
        self._note(xl, wl)
        if not y.flags.c_contiguous:
            raise ValueError("direct: the output buffer must be C-contiguous")
        kc = cd.forward_chunk(cg, g.taps, nv)
        cd.forward(xl, wl, offsets, ng, cg, yg, nv, kc, items, g.stride[-1], pitch, per_job,
                   math.prod(g.y_size), 1, y.reshape(-1))
        return y

    def _backward_input_direct(self, gy, w, g, dt, gx):
        """gx = the transposed convolution of gy for a strided g, one direct forward per phase
        of gx: x index i = m*s + r - lo gets the taps k with k*d = q*s + r, which read gy at
        m - q; the phase's outputs go to gx with step s.  No phase shuffles, no waste."""
        cg, yg, ng = g.x_channels // g.groups, g.y_channels // g.groups, g.groups
        need, lo, parts = cd.transposed_phases(g)
        ygp, _, nv, tile_rows = self._direct_columns(g, dt, per_group=cg)
        grid = math.prod(need)
        xl = self._direct_pack(gy, g.y_channels, g.y_size, lo, need, g.batch * grid + 16,
                               np.arange(g.y_channels), dt)
        wk = np.ascontiguousarray(w, dtype=dt).reshape(ng, yg, cg, g.taps)
        if any(taps.size == 0 for _, taps, _ in parts):
            gx[...] = 0                                 # phases that no tap reaches
        used = [part for part in parts if part[1].size and part[0].shape[0]]
        if ng == 1 and used:
            # one group: every phase's kernel in one pass over w, whose lines each hold all the
            # taps of a channel pair (a pass per phase: t2d_dcgan_k4s2 1.4-2.4 ms in all)
            wall = cd.aligned_empty((1, sum(taps.size for _, taps, _ in used), yg, ygp), dt)
            cd.weights(wk, np.concatenate([taps for _, taps, _ in used]), True, wall)
        first = 0
        for items, taps, offsets in used:
            # (G, Cy/G, Cx/G, K) -> (G, T, Cy/G, Cx/G padded) for this phase's taps
            if ng == 1:
                wl, first = wall[:, first:first + taps.size], first + taps.size
            else:
                wl = cd.aligned_empty((ng, taps.size, yg, ygp), dt)
                cd.weights(wk, taps, True, wl)
            self._note(xl, wall if ng == 1 else wl)
            seg = int(items[:, 2].max())
            pitch, per_job = self._direct_plan(items, seg, yg, ng, ygp, nv, tile_rows, dt)
            kc = cd.forward_chunk(yg, taps.size, nv)
            cd.forward(xl, wl, offsets, ng, yg, cg, nv, kc, items, 1, pitch, per_job,
                       math.prod(g.x_size), g.stride[-1], gx.reshape(-1))
        return gx

    def _backward_weight_direct(self, x, gy, g, dt):
        """gw_t = sum over output positions of x at the tap's window position times gy."""
        need, offsets = self._direct_grid(g)
        cg, yg, ng = g.x_channels // g.groups, g.y_channels // g.groups, g.groups
        ygp, cols, nv, tile_rows = self._direct_columns(g, dt)
        cgp = cd.round_up(cg, math.lcm(*tile_rows))
        _, items = cd.segments(g, cd.SEGMENT)
        ycols = np.full(ng * ygp, -1)
        ycols[cols] = np.arange(g.y_channels)
        gyl = self._direct_pack(gy, g.y_channels, g.y_size, (0,) * g.nd, g.y_size,
                                g.batch * math.prod(g.y_size), ycols, dt)
        positions = cd.GRADIENT_BYTES // (((ng - 1) * cg + cgp + gyl.shape[1]) * dt.itemsize)
        chunk = max(1, positions // min(g.y_size[-1], cd.SEGMENT))
        # Few positions for gw's size (strided, small outputs): PARTS copies of gw to write
        # and sum cost more than a barrier per run (c2d_resnet_s2 0.84-0.90, t2d_dcgan_k4s2
        # 0.85, t3d_unet_k2s2 0.75-0.90 of the parts' time; c2d_resnet3x3 1.2 by runs).
        part_bytes = cd.PARTS * g.taps * ng * cgp * ygp * dt.itemsize
        runs = cd.GRADIENT_RUNS
        if runs is None:
            runs = part_bytes >= cd.RUNS_BYTES * g.batch * math.prod(g.y_size)
        # Unpadded windows read x itself (channel pitch x_size) rather than a channels-last
        # copy: packing x was the largest cost of the k2s2 gradients (t3d_unet_k2s2 2.7 of ~9 ms).
        unpacked = cd.GRADIENT_UNPACKED and self._direct_unpadded(g) and cd.gradient_tiles(cg, tile_rows)
        if unpacked:
            x_pitch = [math.prod(g.x_size[i + 1:]) for i in range(g.nd)]
            x_taps = np.array([sum(k * d * p for k, d, p in zip(tap, g.dilation, x_pitch))
                               for tap in np.ndindex(*g.kernel)], dtype=np.int64)
            src = cd.position_map(g.batch, need, g.x_size, (0,) * g.nd, g.x_channels, g.batch * math.prod(need))
            parts = cd.aligned_empty((1 if runs else cd.PARTS, g.taps, ng, cgp, ygp), dt)
            self._note(gyl, parts)
            xf, plane = np.ascontiguousarray(x, dtype=dt).reshape(-1), math.prod(g.x_size)
            if runs:
                cd.weight_grad_unpacked(xf, plane, x_taps, src[items[:, 0]], g.stride[-1], gyl, parts[0],
                                        ng, cg, nv, items, cd.gradient_runs(items, chunk))
            else:
                cd.weight_grad_parts_unpacked(xf, plane, x_taps, src[items[:, 0]], g.stride[-1], gyl, parts,
                                              ng, cg, nv, items, chunk)
        else:
            xcols = np.arange((ng - 1) * cg + cgp)
            xl = self._direct_pack(x, g.x_channels, g.x_size, g.pad_lo, need, g.batch * math.prod(need),
                                   np.where(xcols < g.x_channels, xcols, -1), dt)
            parts = cd.aligned_empty((1 if runs else cd.PARTS, g.taps, ng, cgp, ygp), dt)
            self._note(xl, gyl, parts)
            if runs:
                cd.weight_grad_runs(xl, gyl, offsets, parts[0], ng, cg, nv, items, g.stride[-1],
                                    cd.gradient_runs(items, chunk))
            else:
                cd.weight_grad(xl, gyl, offsets, parts, ng, cg, nv, items, g.stride[-1], chunk)
        gw = np.empty((ng, yg, cg, g.taps), dtype=dt)                 # (G, Cy/G, Cx/G, K)
        cd.sum_parts(parts, cg, yg, gw)
        return gw.reshape(g.w_shape)

    @staticmethod
    def _direct_unpadded(g):
        """Whether every window lies inside x (no padding read): the weight gradient may read x itself."""
        return not any(g.pad_lo) and all(n <= s for n, s in zip(need_extent(g), g.x_size))

    # ------------------------------------------------------------ depthwise: compiled loops

    def _depthwise_args(self, g):
        return (dw.pad3(g.stride, g.nd, 1) + dw.pad3(g.dilation, g.nd, 1)
                + (g.y_channels // g.groups,))

    def _kernel5(self, w, g, dt):
        return np.ascontiguousarray(w, dtype=dt).reshape((g.y_channels,) + dw.pad3(g.kernel, g.nd, 1))

    def _flat_plan(self, g):
        """Tap offsets into a flat padded plane, and the padded plane's dims (as 3)."""
        need = need_extent(g)
        pitch = [math.prod(need[i + 1:]) for i in range(g.nd)]
        offsets = np.zeros(1, dtype=np.int64)
        for k, d, p in zip(g.kernel, g.dilation, pitch):
            offsets = (offsets[:, None] + np.arange(k) * d * p).reshape(-1)
        return offsets, dw.pad3(g.pad_lo, g.nd, 0) + dw.pad3(need, g.nd, 1)

    def _forward_depthwise(self, x, w, g, dt):
        y = np.empty(g.y_shape, dtype=dt)
        if phases.unit_stride(g):
            offsets, plane = self._flat_plan(g)
            wk = np.ascontiguousarray(w, dtype=dt).reshape(-1)
            xc = np.ascontiguousarray(x, dtype=dt)
            self._slide(xc, wk, offsets, y, plane, g, False)
            return y
        for n0, n1 in self._batches(g, dt):
            xp = self._padded(x, g, n0, n1, 0, g.y_size[0], dt)
            self._note(xp)
            dw.forward(dw.as5d(xp, g.nd), self._kernel5(w, g, dt), dw.as5d(y[n0:n1], g.nd),
                       *self._depthwise_args(g))
        return y

    @staticmethod
    def _slide(src, wk, offsets, out, plane, g, gather):
        """Stride 1 through the sliding kernel (``cpu_depthwise.slide_taps``): ``g`` is the
        forward geometry of the pass (for the input gradient the flipped one), out its y.
        Planes of one row (1-D) are read in place (``slide_row``); other planes are padded
        into a buffer first; planes of one output row go straight into out, planes of several rows are
        computed at the padded pitch and copied out (measured: per-row calls lose up to
        2x on short rows, the flat pass adds a copy that costs ~20% on one long row)."""
        mult = max(g.y_channels, g.x_channels) // g.groups
        # one padded row per plane, and one row in src: read it in place (1-D).  (A source
        # of several rows can still pad to one: the rows past it only meet padding.)
        if plane[3] * plane[4] == 1 and math.prod(src.shape[2:-1]) == 1:
            dw.slide_row(src.reshape(src.shape[:2] + (-1,)), wk, offsets, out.reshape(out.shape[:2] + (-1,)),
                         plane[2], mult, gather)
            return
        size = dw.pad3(g.y_size, g.nd, 1)
        dw.slide_taps(dw.as5d(src, g.nd), wk, offsets, out.reshape(out.shape[:2] + (-1,)), *size, *plane,
                      mult, gather, size[0] * size[1] == 1)

    @staticmethod
    def _depthwise_flat_ok(g):
        """The depthwise input gradient is one flat-taps pass (which stores every element)."""
        return phases.unit_stride(g) and all(lo <= d * (k - 1) for lo, d, k in zip(g.pad_lo, g.dilation, g.kernel))

    def _backward_input_depthwise(self, gy, w, g, dt, gx):
        if self._depthwise_flat_ok(g):
            # as for dense kernels: a forward pass over gy with the flipped kernel
            g2 = _flipped_geometry(g)
            offsets, plane = self._flat_plan(g2)
            flipped = np.ascontiguousarray(
                np.asarray(w, dtype=dt)[(slice(None), 0) + (slice(None, None, -1),) * g.nd]).reshape(-1)
            gyc = np.ascontiguousarray(gy, dtype=dt)
            self._slide(gyc, flipped, offsets, gx, plane, g2, True)
            return gx
        for n0, n1 in self._batches(g, dt):
            buf = np.zeros((n1 - n0, g.x_channels) + need_extent(g), dtype=dt)
            gyc = np.ascontiguousarray(gy[n0:n1], dtype=dt)
            self._note(buf, gyc)
            dw.backward_input(dw.as5d(gyc, g.nd), self._kernel5(w, g, dt), dw.as5d(buf, g.nd),
                              *self._depthwise_args(g))
            phases.add_unpadded(buf, gx, g, n0, n1, 0)
        return gx

    def _backward_weight_depthwise(self, x, gy, g, dt):
        if phases.unit_stride(g):
            offsets, plane = self._flat_plan(g)
            gw = np.empty((g.y_channels, g.taps), dtype=dt)
            dw.flat_backward_weight(dw.as5d(np.ascontiguousarray(x, dtype=dt), g.nd),
                                    dw.as5d(np.ascontiguousarray(gy, dtype=dt), g.nd), offsets, gw, *plane,
                                    g.y_channels // g.groups)
            return gw.reshape(g.w_shape)
        gw = np.zeros((g.y_channels,) + dw.pad3(g.kernel, g.nd, 1), dtype=dt)
        part = np.empty_like(gw)
        for n0, n1 in self._batches(g, dt):
            xp = self._padded(x, g, n0, n1, 0, g.y_size[0], dt)
            gyc = np.ascontiguousarray(gy[n0:n1], dtype=dt)
            self._note(xp, gyc)
            dw.backward_weight(dw.as5d(xp, g.nd), dw.as5d(gyc, g.nd), part, *self._depthwise_args(g))
            gw += part
        return gw.reshape(g.w_shape)

    # ------------------------------------------------------------ grouped: compiled loops

    def _forward_grouped(self, x, w, g, dt):
        off, lo, s, grid = gr.conv_plan(g)
        y = np.empty(g.y_shape, dtype=dt)
        wk = np.ascontiguousarray(w, dtype=dt).reshape(g.y_channels, -1)
        gr.forward(dw.as5d(np.ascontiguousarray(x, dtype=dt), g.nd), wk, off, dw.as5d(y, g.nd), g.groups,
                   lo, s, grid)
        self._note_grouped(g, dt)
        return y

    def _backward_input_grouped(self, gy, w, g, dt, gx):
        off, starts, cols, plo, pgrid, s, lo, mlo, ngrid = gr.transposed_plan(g)
        wt = gr.transposed_weight(w, g, cols, dt)
        gr.backward_input(dw.as5d(np.ascontiguousarray(gy, dtype=dt), g.nd), wt, off, starts, dw.as5d(gx, g.nd),
                          g.groups, plo, pgrid, s, lo, mlo, ngrid)
        self._note_grouped(g, dt)
        return gx

    def _backward_weight_grouped(self, x, gy, g, dt):
        off, lo, s, grid = gr.conv_plan(g)
        gw = np.empty((g.y_channels, len(off)), dtype=dt)
        gr.backward_weight(dw.as5d(np.ascontiguousarray(x, dtype=dt), g.nd),
                           dw.as5d(np.ascontiguousarray(gy, dtype=dt), g.nd), off, gw, g.groups, lo, s, grid)
        self._note_grouped(g, dt)
        return gw.reshape(g.w_shape)

    def _note_grouped(self, g, dt):
        # the loops' buffers live inside numba; record their bound
        self.peak_temp_bytes = max(self.peak_temp_bytes, gr.buffer_bytes(g, dt.itemsize, _threads()))

    # ------------------------------------------------------------ im2col (general)

    def _forward_im2col(self, x, w, g, dt):
        y = np.empty(g.y_shape, dtype=dt)
        wm = _weight_matrix(w, g, dt)                        # (G, Cy/G, Cx/G*K)
        for n0, n1, a, b in self._chunks(g, dt.itemsize):
            cols = self._im2col(x, g, n0, n1, a, b, dt)      # (nb, G, Cx/G*K, P)
            res = np.matmul(wm, cols)                        # (nb, G, Cy/G, P)
            y[n0:n1, :, a:b] = res.reshape((n1 - n0, g.y_channels, b - a) + g.y_size[1:])
        return y

    def _backward_input_im2col(self, gy, w, g, dt, gx):
        wt = np.swapaxes(_weight_matrix(w, g, dt), 1, 2)     # (G, Cx/G*K, Cy/G)
        for n0, n1, a, b in self._chunks(g, dt.itemsize):
            gyc = _rows(gy, g, n0, n1, a, b, dt)             # (nb, G, Cy/G, P)
            gcols = np.matmul(wt, gyc)                       # (nb, G, Cx/G*K, P)
            self._col2im_add(gcols, gx, g, n0, n1, a, b)
        return gx

    def _backward_weight_im2col(self, x, gy, g, dt):
        gw = np.zeros((g.groups, g.y_channels // g.groups, (g.x_channels // g.groups) * g.taps), dtype=dt)
        for n0, n1, a, b in self._chunks(g, dt.itemsize):
            cols = self._im2col(x, g, n0, n1, a, b, dt)      # (nb, G, Cx/G*K, P)
            gyc = _rows(gy, g, n0, n1, a, b, dt)             # (nb, G, Cy/G, P)
            gw += np.matmul(gyc, np.swapaxes(cols, 2, 3)).sum(axis=0)
        return gw.reshape(g.w_shape)

    def _im2col(self, x, g, n0, n1, a, b, dt):
        padded = self._padded(x, g, n0, n1, a, b, dt)
        nb, cg = n1 - n0, g.x_channels // g.groups
        out = (b - a,) + g.y_size[1:]
        st = padded.strides
        view = as_strided(
            padded,
            shape=(nb, g.groups, cg) + g.kernel + out,
            strides=(st[0], cg * st[1], st[1])
            + tuple(d * s for d, s in zip(g.dilation, st[2:]))
            + tuple(s_ * s for s_, s in zip(g.stride, st[2:])),
            writeable=False)
        cols = np.empty(view.shape, dtype=dt)
        np.copyto(cols, view)
        self._note(padded, cols)
        return cols.reshape(nb, g.groups, cg * g.taps, -1)

    def _col2im_add(self, gcols, gx, g, n0, n1, a, b):
        """Scatter-add columns (nb, G, Cx/G*K, P) into gx[n0:n1] (rows for output a:b)."""
        nb, cg = n1 - n0, g.x_channels // g.groups
        need = need_extent(g)
        rows = (b - a - 1) * g.stride[0] + g.dilation[0] * (g.kernel[0] - 1) + 1
        out = (b - a,) + g.y_size[1:]
        buf = np.zeros((nb, g.x_channels, rows) + need[1:], dtype=gx.dtype)
        self._note(buf, gcols)
        if cpu_col2im.AVAILABLE:
            pad = (1,) * (3 - g.nd)
            # (nb, G, Cx/G*K, P) -> (nb*Cx, K, *out), buf -> (nb*Cx, *rows): 3 spatial dims
            cols = np.ascontiguousarray(gcols).reshape((nb * g.x_channels, g.taps) + pad + out)
            cpu_col2im.scatter_add(cols, buf.reshape((nb * g.x_channels,) + pad + buf.shape[2:]),
                                   *dw.pad3(g.kernel, g.nd, 1), *dw.pad3(g.stride, g.nd, 1),
                                   *dw.pad3(g.dilation, g.nd, 1))
            phases.add_unpadded(buf, gx, g, n0, n1, a * g.stride[0])
            return
        grouped = buf.reshape((nb, g.groups, cg, rows) + need[1:])
        taps = gcols.reshape((nb, g.groups, cg) + g.kernel + out)
        for tap in np.ndindex(*g.kernel):
            window = tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                           for t, d, s, o in zip(tap, g.dilation, g.stride, out))
            grouped[(Ellipsis,) + window] += taps[(slice(None),) * 3 + tap]
        phases.add_unpadded(buf, gx, g, n0, n1, a * g.stride[0])

    # ------------------------------------------------------------ shared helpers

    def _padded(self, x, g, n0, n1, a, b, dt):
        """Zero-padded input rows read by output rows a:b: (nb, Cx, rows, *need[1:])."""
        need = need_extent(g)
        rows = (b - a - 1) * g.stride[0] + g.dilation[0] * (g.kernel[0] - 1) + 1
        buf = np.zeros((n1 - n0, g.x_channels, rows) + need[1:], dtype=dt)
        phases.copy_unpadded(x[n0:n1], buf, g.pad_lo, a * g.stride[0])
        return buf

    def _sample_bytes(self, g, itemsize):
        """A bound on one sample's temporaries in the flat and depthwise paths."""
        _, length, block = self._flat_layout(g, np.dtype(f"f{itemsize}"))
        return math.ceil(itemsize * (2 * phases.waste(g) * g.x_channels * math.prod(need_extent(g))
                                     + 2 * g.y_channels * (math.prod(g.y_size) + length)
                                     + g.x_channels * g.taps * block))

    def _batches(self, g, dt):
        """Batch slices whose whole-sample temporaries fit the workspace limit."""
        per_sample = self._sample_bytes(g, dt.itemsize)
        nb = int(max(1, min(g.batch, self.workspace_limit // max(per_sample, 1))))
        return [(n0, min(g.batch, n0 + nb)) for n0 in range(0, g.batch, nb)]

    def _chunks(self, g, itemsize):
        """Split (batch, first output dim) so that one chunk's im2col temporaries fit the limit."""
        need = need_extent(g)
        out_rest = math.prod(g.y_size[1:])
        per_row = itemsize * (g.x_channels * g.taps * out_rest + g.y_channels * out_rest)
        pad_row = itemsize * g.x_channels * math.prod(need[1:])
        per_sample = per_row * g.y_size[0] + pad_row * need[0]
        limit = self.workspace_limit
        if per_sample <= limit:
            nb = max(1, min(g.batch, limit // max(per_sample, 1)))
            for n0 in range(0, g.batch, nb):
                yield n0, min(g.batch, n0 + nb), 0, g.y_size[0]
            return
        rows = max(1, limit // (per_row + pad_row * g.stride[0] + 1))
        for n0 in range(g.batch):
            for a in range(0, g.y_size[0], rows):
                yield n0, n0 + 1, a, min(g.y_size[0], a + rows)

    def _note(self, *arrays):
        self.peak_temp_bytes = max(self.peak_temp_bytes, sum(a.nbytes for a in arrays))


_tuner_instance = None


def _threads():
    return dw.numba.get_num_threads() if dw.AVAILABLE else 1


def _shared_tuner():
    global _tuner_instance
    if _tuner_instance is None:
        _tuner_instance = autotune.Autotuner()
    return _tuner_instance


def _context():
    """What makes a CPU timing valid elsewhere: the processor, threads, library versions."""
    from .. import __version__
    threads = dw.numba.get_num_threads() if dw.AVAILABLE else None
    return {"engine": "cpu", "machine": platform.machine(), "processor": cpu_model(),
            "cores": os.cpu_count(), "numba_threads": threads, "numpy": np.__version__,
            "ndconv": __version__, "algorithms": list(CPUEngine.algorithms)}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pointwise(g):
    """A 1x1 stride-1 convolution without padding: y = w @ x per sample."""
    return g.taps == 1 and phases.unit_stride(g) and not any(g.pad_lo) and g.y_size == g.x_size




# ---------------------------------------------------------------- phases (strides through stride 1)

def _to_unit_stride(x, w, g, dt):
    """(x, w, g) of a strided convolution -> the stride-1 convolution over its phases."""
    if phases.unit_stride(g):
        return x, w, g
    ws = None if w is None else phases.weight(np, w, g, dt)
    return phases.space_to_depth(np, x, g, dt), ws, phases.geometry(g)


@functools.lru_cache(maxsize=16)
def _all_taps(count):
    taps = np.arange(count, dtype=np.int64)
    taps.flags.writeable = False
    return taps


def _flipped_geometry(g):
    """The stride-1 input gradient as a forward geometry: gy convolved with the flipped
    kernel under the complementary padding d(k-1) - lo (which must not be negative)."""
    return replace(g, x_channels=g.y_channels, y_channels=g.x_channels, x_size=g.y_size, y_size=g.x_size,
                   pad_hi=(0,) * g.nd,
                   pad_lo=tuple(d * (k - 1) - lo for lo, d, k in zip(g.pad_lo, g.dilation, g.kernel)))


def _flip_weight(w, g, dt):
    """(Cy, Cx/G, *k) -> (Cx, Cy/G, *k) per group, kernel reversed: the transposed kernel."""
    yg, cg = g.y_channels // g.groups, g.x_channels // g.groups
    v = np.asarray(w, dtype=dt).reshape((g.groups, yg, cg) + g.kernel)
    v = np.swapaxes(v, 1, 2)[(Ellipsis,) + (slice(None, None, -1),) * g.nd]
    return np.ascontiguousarray(v).reshape((g.x_channels, yg) + g.kernel)


def _weight_last(w, g, dt):
    """(Cy, Cx/G, *k) -> (G, K*Cx/G, Cy/G), rows ordered (tap, channel) like the columns."""
    yg, cg = g.y_channels // g.groups, g.x_channels // g.groups
    v = np.asarray(w, dtype=dt).reshape((g.groups, yg, cg) + g.kernel)
    order = (0,) + tuple(range(3, 3 + g.nd)) + (2, 1)
    return np.ascontiguousarray(v.transpose(order)).reshape(g.groups, g.taps * cg, yg)


def _weight_matrix(w, g, dt):
    """(Cy, Cx/G, *k) -> (G, Cy/G, Cx/G*K), a view when w is contiguous."""
    return np.asarray(w, dtype=dt).reshape(g.groups, g.y_channels // g.groups, -1)


def _rows(gy, g, n0, n1, a, b, dt):
    """gy[n0:n1, :, a:b] as (nb, G, Cy/G, P)."""
    part = np.asarray(gy[n0:n1, :, a:b], dtype=dt)
    return part.reshape(n1 - n0, g.groups, g.y_channels // g.groups, -1)
