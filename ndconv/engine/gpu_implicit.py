"""Implicit GEMM: convolutions as shared-memory-tiled GEMMs that read their operand
straight from the input and write their result straight to its place: ``implicit_gemm``.

One CUDA kernel, ``C (M x N) = A^T B`` with ``A`` a dense (K, M) matrix built from the
weights, and ``B``, ``C`` never materialised: row ``k`` and column ``n`` of ``B`` are
described by table entries, ``B[k, n] = src[krow[k].off + ncol[n].off]`` where the
per-dim coordinates ``ncol[n].j + krow[k].e`` fall inside the source's extent (zero
elsewhere: padding), and ``C[m, n]`` goes to ``dst[mrow[m] + ccol[n]]``.  The batch is
folded into the columns and the phases share one launch (grid z):

* forward: k = (ci, tap), m = co, n = (sample, output position); ``e`` is the tap's
  dilated offset, ``j`` the position's strided, padded origin.  No im2col buffer.
* input gradient: the gradient's positions split by phase ``q mod stride``; phase
  ``r`` takes the taps ``t`` with ``(r + pad - d t) % s == 0``, each reading ``gy`` at
  ``j + (r + pad - d t) / s`` (the transposed convolution as ``prod(s)`` dense GEMMs,
  no zero taps); k = (co, tap), m = ci, n = (sample, phase position).  A phase no tap
  reaches gets zeros (K = 0).  When every phase has one tap at offset 0 (k = s, no
  padding) the phases are one GEMM with m = (ci, tap), k = co, reading ``gy`` densely;
  it runs per sample (grid z), which measured faster than folding the batch.

The GEMM tiling is the classic one: a 128 x 128 block tile, 16-deep k steps
double-buffered through registers, 8 x 8 results per thread, two blocks per SM; a
thread's columns are 16 apart, so a warp's stores cover consecutive positions.
Measured on an H200 with ``scripts/implicit_sweep.py`` (k = s transposed rows of the
suite, 8.6 GFLOP each): 0.28-0.30 ms against cuDNN's 0.45-1.5 ms and ``phases``' 0.42 ms
(0.32-0.34 while the k = s kernel still read its sizes from the ``gemms`` table);
8-deep k steps were 6% slower, one block per SM 20% slower.  Elsewhere (padded, strided
3x3 calls) it loses to cuDNN and ``im2col_gemm`` and the autotuner passes it over.

``implicit_tf32x3`` is the same kernel with the inner product on the tensor cores at
float32 accuracy (3xTF32, see :mod:`.gpu_blas`): the tile rows are padded so that each
warp's fragment reads hit 32 banks; 8 warps of 64 x 32 results each split their A and B
fragments into TF32 hi and lo parts and issue ``mma.sync`` m16n8k8 for lo*hi, hi*lo and
hi*hi; sums of at most ``TF32X3_MAX_K`` products.  Measured on an H200 (one process,
CUDA events): the suite's k = s transposed forwards 0.25-0.27 ms against 0.33-0.38
(``implicit_gemm``) and PyTorch's 0.50-0.54.

float32 only (float16 goes to cuDNN's tensor cores; float64 is not a speed path), one
group, flat indices below 2**31.  The planning half is NumPy, checked without a GPU.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from .registry import Algorithm

BM = BN = 128
BK = 16
THREADS = 256

_SOURCE = r"""
#define BM 128
#define BN 128
#define LOADS (BK / 2)
#if TC
// rows padded by 8 floats: a warp's fragment reads (4 k rows x 8 columns) hit 32 banks
#define AP (BM + 8)
#define BP (BN + 8)

__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo)
{
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(hi) : "f"(x));
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(lo) : "f"(x - __uint_as_float(hi)));
}

