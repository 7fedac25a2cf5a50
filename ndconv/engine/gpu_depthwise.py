"""Tiled depthwise kernels (``Cx/G == 1``, any channel multiplier): the ``depthwise_tiled``
GPU algorithm.

The planning half (tile shapes, launch arguments) is plain Python so that it can be
checked without a GPU; :class:`DepthwiseTiled` compiles and launches the kernels of
:func:`ndconv.engine.gpu_kernels.tiled_source`, one module per (dtype, kernel, stride,
dilation, tile shape), cached.

Forward and (stride 1) input gradient: each block computes one tile of one
(n, channel, output depth) plane from a shared-memory copy of the input tile and its
halo; the input gradient is the forward code run on ``gy`` with the flipped kernel
and the complementary padding ``(K-1)*D - L``, summing the ``M`` output channels of
each input channel.  Weight gradient: per block, partial sums of ``gy*x`` for all
taps of one channel over a fixed chunk of tiles, then a second kernel sums the
chunks in order.  The chunking depends on the geometry only, so results are
bitwise reproducible (no atomics).

The ``depthwise_rows`` algorithm (stride-1 forward and input gradient) lives here
too: no shared memory, each thread reads the input rows of its R x VX outputs into
registers once (:func:`rows_plan`, ``dw_rows`` in gpu_kernels).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .registry import FLOATS as _FLOATS
from .registry import OPS, Algorithm, cached

#: static shared memory a block may use
SMEM_LIMIT = 48 * 1024
#: the weight gradient keeps one sum per tap per thread in registers
WGRAD_MAX_TAPS = 64
#: taps unrolled into one kernel (compile time and code size stay reasonable)
MAX_TAPS = 1024
#: registers of a thread's window of inputs
MAX_WINDOW = 40
#: weight-gradient blocks aimed for (a geometry-only number: the chunking, hence the
#: summation order, never depends on the device)
WGRAD_BLOCKS = 2048
MAX_BLOCKS = 1 << 20
#: forward / input gradient: one block per tile of a plane along grid x
MAX_GRID_X = (1 << 31) - 1


@dataclass(frozen=True)
class Tile:
    bx: int
    by: int
    vx: int
    vec: int
    use_window: bool

    @property
    def threads(self):
        return self.bx * self.by

    @property
    def tx(self):
        return self.bx * self.vx

    @property
    def ty(self):
        return self.by


def as3(values, fill):
    """A 1-, 2- or 3-tuple as (Z, Y, X), leading dims filled with ``fill``."""
    values = tuple(int(v) for v in values)
    return (fill,) * (3 - len(values)) + values


def _acc_itemsize(dtype_name):
    return 8 if dtype_name == "float64" else 4


def tile_layout(tile, k3, s3, d3):
    """(window, padded window, padded row, rows, shared-memory elements of the input tile)."""
    kz, ky, kx = k3
    sz, sy, sx = s3
    dz, dy, dx = d3
    win = (tile.vx - 1) * sx + (kx - 1) * dx + 1
    winv = -(-win // tile.vec) * tile.vec
    iwp = (tile.bx - 1) * tile.vx * sx + winv
    ih = (tile.ty - 1) * sy + (ky - 1) * dy + 1
    return win, winv, iwp, ih, kz * ih * iwp


def smem_bytes(tile, k3, s3, d3, dtype_name):
    taps = math.prod(k3)
    *_, elems = tile_layout(tile, k3, s3, d3)
    return _acc_itemsize(dtype_name) * (elems + max(taps, (tile.threads // 32) * taps))


def _vec(dtype_name, step):
    widths = (2, 1) if dtype_name == "float64" else (4, 2, 1)
    return next(v for v in widths if step % v == 0)


def plan_tile(nd, out3, k3, s3, d3, dtype_name):
    """The tile shape for outputs of size ``out3`` (Z, Y, X), or None when none fits.

    Least wasted area (outputs past the edge of the last tiles) first; within 5% of
    that, more outputs per thread (register reuse of the window), then more threads.
    """
    _, oy, ox = out3
    shapes = ((256, 1), (128, 1), (64, 1)) if nd == 1 else ((32, 8), (16, 16), (8, 32))
    options = []
    for bx, by in shapes:
        for vx in (4, 2, 1):
            vec = _vec(dtype_name, vx * s3[2])
            probe = Tile(bx, by, vx, vec, True)
            _, winv, *_ = tile_layout(probe, k3, s3, d3)
            tile = Tile(bx, by, vx, vec, winv <= MAX_WINDOW)
            if smem_bytes(tile, k3, s3, d3, dtype_name) > SMEM_LIMIT:
                continue
            waste = (-(-ox // tile.tx) * tile.tx) * (-(-oy // tile.ty) * tile.ty) / (ox * oy)
            options.append((waste, tile))
    if not options:
        return None
    best = min(w for w, _ in options)
    near = [t for w, t in options if w <= best * 1.05]
    return max(near, key=lambda t: (t.vx, t.threads))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: module key parts, grid, block and the integer arguments."""
    kernel: tuple
    stride: tuple
    dilation: tuple
    tile: Tile
    grid: tuple
    ints: tuple


