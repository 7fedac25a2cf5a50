"""Whole-plane kernels for grouped and depthwise convolutions: the ``plane`` GPU algorithm.

Every problem is seen as 3-D (Z, Y, X): a 1-D call is (1, 1, L), a 2-D call is
(H, 1, W), so that its rows can be cut into slabs.  One block owns, for one sample
and one group, a slab of ``TZ`` output depth slices; it copies the input it reads
(all ``CIG`` input channels of the group, the slab's depth taps, every row and
column plus padding) into shared memory once, then each thread computes ``VX``
consecutive outputs of a row for all ``COG`` output channels of the group from
registers.  All sizes are compile-time constants, so every loop over taps and
outputs unrolls and every index division is a multiply; one module is compiled
per geometry (channel and batch counts stay run-time arguments).

Input gradient (stride 1): the forward code run on ``gy`` with the kernel flipped
and the group's weight block transposed (``FLIP``), padding ``(K-1)*D - L``.
Weight gradient: block (OCB output channels, CIB input channels, part) sums
``gy*x`` for the weights joining them over a fixed chunk of (sample, slab) steps,
reduces in a fixed order inside the block, and a second kernel adds the parts in
order.  The chunking depends on the geometry only: results are bitwise reproducible.

The planning half is plain Python, checked without a GPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .gpu_depthwise import _acc_itemsize, _vec
from .registry import FLOATS as _FLOATS
from .registry import OPS, Algorithm

#: static shared memory a block may use
SMEM_LIMIT = 48 * 1024
#: accumulators of one thread: COG*VX (forward: 16 measured faster than 32 for 8x8-channel
#: groups, by occupancy) or OCB*CIB*KT (weight gradient; up to
#: WGRAD_MAX_TAPS when one channel's taps alone are more)
MAX_ACC = 16
MAX_WGRAD_ACC = 36
WGRAD_MAX_TAPS = 64
#: weight gradient: blocks per SM that the register budget must allow (__launch_bounds__),
#: when a thread's sums are at most MAX_WGRAD_ACC.  Measured on an H200
#: (scripts/plane_sweep.py --wgrad-minb 1,2,3,4): 4 is 12-25% faster than 1 on 3-D
#: 3x3x3, 1-D k31 and 8x8-channel groups, level on 2-D 3x3 depthwise.
WGRAD_MIN_BLOCKS = 4
#: weight gradient of groups with several channels on both sides (e.g. 8x8): a thread
#: may keep up to WGRAD_PAIR_ACC sums (more channel pairs per block: fewer re-reads of
#: x and gy) at WGRAD_PAIR_MIN_BLOCKS blocks per SM, over about WGRAD_PAIR_BLOCKS
#: blocks.  Measured on an H200 (c2d_grouped32: 8x8-channel groups, 3x3): 0.166 ms
#: against 0.215 for 36 sums at 4 blocks per SM over 4096 blocks (0.179 over 2048
#: blocks, 0.191 over 3072; 0.246 at 3 blocks per SM).
WGRAD_PAIR_ACC = 72
WGRAD_PAIR_MIN_BLOCKS = 2
WGRAD_PAIR_BLOCKS = 1024
#: plane_conv whose register window is longer than LONG_WINDOW values: registers capped
#: so that LONG_WINDOW_THREADS threads fit an SM.  Measured on an H200 (1-D k31
#: depthwise, a window of 36): 0.131 against 0.147 ms, forward and input gradient
#: alike; 768 threads beat 512 (0.145) and 1024 (0.137).  Short windows (3x3, 3x3x3)
#: gain nothing from it.
LONG_WINDOW = 16
LONG_WINDOW_THREADS = 768
MAX_TAPS = 512
#: registers for a thread's window of one input row
MAX_WINDOW = 40
#: weight-gradient blocks aimed for (geometry-only, so the summation order never
#: depends on the device)
WGRAD_BLOCKS = 4096
MAX_GRID = 65535
_NAMES = {"e": "float16", "f": "float32", "d": "float64"}
_ALIGNED = (np.int32(0), np.int32(1))


def _ceil(a, b):
    return -(-a // b)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def view3(g, x_or_y):
    """Sizes of ``x`` or ``y`` (per ``x_or_y``) as the kernels see them: (1, 1, L), (H, 1, W), (D, H, W)."""
    size = tuple(g.x_size if x_or_y == "x" else g.y_size)
    return _as3(size, 1)


def _as3(values, fill):
    values = tuple(int(v) for v in values)
    if len(values) == 1:
        return (fill, fill) + values
    if len(values) == 2:
        return (values[0], fill, values[1])
    return values


@dataclass(frozen=True)
class Plan:
    """One compiled configuration and its launch."""
    consts: tuple        # (name, value) pairs: the module key and its #defines
    grid: tuple
    threads: int
    parts: int = 1       # weight gradient: chunks per output channel


def _layout(k3, s3, d3, dst3, tz, vx, vec):
    """(IZ, PY, PXP, SEGS, WIN, WINV, SLAB) of a slab of ``tz`` output slices."""
    kz, ky, kx = k3
    sz, sy, sx = s3
    dz, dy, dx = d3
    _, yy, yx = dst3
    segs = _ceil(yx, vx)
    win = (vx - 1) * sx + (kx - 1) * dx + 1
    winv = _ceil(win, vec) * vec
    iz = (tz - 1) * sz + (kz - 1) * dz + 1
    py = (yy - 1) * sy + (ky - 1) * dy + 1
    pxp = (segs - 1) * vx * sx + winv
    return iz, py, pxp, segs, win, winv, iz * py * pxp


def _threads(items):
    """Threads per block (a multiple of 32, 64-256) leaving the fewest idle slots."""
    if items <= 64:
        return 32 * max(1, _ceil(items, 32))
    return min(range(64, 257, 32), key=lambda nt: (_ceil(items, nt) * nt, -nt))


@functools.lru_cache(maxsize=4096)
def plan(op, g, dtype_name):
    """The launch of ``op`` on geometry ``g``, or None when the plane kernels cannot do it."""
    if op not in OPS or g.nd not in (1, 2, 3) or dtype_name not in _FLOATS:
        return None
    if g.padding_mode != "zeros" or 0 in g.x_shape or 0 in g.y_shape or g.groups > MAX_GRID:
        return None
    groups, taps = g.groups, g.taps
    cig, cog = g.x_channels // groups, g.y_channels // groups
    k3, d3, l3 = _as3(g.kernel, 1), _as3(g.dilation, 1), _as3(g.pad_lo, 0)
    s3 = _as3(g.stride, 1)
    x3, y3 = view3(g, "x"), view3(g, "y")
    flip = 0
    if op == "backward_input":
        if s3 != (1, 1, 1):
            return None
        # the forward code on gy: channels swap roles, padding becomes (K-1)*D - L
        flip = 1
        cig, cog = cog, cig
        l3 = tuple((k - 1) * d - lo for k, d, lo in zip(k3, d3, l3))
        x3, y3 = y3, x3
    if taps > MAX_TAPS:
        return None
    wgrad = op == "backward_weight"
    # weight gradient: a block sums the weights joining ocb output and cib input
    # channels (ocb*cib*KT accumulators per thread); the most pairs that fit, balanced
    # (each shared window serves ocb outputs, each gy value cib inputs)
    cap = MAX_WGRAD_ACC if taps <= MAX_WGRAD_ACC else WGRAD_MAX_TAPS
    if cig > 1 and cog > 1 and taps <= MAX_WGRAD_ACC:
        cap = WGRAD_PAIR_ACC
    pairs = [(o * c, -abs(o - c), o, c) for o in _divisors(cog) for c in _divisors(cig) if o * c * taps <= cap]
    if wgrad and not pairs:
        return None
    ocb, cib = max(pairs)[2:] if pairs else (1, 1)
    paired = ocb * cib * taps > MAX_WGRAD_ACC and ocb * cib > 1    # the WGRAD_PAIR_* regime
    planes = cib if wgrad else cig
    acc_bytes = _acc_itemsize(dtype_name)
    per_vx = []                  # the cheapest slab for each vx
    for vx in ((2, 1) if dtype_name == "float64" else (4, 2, 1)):
        if not wgrad and cog * vx > MAX_ACC:
            continue
        vec = _vec(dtype_name, vx * s3[2])
        best = None
        for tz in range(min(y3[0], 64), 0, -1):
            iz, py, pxp, segs, win, winv, slab = _layout(k3, s3, d3, y3, tz, vx, vec)
            items = tz * y3[1] * segs
            nt = _threads(items)
            red = (nt // 32) * ocb * cib * taps if wgrad else cig * cog * taps
            if acc_bytes * (planes * slab + red) > SMEM_LIMIT:
                continue
            # input slices loaded per output slice (halo, the last slab's waste), idle
            # output columns, idle thread slots
            cost = (_ceil(y3[0], tz) * iz / y3[0]) * (segs * vx / y3[2]) * (_ceil(items, nt) * nt / items)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, vx, vec, tz, nt, iz, py, pxp, segs, win, winv, slab)
        if best is not None:
            per_vx.append(best)
    if not per_vx:
        return None
    # more outputs per thread reuse each shared-memory window and weight more often:
    # the widest vx within 15% of the cheapest layout
    cheapest = min(b[0] for b in per_vx)
    best = next(b for b in per_vx if b[0] <= cheapest * 1.15)
    _, vx, vec, tz, nt, iz, py, pxp, segs, win, winv, slab = best
    # 16-byte (float16: 8-byte) loads of whole input rows when they land inside the
    # shared window.  Measured in float32 on an H200 (scripts/plane_sweep.py --vec-ab):
    # 10-40% faster for every weight gradient and where each input feeds >= 27
    # multiply-adds (3-D 3x3x3, 1-D k31, 8x8 groups), 10% slower for 2-D 3x3 depthwise
    # forward: scalar loads there.
    fill_vec = int(dtype_name in ("float32", "float16") and x3[2] % 4 == 0 and min(l3[1:]) >= 0
                   and l3[1] + x3[1] <= py and l3[2] + x3[2] <= pxp and (wgrad or cog * taps >= 27))
    slabs = _ceil(y3[0], tz)
    consts = (("CIG", cig), ("COG", cog), ("KZ", k3[0]), ("KY", k3[1]), ("KX", k3[2]),
              ("SZ", s3[0]), ("SY", s3[1]), ("SX", s3[2]), ("DZ", d3[0]), ("DY", d3[1]), ("DX", d3[2]),
              ("XZ", x3[0]), ("XY", x3[1]), ("XX", x3[2]), ("YZ", y3[0]), ("YY", y3[1]), ("YX", y3[2]),
              ("LZ", l3[0]), ("LY", l3[1]), ("LX", l3[2]), ("TZ", tz), ("VX", vx), ("VEC", vec),
              ("NT", nt), ("FLIP", flip), ("USE_WIN", int(winv <= MAX_WINDOW)), ("WGRAD", int(wgrad)),
              ("FILL_VEC", fill_vec))
    if not wgrad:
        if winv <= MAX_WINDOW and winv > LONG_WINDOW and LONG_WINDOW_THREADS // nt > 1:
            consts += (("CMINB", LONG_WINDOW_THREADS // nt),)
        return Plan(consts, (slabs, groups, min(g.batch, MAX_GRID)), nt)
    steps = g.batch * slabs
    blocks = g.y_channels // ocb * (cig // cib)
    parts = max(1, min(steps, _ceil(WGRAD_PAIR_BLOCKS if paired else WGRAD_BLOCKS, blocks)))
    chunk = _ceil(steps, parts)
    parts = _ceil(steps, chunk)
    minb = WGRAD_PAIR_MIN_BLOCKS if paired else WGRAD_MIN_BLOCKS if ocb * cib * taps <= MAX_WGRAD_ACC else 1
    consts += (("CHUNK", chunk), ("CIB", cib), ("ICBLK", cig // cib), ("OCB", ocb), ("MINB", minb))
    return Plan(consts, (min(blocks * parts, 1 << 20), 1, 1), nt, parts)


class Plane(Algorithm):
    """Grouped and depthwise convolutions from whole planes (or slabs) in shared memory."""

    name = "plane"

    def __init__(self):
        self._modules = {}
        self._calls = {}

    def supports(self, op, g, dtype):
        return g.groups > 1 and plan(op, g, np.dtype(dtype).name) is not None

    def preferred(self, op, g, dtype):
        # Measured on an H200 (scripts/gpu_profile.py): 2-5x faster than cuDNN's
        # deterministic kernels and 1.3-3x faster than depthwise_tiled on every
        # depthwise suite row (1-D k31, 2-D 3x3, 3-D 3x3x3), 3.6x/4.7x/2.3x faster than
        # cuDNN on 8x8-channel groups.  Larger groups are GEMM work: left to cuDNN.
        cig, cog = g.x_channels // g.groups, g.y_channels // g.groups
        return cig * cog <= 64

    def _function(self, dtype_name, p, name):
        import cupy as cp
        key = (cp.cuda.runtime.getDevice(), dtype_name, p.consts)
        mod = self._modules.get(key)
        if mod is None:
            from .gpu_kernels import plane_source
            mod = cp.RawModule(code=plane_source(dtype_name, dict(p.consts)))
            if len(self._modules) > 512:
                self._modules.clear()
            self._modules[key] = mod
        return mod.get_function(name)

    def _launches(self, op, g, dtype_name):
        """(function, grid, block, int arguments, weight-gradient scratch elements, the
        final kernel's (function, grid, block, int arguments) or None) of one call,
        worked out once per call shape."""
        import cupy as cp
        key = (cp.cuda.runtime.getDevice(), op, g, dtype_name)
        found = self._calls.get(key)
        if found is not None:
            return found
        p = plan(op, g, dtype_name)
        if p is None:          # supports() said yes for this call: cannot happen
            raise ValueError(f"plane cannot run {op} for x {g.x_shape}, weight {g.w_shape}")
        n = np.int64(g.batch)
        cx, cy = np.int64(g.x_channels), np.int64(g.y_channels)
        if op != "backward_weight":
            src, dst = (cx, cy) if op == "forward" else (cy, cx)
            found = (self._function(dtype_name, p, "plane_conv"), p.grid, (p.threads,), (src, dst, n), 0, None)
        else:
            total = g.y_channels * g.w_shape[1] * g.taps
            final = (self._function(dtype_name, p, "plane_wgrad_final"),
                     (max(1, min(_ceil(total, 256), 1 << 20)),), (256,), (cy, np.int64(p.parts)))
            found = (self._function(dtype_name, p, "plane_wgrad"), p.grid, (p.threads,),
                     (cx, cy, n, np.int64(p.parts)), total * p.parts, final)
        if len(self._calls) > 4096:
            self._calls.clear()
        self._calls[key] = found
        return found

    def run(self, engine, op, a, b, g):
        import cupy as cp
        fn, grid, block, ints, scratch, final = self._launches(op, g, _NAMES[a.dtype.char])
        ints = ints + (_ALIGNED[a.data.ptr % 16 == 0],)     # the input may take 16-byte loads
        if op == "forward":
            out = cp.empty(g.y_shape, dtype=a.dtype)
            fn(grid, block, (a, b, out) + ints)
            return out
        if op == "backward_input":
            out = cp.empty(g.x_shape, dtype=a.dtype)
            fn(grid, block, (a, b, out) + ints)
            return out
        partial = cp.empty(scratch, dtype=np.float64 if a.dtype.char == "d" else np.float32)
        engine._note(partial)
        fn(grid, block, (a, b, partial) + ints)
        out = cp.empty(g.w_shape, dtype=a.dtype)
        final_fn, final_grid, final_block, final_ints = final
        final_fn(final_grid, final_block, (partial, out) + final_ints)
        return out