__device__ __forceinline__ void mma_tf32(float* c, const unsigned* a, const unsigned* b)
{
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
#define AP BM
#define BP BN
#endif

__device__ __forceinline__ float b_at(const float* __restrict__ src, const int4* __restrict__ krow,
                                     int4 nc, int k, int K, bool b_in, int E0, int E1, int E2)
{
    if (!b_in || k >= K) return 0.f;
    const int4 kr = krow[k];
    const bool inside = (unsigned)(nc.y + kr.y) < (unsigned)E0 && (unsigned)(nc.z + kr.z) < (unsigned)E1
                        && (unsigned)(nc.w + kr.w) < (unsigned)E2;
    return inside ? src[kr.x + nc.x] : 0.f;
}

// One launch, one GEMM per blockIdx.z (a phase): C (M x N) = A^T B, A dense (K, M);
// B[k][n] = src[krow[k].x + ncol[n].x] where 0 <= ncol[n].{y,z,w} + krow[k].{y,z,w}
// < E0, E1, E2, else 0; C[m][n] -> dst[mrow[m] + ccol[n]].  gemms[z] = K, M, N and
// the offsets of the phase's A, krow, ncol, mrow, ccol in the concatenated arrays.
// DENSE_B (one GEMM per sample): B[k][n] = src[k * kstride + n], always inside, and
// K, M, N come as arguments: reading them and the offsets from gemms cost 15%.
extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS)
implicit_gemm(const float* __restrict__ a, const float* __restrict__ src, float* __restrict__ dst,
              const int4* __restrict__ krow, const int4* __restrict__ ncol,
              const int* __restrict__ mrow, const int* __restrict__ ccol, const int* __restrict__ gemms,
              int E0, int E1, int E2, int kstride, long long src_sample, long long dst_sample,
              int Kd, int Md, int Nd)
{
    __shared__ __align__(16) float As[2][BK][AP];
    __shared__ __align__(16) float Bs[2][BK][BP];
#if DENSE_B
    // one GEMM per sample (blockIdx.z): the tables cover one sample
    src += blockIdx.z * src_sample;
    dst += blockIdx.z * dst_sample;
    const int K = Kd, M = Md, N = Nd;
#else
    const int* gp = gemms + 8 * blockIdx.z;
    const int K = gp[0], M = gp[1], N = gp[2];
    krow += gp[4];
    mrow += gp[6];
    ccol += gp[7];
#endif
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    if (m0 >= M || n0 >= N) return;
    const int tid = threadIdx.x;
    const int tx = tid & 15, ty = tid >> 4;

    // Tile loads: element tid + 256 r (r < BK/2) of a BK x 128 tile is row lrow + 2 r,
    // column lcol, so each warp reads 32 consecutive columns of one row.
    const int lcol = tid & 127, lrow = tid >> 7;
    // an offset, not a moved pointer: pointers kept live through the main loop cost registers
    const bool a_in = m0 + lcol < M;
    const bool b_in = n0 + lcol < N;
    float ra[LOADS], rb[LOADS];

#if DENSE_B
    const int a_col = m0 + lcol;
#define B_AT(k) ((b_in && (k) < K) ? src[(long long)(k) * kstride + n0 + lcol] : 0.f)
#else
    const int a_col = gp[3] + m0 + lcol;
    const int4 nc = b_in ? ncol[gp[5] + n0 + lcol] : make_int4(0, 0, 0, 0);
#define B_AT(k) b_at(src, krow, nc, k, K, b_in, E0, E1, E2)
#endif
#define LOAD_TILE(k0)                                                                     \
    _Pragma("unroll") for (int r = 0; r < LOADS; ++r) {                                   \
        const int k = (k0) + lrow + 2 * r;                                                \
        ra[r] = (a_in && k < K) ? a[(long long)k * M + a_col] : 0.f;                      \
        rb[r] = B_AT(k);                                                                  \
    }
#define STORE_TILE(buf)                                                                   \
    _Pragma("unroll") for (int r = 0; r < LOADS; ++r) {                                   \
        As[buf][lrow + 2 * r][lcol] = ra[r];                                              \
        Bs[buf][lrow + 2 * r][lcol] = rb[r];                                              \
    }

#if TC
    // 8 warps as 2 (m) x 4 (n), each 64 x 32 results: 4 x 4 tiles of m16n8, each tile's
    // float32 sum takes lo*hi, hi*lo and hi*hi of its TF32 parts (3xTF32)
    const int lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    float acc[4][4][4];
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;
#else
    float acc[8][8];
    #pragma unroll
    for (int i = 0; i < 8; ++i)
        #pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
#endif

    LOAD_TILE(0);
    STORE_TILE(0);
    __syncthreads();
    int buf = 0;
    for (int k0 = 0; k0 < K; k0 += BK) {
        const bool more = k0 + BK < K;
        if (more) { LOAD_TILE(k0 + BK); }
#if TC
        #pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned bh[4][2], bl[4][2];
            #pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int n = wn + ni * 8 + gid;
                split_tf32(Bs[buf][kk + tig][n], bh[ni][0], bl[ni][0]);
                split_tf32(Bs[buf][kk + tig + 4][n], bh[ni][1], bl[ni][1]);
            }
            #pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const int m = wm + mi * 16 + gid;
                unsigned ah[4], al[4];
                split_tf32(As[buf][kk + tig][m], ah[0], al[0]);
                split_tf32(As[buf][kk + tig][m + 8], ah[1], al[1]);
                split_tf32(As[buf][kk + tig + 4][m], ah[2], al[2]);
                split_tf32(As[buf][kk + tig + 4][m + 8], ah[3], al[3]);
                #pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    mma_tf32(acc[mi][ni], al, bh[ni]);
                    mma_tf32(acc[mi][ni], ah, bl[ni]);
                    mma_tf32(acc[mi][ni], ah, bh[ni]);
                }
            }
        }