def _tiles(tile, out3):
    return -(-out3[2] // tile.tx), -(-out3[1] // tile.ty)


@functools.lru_cache(maxsize=1024)
def plan(op, g, dtype_name):
    """The launch of ``op`` on geometry ``g`` (the first kernel of the weight gradient,
    with ``ints[-1]`` = number of chunks), or None when the tiled kernels cannot do it."""
    if op not in OPS or g.nd not in (1, 2, 3) or dtype_name not in _FLOATS:
        return None
    if g.x_channels != g.groups or g.x_channels <= 0 or g.y_channels % g.x_channels:
        return None
    if g.padding_mode != "zeros" or 0 in g.x_shape or 0 in g.y_shape:
        return None
    taps = g.taps
    if taps > MAX_TAPS or (op == "backward_weight" and taps > WGRAD_MAX_TAPS):
        return None
    k3, s3, d3 = as3(g.kernel, 1), as3(g.stride, 1), as3(g.dilation, 1)
    x3, y3, l3 = as3(g.x_size, 1), as3(g.y_size, 1), as3(g.pad_lo, 0)
    n, cx, cy = g.batch, g.x_channels, g.y_channels
    m = cy // cx
    if op == "backward_input":
        if s3 != (1, 1, 1):
            return None
        tile = plan_tile(g.nd, x3, k3, s3, d3, dtype_name)
        if tile is None:
            return None
        tx, ty = _tiles(tile, x3)
        if tx * ty > MAX_GRID_X:
            return None
        flipped = tuple((k - 1) * d - lo for k, d, lo in zip(k3, d3, l3))
        ints = (cx, cy, 1, m) + y3 + x3 + flipped + (tx, n)
        return Launch(k3, s3, d3, tile, (tx * ty, min(cx * x3[0], 65535), min(n, 65535)), ints)
    tile = plan_tile(g.nd, y3, k3, s3, d3, dtype_name)
    if tile is None:
        return None
    tx, ty = _tiles(tile, y3)
    if op == "forward":
        if tx * ty > MAX_GRID_X:
            return None
        ints = (cy, cx, m, 1) + x3 + y3 + l3 + (tx, n)
        return Launch(k3, s3, d3, tile, (tx * ty, min(cy * y3[0], 65535), min(n, 65535)), ints)
    per_ch = n * y3[0] * ty * tx
    parts = max(1, min(per_ch, -(-WGRAD_BLOCKS // cy)))
    chunk = -(-per_ch // parts)
    parts = -(-per_ch // chunk)
    ints = (cy, cx, m) + x3 + y3 + l3 + (tx, ty, per_ch, chunk, parts)
    return Launch(k3, s3, d3, tile, (min(cy * parts, MAX_BLOCKS), 1, 1), ints)


KERNEL_NAMES = {"forward": "dw_tiled_forward", "backward_input": "dw_tiled_backward",
                "backward_weight": "dw_tiled_wgrad"}


def module_key(dtype_name, launch):
    t = launch.tile
    return (dtype_name, launch.kernel, launch.stride, launch.dilation, t.bx, t.by, t.vx, t.vec, t.use_window)


def module_source(key):
    from .gpu_kernels import tiled_source
    dtype_name, k3, s3, d3, bx, by, vx, vec, use_window = key
    return tiled_source(dtype_name, k3, s3, d3, bx, by, vx, vec, use_window)


class DepthwiseTiled(Algorithm):
    """Shared-memory tiles with halos, loops over taps unrolled per compiled geometry."""

    name = "depthwise_tiled"

    def __init__(self):
        self._modules = {}
        self._launches = {}

    def supports(self, op, g, dtype):
        return plan(op, g, np.dtype(dtype).name) is not None

    def preferred(self, op, g, dtype):
        # Measured on an H200 against cuDNN's deterministic kernels: level on 2-D 3x3
        # (0.78 vs 0.72 ms forward), far ahead in 3-D (0.29 vs 3.16 ms) and on long 1-D
        # kernels (0.38 vs 2.26 ms weight gradient, k = 31): the sound untuned choice.
        return True

    def _function(self, dtype_name, launch, name):
        import cupy as cp
        key = (cp.cuda.runtime.getDevice(),) + module_key(dtype_name, launch)
        return cached(self._modules, key, lambda: cp.RawModule(code=module_source(key[1:])), 256).get_function(name)

    def _launch(self, op, g, dtype_name):
        """(kernel, grid, block, int64 arguments, final kernel or None) of a call, worked
        out once per geometry: planning costs more host time than a small call's kernel."""
        import cupy as cp

        def build():
            launch = plan(op, g, dtype_name)
            if launch is None:          # supports() said yes for this call: cannot happen
                raise ValueError(f"depthwise_tiled cannot run {op} for x {g.x_shape}, weight {g.w_shape}")
            final = self._function(dtype_name, launch, "dw_tiled_wgrad_final") if op == "backward_weight" else None
            return (self._function(dtype_name, launch, KERNEL_NAMES[op]), launch.grid, (launch.tile.threads,),
                    tuple(np.int64(v) for v in launch.ints), final)
        return cached(self._launches, (cp.cuda.runtime.getDevice(), op, g, dtype_name), build)

    def run(self, engine, op, a, b, g):
        import cupy as cp
        dtype_name = a.dtype.name
        fn, grid, block, ints, final = self._launch(op, g, dtype_name)
        if op == "forward":
            out = cp.empty(g.y_shape, dtype=a.dtype)
            fn(grid, block, (a, b, out) + ints)
            return out
        if op == "backward_input":
            out = cp.empty(g.x_shape, dtype=a.dtype)
            fn(grid, block, (a, b, out) + ints)
            return out
        cy, parts, taps = g.y_channels, int(ints[-1]), g.taps
        acc = np.float64 if dtype_name == "float64" else np.float32
        partial = cp.empty(cy * parts * taps, dtype=acc)
        engine._note(partial)
        fn(grid, block, (a, b, partial) + ints)
        out = cp.empty(g.w_shape, dtype=a.dtype)
        blocks = max(1, min(-(-(cy * taps) // 256), MAX_BLOCKS))
        final((blocks,), (256,), (partial, out, np.int64(cy), np.int64(parts)))
        return out


# ------------------------------------------------------------ register windows, no shared memory

#: outputs a ``depthwise_rows`` thread keeps in registers (R rows x VX columns), and
#: the depths it takes at once in 3-D (RZ; each input row then feeds up to KZ of them).
#: Measured on an H200 (3x3x3 over 4x128x32^3, R = 4): RZ = 4 65-67 us, RZ = 1 68-74 us
#: for both ops; RZ = 2 in between, noisier.
ROWS_OUTPUTS = 16
ROWS_DEPTHS = 4
#: output rows at least this wide take VX = 8 (fewer, wider float4 runs per thread);
#: measured on an H200: 202 against 215 us for 3x3 over 56-wide rows, 63 against 55 us
#: (VX = 4 better) over 32-wide ones
ROWS_WIDE = 48
ROWS_THREADS = 128
#: rows of at most 32 float4 (128 float32): one lane per float4 of an output row, the
#: window's halo from the neighbouring lanes by shuffles (every load a coalesced float4,
#: none repeated along the row), up to LANE_ROWS rows (3-D: LANE_ROWS_3D) of one depth
#: per lane, in chunks of even size.  Measured on an H200 (tmpx sweep of 1-14 rows, 1-4
#: depths): 3x3 over 64x384x56^2 165 us at 14 rows, 172 at 8, 175 at 4, against 179 for
#: the VX = 8 windows (a 308 MB copy: 160); 3x3x3 over 4x128x32^3 63-65 us at 4 rows of
#: one depth, 66-71 for the windows, worse with more depths or rows.
LANE_MAX_WIDTH = 128
LANE_ROWS = 14
LANE_ROWS_3D = 4
#: weight gradient (lanes only): LANE_WGRAD_ROWS rows a step, and (channel, part) items
#: aimed for; each part sums a fixed run of (sample, row chunk) steps, so the order of
#: the sums depends on the geometry only.  Measured on an H200 (rows 2-14 x items
#: 2048-16384): 3x3 over 64x384x56^2 196 us at 2 rows / 8192 items (199 at 8 / 4096;
#: 255-430 elsewhere), against 270 for ``plane``; 3x3x3 over 4x128x32^3 129-153 us
#: against ``plane``'s 111.
LANE_WGRAD_ROWS = 2
LANE_WGRAD_ITEMS = 8192
#: a thread's window of one input row, and its taps, stay in registers
ROWS_MAX_WINDOW = 40
ROWS_MAX_TAPS = 64


@dataclass(frozen=True)
class RowsPlan:
    consts: tuple        # (name, value) pairs: the #defines
    vec4: bool           # float4 loads and stores possible (float32, rows of multiples of 4)
    blocks: int
    src_channels: int
    dst_channels: int
    planes: int
    parts: int = 0       # weight gradient: parts per channel, steps per part
    chunk: int = 0


@functools.lru_cache(maxsize=1024)
def rows_plan(op, g, dtype_name, aligned=False):
    """The ``depthwise_rows`` launch of a stride-1 depthwise call, or None where it does
    not apply.  ``aligned``: the source is 16-byte aligned, so float4 loads may be used
    (VEC4, and LANES where the rows are short enough).  The weight gradient exists in
    LANES form only, and is planned as if aligned (the caller aligns its operands)."""
    if op not in OPS or dtype_name not in _FLOATS or g.nd not in (1, 2, 3):
        return None
    if (g.padding_mode != "zeros" or g.x_channels != g.groups or g.groups < 2 or any(s != 1 for s in g.stride)
            or 0 in g.x_shape or 0 in g.y_shape or g.taps > ROWS_MAX_TAPS):
        return None
    wgrad = op == "backward_weight"
    k3, d3, l3 = as3(g.kernel, 1), as3(g.dilation, 1), as3(g.pad_lo, 0)
    x3, y3 = as3(g.x_size, 1), as3(g.y_size, 1)
    src_c, dst_c = g.x_channels, g.y_channels
    flip = op == "backward_input"
    if flip:     # the forward code on gy: flipped kernel, padding (K-1)*D - L
        l3 = tuple((k - 1) * d - lo for k, d, lo in zip(k3, d3, l3))
        x3, y3, src_c, dst_c = y3, x3, dst_c, src_c
        if min(l3) < 0:
            return None
    vec4 = dtype_name == "float32" and x3[2] % 4 == 0 and y3[2] % 4 == 0
    # lanes: every input column a window reads lies under some lane (x no wider than y)
    lanes = vec4 and (aligned or wgrad) and y3[2] <= LANE_MAX_WIDTH and x3[2] <= y3[2]
    vx = 4 if lanes or y3[2] < ROWS_WIDE else 8
    if (wgrad and not lanes) or vx + (k3[2] - 1) * d3[2] > ROWS_MAX_WINDOW:
        return None
    if lanes:
        most = LANE_WGRAD_ROWS if wgrad else LANE_ROWS_3D if g.nd == 3 else LANE_ROWS
        r, rz = -(-y3[1] // -(-y3[1] // most)), 1
    else:
        r, rz = max(1, min(y3[1], ROWS_OUTPUTS // vx)), max(1, min(y3[0], ROWS_DEPTHS))
    planes = g.batch * dst_c
    segs, steps = -(-y3[2] // vx), -(-y3[0] // rz) * -(-y3[1] // r)
    parts = chunk = 0
    if wgrad:       # items (channel, part), each over `chunk` of the channel's (sample, step) runs
        runs = g.batch * steps
        chunk = -(-runs // max(1, min(runs, -(-LANE_WGRAD_ITEMS // dst_c))))
        parts = -(-runs // chunk)
        items = dst_c * parts
    else:
        items = planes * steps
    threads = -(-items // (32 // segs)) * 32 if lanes else items * segs
    consts = (("KZ", k3[0]), ("KY", k3[1]), ("KX", k3[2]), ("DZ", d3[0]), ("DY", d3[1]), ("DX", d3[2]),
              ("LZ", l3[0]), ("LY", l3[1]), ("LX", l3[2]), ("XZ", x3[0]), ("XY", x3[1]), ("XX", x3[2]),
              ("YZ", y3[0]), ("YY", y3[1]), ("YX", y3[2]), ("RZ", rz), ("R", r), ("VX", vx), ("NT", ROWS_THREADS),
              ("FLIP", int(flip)), ("M", g.y_channels // g.x_channels), ("VEC4", int(vec4 and (aligned or wgrad))),
              ("LANES", int(lanes)), ("GPW", 32 // segs if lanes else 0), ("WGRAD", int(wgrad)))
    blocks = -(-threads // ROWS_THREADS)
    if blocks > MAX_GRID_X:
        return None
    return RowsPlan(consts, vec4, blocks, src_c, dst_c, planes, parts, chunk)


class DepthwiseRows(Algorithm):
    """Stride-1 depthwise forward and input gradient from register windows (no shared
    memory); the weight gradient where a row fits the lanes of a warp."""

    name = "depthwise_rows"

    def __init__(self):
        self._modules = {}
        self._launches = {}

    def supports(self, op, g, dtype):
        return rows_plan(op, g, np.dtype(dtype).name) is not None

    def preferred(self, op, g, dtype):
        # Measured on an H200 against ``plane`` (the next choice): 55 against 84 us for
        # 3x3x3 over 4x128x32^3, 202 against 228 us for 3x3 over 64x384x56^2, both ops;
        # weight gradient (LANE_WGRAD_ROWS): ahead in 2-D only.
        return g.nd == 2 if op == "backward_weight" else g.nd >= 2

    def _launch(self, op, g, dtype_name, aligned):
        import cupy as cp
        from .gpu_kernels import rows_source

        def build():
            p = rows_plan(op, g, dtype_name, aligned)
            mod = cached(self._modules, (cp.cuda.runtime.getDevice(), dtype_name, p.consts),
                         lambda: cp.RawModule(code=rows_source(dtype_name, p.consts)), 256)
            if op == "backward_weight":
                ints = tuple(np.int64(v) for v in (g.batch, p.src_channels, p.dst_channels, p.parts, p.chunk))
                return (mod.get_function("dw_rows_wgrad"), (p.blocks,), (ROWS_THREADS,), ints,
                        mod.get_function("dw_rows_wgrad_final"), p.parts)
            return (mod.get_function("dw_rows"), (p.blocks,), (ROWS_THREADS,),
                    (np.int64(p.planes), np.int64(p.src_channels), np.int64(p.dst_channels)), None, 0)
        return cached(self._launches, (cp.cuda.runtime.getDevice(), op, g, dtype_name, aligned), build)

    def run(self, engine, op, a, b, g):
        import cupy as cp
        if op == "backward_weight":
            # float4 loads of both: an operand off 16-byte alignment is copied (rare)
            a, b = (v if v.data.ptr % 16 == 0 else v.copy() for v in (a, b))
            fn, grid, block, ints, final, parts = self._launch(op, g, a.dtype.name, True)
            partial = cp.empty(g.y_channels * parts * g.taps, dtype=np.float32)
            engine._note(partial)
            fn(grid, block, (a, b, partial) + ints)
            out = cp.empty(g.w_shape, dtype=a.dtype)
            final((-(-out.size // 256),), (256,), (partial, out, np.int64(g.y_channels), np.int64(parts)))
            return out
        out = cp.empty(g.y_shape if op == "forward" else g.x_shape, dtype=a.dtype)
        fn, grid, block, ints, _, _ = self._launch(op, g, a.dtype.name, a.data.ptr % 16 == 0)
        fn(grid, block, (a, b, out) + ints)
        return out
