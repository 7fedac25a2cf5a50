"""Kernel = stride convolutions as one GEMM with the phase shuffle folded in: ``ks_gemm``.

When every kernel extent equals its stride (no padding, no dilation, one group), each
input position of a convolution meets each weight once, and the call is one GEMM per
sample over (channel, tap) pairs:

* input gradient (a transposed convolution's forward):
  ``gx[ci, s*i + t] = sum_co w[co, ci, t] * gy[co, i]`` -- C = A^T B with
  A = w as (Cy, Cx*P), B = gy as (Cy, Ysp), the result scattered to ``gx``;
* forward: ``y[co, i] = sum_(ci,t) w[co, ci, t] * x[ci, s*i + t]`` -- B gathered from
  ``x``, the result dense.

``phases`` does the same with a cuBLAS GEMM into a temporary and a separate
(depth-to-space or space-to-depth) copy.  Here one kernel reads or writes the strided
positions directly through two offset tables: ``taps[(c, t)] = c*plane + sum_d t_d *
pitch_d`` and ``cols[i] = sum_d s_d * i_d * pitch_d``, so the shuffle costs no pass over
memory and no temporary.  The GEMM is the classic shared-memory tiling: a 128 x 128
block tile, 16-deep k steps double-buffered, 8 x 8 results per thread, two blocks per
SM.  For the scattered form a thread's columns are 16 apart, so that a warp's stores
cover consecutive positions; the dense form reads 4-column fragments as float4.
Measured on an H200 with ``scripts/ks_sweep.py`` (``t2d_unet_k2s2``/``t3d_unet_k2s2``,
8.6 GFLOP each): input gradient 0.27 ms (cuDNN 0.45-1.2 ms, ``phases`` 0.42 ms);
forward 0.26-0.28 ms.  8-deep k steps were 6% slower, one block per SM 20% slower,
pairing the two taps of a k = 2 dim into 8-byte stores no faster.

float32 only (float16 goes to cuDNN's tensor cores; float64 is not a speed path).
Flat offsets within one sample are 32-bit; samples are offset in 64 bits.
"""
from __future__ import annotations

import math

import numpy as np

from .registry import Algorithm

BM = BN = 128
BK = 16
THREADS = 256

_SOURCE = r"""
#define BM 128
#define BN 128
#define LOADS (BK / 2)

// C (M x N) = A^T B, A stored (K, M), B (K, N) per sample.  GATHER_B: B[k][n] is
// b[koff[k] + noff[n]].  SCATTER_C: C[m][n] goes to c[moff[m] + noff[n]].
extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS)
ks_gemm(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
        const int* __restrict__ koff, const int* __restrict__ moff, const int* __restrict__ noff,
        int M, int N, int K, long long b_sample, long long c_sample)
{
    __shared__ __align__(16) float As[2][BK][BM];
    __shared__ __align__(16) float Bs[2][BK][BN];
    const int tid = threadIdx.x;
    const int tx = tid & 15, ty = tid >> 4;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    b += (long long)blockIdx.z * b_sample;
    c += (long long)blockIdx.z * c_sample;

    // Tile loads: element tid + 256 r (r < BK/2) of a BK x 128 tile is row lrow + 2 r,
    // column lcol, so each warp reads 32 consecutive floats of a row.
    const int lcol = tid & 127, lrow = tid >> 7;
    const bool a_in = m0 + lcol < M;
    const bool b_in = n0 + lcol < N;
#if GATHER_B
    const int b_col = b_in ? noff[n0 + lcol] : 0;
#endif
    float ra[LOADS], rb[LOADS];

#define LOAD_TILE(k0)                                                              \
    _Pragma("unroll") for (int r = 0; r < LOADS; ++r) {                            \
        const int k = (k0) + lrow + 2 * r;                                         \
        ra[r] = (a_in && k < K) ? a[(long long)k * M + m0 + lcol] : 0.f;           \
        rb[r] = (b_in && k < K) ? B_AT(k) : 0.f;                                   \
    }
#if GATHER_B
#define B_AT(k) b[koff[k] + b_col]
#else
#define B_AT(k) b[(long long)(k) * N + n0 + lcol]
#endif
#define STORE_TILE(buf)                                                            \
    _Pragma("unroll") for (int r = 0; r < LOADS; ++r) {                            \
        As[buf][lrow + 2 * r][lcol] = ra[r];                                       \
        Bs[buf][lrow + 2 * r][lcol] = rb[r];                                       \
    }

    float acc[8][8];
    #pragma unroll
    for (int i = 0; i < 8; ++i)
        #pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

    LOAD_TILE(0);
    STORE_TILE(0);
    __syncthreads();
    int buf = 0;
    for (int k0 = 0; k0 < K; k0 += BK) {
        const bool more = k0 + BK < K;
        if (more) { LOAD_TILE(k0 + BK); }
        #pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][64 + ty * 4]);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#if VEC_B
            const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&Bs[buf][kk][64 + tx * 4]);
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#else
            float bv[8];
            #pragma unroll
            for (int j = 0; j < 8; ++j) bv[j] = Bs[buf][kk][tx + 16 * j];
#endif
            #pragma unroll
            for (int i = 0; i < 8; ++i)
                #pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        // the other buffer was last read before the previous barrier
        if (more) { STORE_TILE(buf ^ 1); }
        __syncthreads();
        buf ^= 1;
    }

    int col[8];
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
#if VEC_B
        const int n = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
#else
        const int n = n0 + tx + 16 * j;
#endif
#if SCATTER_C
        col[j] = n < N ? noff[n] : -1;
#else
        col[j] = n < N ? n : -1;
#endif
    }
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        if (m >= M) continue;
#if SCATTER_C
        float* row = c + moff[m];
#else
        float* row = c + (long long)m * N;
#endif
        #pragma unroll
        for (int j = 0; j < 8; ++j)
            if (col[j] >= 0) row[col[j]] = acc[i][j];
    }
}
"""