#else
        #pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][64 + ty * 4]);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            float bv[8];
            #pragma unroll
            for (int j = 0; j < 8; ++j) bv[j] = Bs[buf][kk][tx + 16 * j];
            #pragma unroll
            for (int i = 0; i < 8; ++i)
                #pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
#endif
        // the other buffer was last read before the previous barrier
        if (more) { STORE_TILE(buf ^ 1); }
        __syncthreads();
        buf ^= 1;
    }

#if TC
    // fragment c of tile (mi, ni): row gid + 8 (c / 2), column 2 tig + c % 2
    int col[4][2];
    #pragma unroll
    for (int ni = 0; ni < 4; ++ni)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int n = n0 + wn + ni * 8 + 2 * tig + h;
            col[ni][h] = n < N ? ccol[n] : -1;
        }
    #pragma unroll
    for (int mi = 0; mi < 4; ++mi)
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int m = m0 + wm + mi * 16 + gid + 8 * r;
            if (m >= M) continue;
            float* row = dst + mrow[m];
            #pragma unroll
            for (int ni = 0; ni < 4; ++ni)
                #pragma unroll
                for (int h = 0; h < 2; ++h)
                    if (col[ni][h] >= 0) row[col[ni][h]] = acc[mi][ni][2 * r + h];
        }
}
#else
    int col[8];
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int n = n0 + tx + 16 * j;
        col[j] = n < N ? ccol[n] : -1;
    }
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        if (m >= M) continue;
        float* row = dst + mrow[m];
        #pragma unroll
        for (int j = 0; j < 8; ++j)
            if (col[j] >= 0) row[col[j]] = acc[i][j];
    }
}
#endif
"""


def source(dense_b, bk=BK, min_blocks=2, tc=False):
    return (f"#define DENSE_B {int(dense_b)}\n#define TC {int(tc)}\n#define BK {bk}\n"
            f"#define MIN_BLOCKS {min_blocks}\n" + _SOURCE)


# ------------------------------------------------------------------ planning (NumPy)

@dataclass(frozen=True)
class Gemm:
    """One launch: tables (int32) and where its A matrix sits in the gathered weights."""
    krow: np.ndarray        # (K, 4): source offset, then the per-dim offsets e (3 dims)
    ncol: np.ndarray        # (N, 4): source offset, then the per-dim origins j
    mrow: np.ndarray        # (M,): destination offset of row m
    ccol: np.ndarray        # (N,): destination offset of column n
    a_index: np.ndarray     # (K*M,): flat weight index of A[k, m]
    a_form: str             # on the device: "weight" (w itself), "transposed" (w.T) or "gather"
    extents: tuple          # the source's extent per dim (3)

    @property
    def shape(self):
        return self.krow.shape[0], self.mrow.shape[0], self.ncol.shape[0]


def _grid(sizes):
    """Row-major coordinates of a grid as (count, len(sizes)) int64."""
    if not sizes:
        return np.zeros((1, 0), dtype=np.int64)
    return np.stack(np.meshgrid(*[np.arange(n) for n in sizes], indexing="ij"), -1).reshape(-1, len(sizes))


def _pitches(size):
    return np.array([math.prod(size[d + 1:]) for d in range(len(size))], dtype=np.int64)


def _pad3(coords):
    """(count, nd) -> (count, 3): unused dims get coordinate 0, always inside extent 1."""
    out = np.zeros((coords.shape[0], 3), dtype=np.int64)
    out[:, :coords.shape[1]] = coords
    return out


def _table(off, coords):
    return np.concatenate([off[:, None], _pad3(coords)], axis=1).astype(np.int32)


def _extents(size):
    return tuple(size) + (1,) * (3 - len(size))


def fits(g):
    return (g.batch * max(g.x_channels * math.prod(g.x_size), g.y_channels * math.prod(g.y_size)) < 2 ** 31
            and g.y_channels * g.x_channels * g.taps < 2 ** 31)


def forward_plan(g):
    """y = conv(x, w): k = (ci, tap), m = co, n = (sample, output position)."""
    nd, cx, cy = g.nd, g.x_channels, g.y_channels
    xp, xplane = _pitches(g.x_size), math.prod(g.x_size)
    taps = _grid(g.kernel) * np.array(g.dilation)                     # (P, nd) offsets e
    ci = np.repeat(np.arange(cx), len(taps))
    e = np.tile(taps, (cx, 1))
    krow = _table(ci * xplane + e @ xp, e)
    pos = _grid(g.y_size)
    origin = pos * np.array(g.stride) - np.array(g.pad_lo)           # (Ysp, nd) origins j
    sample = np.repeat(np.arange(g.batch), len(pos))
    j = np.tile(origin, (g.batch, 1))
    ncol = _table(sample * cx * xplane + j @ xp, j)
    ysp = len(pos)
    mrow = (np.arange(cy) * ysp).astype(np.int32)
    ccol = (sample * cy * ysp + np.tile(np.arange(ysp), g.batch)).astype(np.int32)
    # A[k, m] = w[m, k] with w as (Cy, Cx*P)
    kk, mm = np.meshgrid(np.arange(cx * len(taps)), np.arange(cy), indexing="ij")
    return (Gemm(krow, ncol, mrow, ccol, (mm * cx * len(taps) + kk).reshape(-1), "transposed", _extents(g.x_size)),)


def _phase_taps(r, k, s, d, p):
    """Taps t of one dim that reach gradient phase r, with their offsets into gy."""
    ts = [t for t in range(k) if (r + p - d * t) % s == 0]
    return ts, [(r + p - d * t) // s for t in ts]


def backward_input_plan(g):
    """gx = conv^T(gy, w), phase by phase (see the module docstring)."""
    nd, cx, cy, P = g.nd, g.x_channels, g.y_channels, g.taps
    xp, xplane = _pitches(g.x_size), math.prod(g.x_size)
    yp, yplane = _pitches(g.y_size), math.prod(g.y_size)
    sxp = np.array(g.stride) * xp
    phases = list(itertools.product(*[range(min(sd, xd)) for sd, xd in zip(g.stride, g.x_size)]))
    per_dim = [[_phase_taps(r[d], g.kernel[d], g.stride[d], g.dilation[d], g.pad_lo[d]) for d in range(nd)]
               for r in phases]
    if (not any(g.pad_lo) and all(xd == sd * yd for xd, sd, yd in zip(g.x_size, g.stride, g.y_size))
            and all(es == [0] for dims in per_dim for _, es in dims)):
        # k = s without padding: every (phase, tap) pair is a row of one GEMM, with
        # k = co and m = (ci, tap): A is w as (Cy, Cx*P) itself
        # (the kernel runs it once per sample: the columns are one sample's positions)
        taps = _grid(g.kernel)
        j = _grid(g.y_size)
        return (Gemm(krow=_table(np.arange(cy) * yplane, np.zeros((cy, nd), np.int64)),
                     ncol=_table(j @ yp, j),
                     mrow=(np.repeat(np.arange(cx), P) * xplane + np.tile(taps @ xp, cx)).astype(np.int32),
                     ccol=(j @ sxp).astype(np.int32),
                     a_index=np.arange(cy * cx * P), a_form="weight", extents=_extents(g.y_size)),)
    plans = []
    for r, dims in zip(phases, per_dim):
        tap_sets = [ts for ts, _ in dims]
        if all(tap_sets):
            pick = _grid([len(ts) for ts in tap_sets])                 # (T, nd) choices per dim
            flat_t = np.zeros(len(pick), dtype=np.int64)
            offs = np.zeros((len(pick), nd), dtype=np.int64)
            for d, (ts, es) in enumerate(dims):
                flat_t = flat_t * g.kernel[d] + np.array(ts)[pick[:, d]]
                offs[:, d] = np.array(es)[pick[:, d]]
        else:                                                          # no tap reaches: zeros (K = 0)
            flat_t, offs = np.zeros(0, dtype=np.int64), np.zeros((0, nd), dtype=np.int64)
        T = len(flat_t)
        counts = [-(-(xd - rd) // sd) for xd, rd, sd in zip(g.x_size, r, g.stride)]
        pos = _grid(counts)
        sample = np.repeat(np.arange(g.batch), len(pos))
        j = np.tile(pos, (g.batch, 1))
        e = np.tile(offs, (cy, 1))
        # A[(co, tt), ci] = w[co, ci, flat_t[tt]]
        co, tt, ci = np.meshgrid(np.arange(cy), np.arange(T), np.arange(cx), indexing="ij")
        plans.append(Gemm(krow=_table(np.repeat(np.arange(cy), T) * yplane + e @ yp, e),
                          ncol=_table(sample * cy * yplane + j @ yp, j),
                          mrow=(np.arange(cx) * xplane + np.array(r) @ xp).astype(np.int32),
                          ccol=(sample * cx * xplane + j @ sxp).astype(np.int32),
                          a_index=((co * cx + ci) * P + flat_t[tt]).reshape(-1), a_form="gather",
                          extents=_extents(g.y_size)))
    return tuple(plans)


def applies(op, g):
    return op in ("forward", "backward_input") and g.groups == 1 and g.nd in (1, 2, 3) and fits(g)


# ------------------------------------------------------------------ the algorithm (CuPy)

class ImplicitGemm(Algorithm):
    """See the module docstring."""

    name = "implicit_gemm"
    deterministic = True

    def __init__(self, fp32_math="ieee"):
        self._functions = {}
        self._plans = {}
        self.fp32_math = fp32_math
        if fp32_math == "tf32x3":       # the same GEMM on TF32 tensor cores (3xTF32)
            self.name = "implicit_tf32x3"

    def supports(self, op, g, dtype):
        if np.dtype(dtype) != np.float32 or not applies(op, g):
            return False
        if self.fp32_math == "tf32x3":
            from . import gpu_blas
            return gpu_blas.tf32x3_takes(dtype, gpu_blas.conv_sum_length(op, g))
        return True

    def preferred(self, op, g, dtype):
        # k = s > 1 transposed convolutions: one GEMM with the depth-to-space in its stores
        return (op == "backward_input" and any(s > 1 for s in g.stride)
                and self._host_plan(op, g)[0].a_form == "weight")

    def _host_plan(self, op, g):
        key = ("host", op, g)
        found = self._plans.get(key)
        if found is None:
            found = forward_plan(g) if op == "forward" else backward_input_plan(g)
            self._remember(key, found)
        return found

    def _remember(self, key, value):
        if len(self._plans) > 256:
            self._plans.clear()
        self._plans[key] = value

    def _device_plan(self, cp, op, g):
        key = (cp.cuda.runtime.getDevice(), op, g)
        found = self._plans.get(key)
        if found is None:
            plans = self._host_plan(op, g)
            form = plans[0].a_form
            gemms, starts = [], np.zeros(5, dtype=np.int64)
            for p in plans:
                K, M, N = p.shape
                gemms.append([K, M, N, *starts])
                starts += (K * M, K, N, M, N)
            tables = [np.concatenate([getattr(p, name) for p in plans])
                      for name in ("krow", "ncol", "mrow", "ccol")]
            grid = (-(-max(p.shape[2] for p in plans) // BN), -(-max(p.shape[1] for p in plans) // BM),
                    g.batch if form == "weight" else len(plans))
            a_index = (cp.asarray(np.concatenate([p.a_index for p in plans]).astype(np.int32))
                       if form == "gather" else None)
            found = (form, a_index,
                     tuple(cp.asarray(t) for t in tables), cp.asarray(np.array(gemms, dtype=np.int32)), grid,
                     tuple(np.int32(e) for e in plans[0].extents), tuple(np.int32(v) for v in plans[0].shape))
            self._remember(key, found)
        return found

    def _function(self, cp, dense_b):
        key = (cp.cuda.runtime.getDevice(), dense_b)
        fn = self._functions.get(key)
        if fn is None:
            code = source(dense_b, tc=self.fp32_math == "tf32x3")
            fn = self._functions[key] = cp.RawModule(code=code).get_function("implicit_gemm")
        return fn

    def run(self, engine, op, a, b, g):
        import cupy as cp
        out = cp.empty(g.y_shape if op == "forward" else g.x_shape, dtype=a.dtype)
        if out.size == 0:
            return out
        form, a_index, tables, gemms, grid, extents, shape = self._device_plan(cp, op, g)
        if form == "weight":
            weights = b
        else:                       # every GEMM's A, gathered in one pass
            weights = cp.ascontiguousarray(b.reshape(g.y_channels, -1).T) if form == "transposed" \
                else cp.take(b.reshape(-1), a_index)
            engine._note(weights)
        dense = form == "weight"    # k = s: B is gy itself, B[k, n] = gy[k * plane + n], a GEMM per sample
        fn = self._function(cp, dense)
        samples = (np.int64(g.y_channels * math.prod(g.y_size)), np.int64(g.x_channels * math.prod(g.x_size)))
        for n0 in range(0, grid[2], 65535):          # grid z is at most 65535
            n1 = min(grid[2], n0 + 65535)
            fn(grid[:2] + (n1 - n0,), (THREADS,),
               (weights, a[n0:] if dense else a, out[n0:] if dense else out, *tables, gemms, *extents,
                np.int32(math.prod(g.y_size)), *samples, *shape))
        return out