def source(gather_b, scatter_c, bk=BK, min_blocks=2, vec_b=None):
    """The kernel for one operand form.  ``vec_b`` (default: when C is dense) gives each
    thread 4-column fragments read as float4: faster loads, but a scattered C then
    stores at 4x the stride."""
    vec_b = not scatter_c if vec_b is None else vec_b
    return (f"#define GATHER_B {int(gather_b)}\n#define SCATTER_C {int(scatter_c)}\n"
            f"#define BK {bk}\n#define MIN_BLOCKS {min_blocks}\n#define VEC_B {int(vec_b)}\n" + _SOURCE)


def applies(g):
    """k = s in every dim (s > 1 in one at least), no padding or dilation, one group, and
    the strided side exactly s times the other, so every position is one tap's."""
    return (g.groups == 1 and all(d == 1 for d in g.dilation)
            and all(k == s for k, s in zip(g.kernel, g.stride)) and any(s > 1 for s in g.stride)
            and not any(g.pad_lo) and not any(g.pad_hi)
            and all(xs == s * ys for xs, s, ys in zip(g.x_size, g.stride, g.y_size))
            and g.x_channels * math.prod(g.x_size) < 2 ** 31)


def offset_tables(g):
    """(taps, cols) as int32 host arrays: a (channel, tap) pair's offset into one sample
    of the strided side, and an unstrided position's offset (see the module docstring)."""
    nd = g.nd
    pitch = [math.prod(g.x_size[d + 1:]) for d in range(nd)]
    taps = np.zeros(1, dtype=np.int64)
    cols = np.zeros(1, dtype=np.int64)
    for d in range(nd):
        taps = (taps[:, None] + np.arange(g.kernel[d]) * pitch[d]).reshape(-1)
        cols = (cols[:, None] + np.arange(g.y_size[d]) * g.stride[d] * pitch[d]).reshape(-1)
    plane = math.prod(g.x_size)
    taps = (np.arange(g.x_channels)[:, None] * plane + taps[None, :]).reshape(-1)
    return taps.astype(np.int32), cols.astype(np.int32)


class KsGemm(Algorithm):
    """See the module docstring."""

    name = "ks_gemm"
    deterministic = True

    def __init__(self):
        self._functions = {}
        self._tables = {}

    def supports(self, op, g, dtype):
        return (op in ("forward", "backward_input") and np.dtype(dtype) == np.float32
                and g.nd in (1, 2, 3) and applies(g))

    def preferred(self, op, g, dtype):
        return op == "backward_input"

    def _function(self, cp, gather_b, scatter_c):
        key = (cp.cuda.runtime.getDevice(), gather_b, scatter_c)
        fn = self._functions.get(key)
        if fn is None:
            fn = self._functions[key] = cp.RawModule(code=source(gather_b, scatter_c)).get_function("ks_gemm")
        return fn

    def _device_tables(self, cp, g):
        key = (cp.cuda.runtime.getDevice(), g.x_channels, g.x_size, g.kernel, g.y_size)
        found = self._tables.get(key)
        if found is None:
            if len(self._tables) > 256:
                self._tables.clear()
            found = self._tables[key] = tuple(cp.asarray(t) for t in offset_tables(g))
        return found

    def run(self, engine, op, a, b, g):
        import cupy as cp
        taps, cols = self._device_tables(cp, g)
        batch, cx, cy = g.batch, g.x_channels, g.y_channels
        ysp, xsp = math.prod(g.y_size), math.prod(g.x_size)
        if op == "backward_input":
            # C (Cx*P, Ysp) = w(Cy, Cx*P)^T gy(Cy, Ysp), scattered into gx
            out = cp.empty(g.x_shape, dtype=a.dtype)
            m, k = cx * g.taps, cy
            a_mat, b_src = b, a
            strides = (np.int64(cy * ysp), np.int64(cx * xsp))
            fn = self._function(cp, False, True)
        else:
            # C (Cy, Ysp) = w(Cy, Cx*P) B, B[(ci, t), i] gathered from x
            out = cp.empty(g.y_shape, dtype=a.dtype)
            m, k = cy, cx * g.taps
            wt = cp.ascontiguousarray(b.reshape(cy, k).T)      # (K, M)
            engine._note(wt)
            a_mat, b_src = wt, a
            strides = (np.int64(cx * xsp), np.int64(cy * ysp))
            fn = self._function(cp, True, False)
        if out.size == 0:
            return out
        grid = (-(-ysp // BN), -(-m // BM))
        for n0 in range(0, batch, 65535):          # grid z is at most 65535
            n1 = min(batch, n0 + 65535)
            fn(grid + (n1 - n0,), (THREADS,),
               (a_mat, b_src[n0:n1], out[n0:n1], taps, taps, cols, np.int32(m), np.int32(ysp), np.int32(k),
                *strides))
        return out
