"""The ``direct`` CPU algorithm: register tiles (cpu_direct) against NumPy and the float64 loops."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ndconv
from ndconv.engine import cpu_direct as cd
from ndconv.engine.cpu import CPUEngine
from strategies import at_thread_counts, conv_cases

pytestmark = pytest.mark.skipif(not cd.AVAILABLE, reason="numba not installed")
rng = np.random.default_rng(11)


def geometry(x_shape, w_shape, **kw):
    return ndconv.conv_geometry(x_shape, w_shape, None, **kw)[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nv", [1, 2, 3, 4])
@pytest.mark.parametrize("short", range(-max(cd.LONG_FOR), max(cd.SHORT_FOR) + 1))
@pytest.mark.parametrize("accumulate", [0, 1])
def test_tile_is_a_strided_multiply_add_over_taps(dtype, nv, short, accumulate):
    """c[i, n] (+)= sum_t sum_k a[t-offset + i*a_rs + k*a_cs] * b[t-offset + k*b_rs + n], for
    every tile shape (MR_FOR[nv] rows, up to SHORT_FOR[nv] fewer or LONG_FOR[nv] more)."""
    from numba import njit
    if short > cd.SHORT_FOR[nv] or -short > cd.LONG_FOR[nv]:
        pytest.skip("no such tile")
    mr, width, k_len = cd.MR_FOR[nv] - short, nv * cd.lanes(dtype), 5
    a = rng.standard_normal(4000).astype(dtype)
    b = rng.standard_normal(4000).astype(dtype)
    c = rng.standard_normal(mr * (width + 3) + 7).astype(dtype)
    toff_a, toff_b = np.array([0, 40, 9]), np.array([3, 1000, 2000])
    a_off, a_rs, a_cs, b_off, b_rs, c_off, ldc = 5, 7, 2 * mr + 1, 11, width + 2, 7, width + 3

    @njit
    def call(c, a, b, toff_a, toff_b):
        cd._tile(nv, mr, c, c_off, ldc, a, a_off, a_rs, a_cs, b, b_off, b_rs, k_len, toff_a, toff_b, accumulate)
    want = c.copy()
    block = np.zeros((mr, width))
    for ta, tb in zip(toff_a, toff_b):
        rows = np.array([[a[a_off + ta + i * a_rs + k * a_cs] for k in range(k_len)] for i in range(mr)])
        cols = np.array([b[b_off + tb + k * b_rs:][:width] for k in range(k_len)])
        block += rows.astype(np.float64) @ cols
    for i in range(mr):
        row = want[c_off + i * ldc:][:width]
        row[...] = block[i] + (row if accumulate else 0)
    call(c, a, b, toff_a, toff_b)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, want, rtol=tol, atol=tol)


def check_against_reference(e, g, args, size, dtypes=(np.float64, np.float32)):
    import reference as ref
    x, w, gy = (rng.standard_normal(s) for s in (g.x_shape, g.w_shape, g.y_shape))
    expected = {"forward": ref.conv(x, w, None, **args),
                "backward_input": ref.conv_grad_input(gy, w, size, **args),
                "backward_weight": ref.conv_grad_weight(x, gy, w.shape, **args)}
    operands = {"forward": (x, w), "backward_input": (gy, w), "backward_weight": (x, gy)}
    ran = 0
    for op, want in expected.items():
        if not e.supports("direct", op, g, 8):
            continue
        ran += 1
        for dtype in dtypes:
            tol = 1e-10 if dtype == np.float64 else 1e-4
            with e.force("direct"):
                got = getattr(e, op)(*(v.astype(dtype) for v in operands[op]), g)
            assert got.dtype == dtype
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()),
                                       err_msg=f"{op} {dtype.__name__} {g}")
    return ran


@settings(max_examples=60, deadline=None)
# channels per group: a few, or past one vector of columns (tails of 1-3 vectors)
@given(c=conv_cases(per_group=st.one_of(st.integers(1, 4), st.integers(15, 21)), size_slack=5))
def test_direct_matches_reference_on_drawn_geometries(c):
    """Forced ``direct`` (1-3-D, strides through phases, dilations, asymmetric padding, groups)."""
    g = geometry((c["batch"], c["c_in"]) + c["size"], (c["c_out"], c["c_in"] // c["groups"]) + c["kernel"],
                 stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    args = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    check_against_reference(CPUEngine(), g, args, c["size"])


@pytest.mark.parametrize("c_in,c_out,groups", [(13, 80, 1), (26, 150, 2), (70, 35, 1)])
def test_direct_wide_channels_cut_into_column_blocks(c_in, c_out, groups):
    """More than 64 output channels per group (several column blocks, a narrower last one),
    input channels that are not a multiple of the tile rows."""
    g = geometry((2, c_in, 7, 6), (c_out, c_in // groups, 3, 2), padding=((1, 1), (0, 1)), groups=groups)
    args = dict(padding=((1, 1), (0, 1)), groups=groups)
    assert check_against_reference(CPUEngine(), g, args, (7, 6)) == 3


def test_direct_forward_many_blocks_and_threads():
    """A grid of several forward blocks per thread, cut runs across block edges."""
    g = geometry((3, 8, 41, 37), (16, 8, 3, 3), padding=1)
    assert check_against_reference(CPUEngine(), g, dict(padding=1), (41, 37), dtypes=(np.float32,)) == 3


@pytest.mark.parametrize("runs", [False, True])
@pytest.mark.parametrize("size,kernel,stride,padding,c_in,c_out,groups", [
    ((9, 8), (3, 3), 2, 1, 13, 80, 1),          # strided, two column blocks, odd rows
    ((6, 5, 7), (2, 2, 2), 2, 0, 20, 150, 2),   # 3-D, groups, a narrow last block
    ((17,), (4,), 2, 1, 70, 35, 1),             # 1-D, rows split in halves for balance
    ((5, 5), (3, 3), 1, 1, 4, 3, 1),            # one run per part or fewer
])
def test_direct_weight_gradient_by_runs_and_by_parts(monkeypatch, runs, size, kernel, stride, padding,
                                                    c_in, c_out, groups):
    """Both weight-gradient schemes (forced) against the float64 reference."""
    monkeypatch.setattr(cd, "GRADIENT_RUNS", runs)
    monkeypatch.setattr(cd, "GRADIENT_BYTES", 2 << 10)             # several runs per call
    g = geometry((2, c_in) + size, (c_out, c_in // groups) + kernel, stride=stride, padding=padding,
                 groups=groups)
    import reference as ref
    x, gy = rng.standard_normal(g.x_shape), rng.standard_normal(g.y_shape)
    want = ref.conv_grad_weight(x, gy, g.w_shape, stride=stride, padding=padding, groups=groups)
    e = CPUEngine()
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        with e.force("direct"):
            got = e.backward_weight(x.astype(dtype), gy.astype(dtype), g)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_gradient_runs_cut_equal_lengths_up_to_chunk():
    items = np.array([[0, 0, 5]] * 5 + [[0, 0, 3]] * 2 + [[0, 0, 5]], dtype=np.int64)
    assert cd.gradient_runs(items, 2).tolist() == [[0, 2], [2, 4], [4, 5], [5, 7], [7, 8]]
    assert cd.gradient_runs(items[:0], 2).shape == (0, 2)


def test_direct_weight_gradient_by_runs_for_few_positions():
    """The rule: c2d_resnet_s2's shape (14x14 outputs, 128 -> 256 channels) goes by runs."""
    g = geometry((8, 128, 28, 28), (256, 128, 3, 3), stride=2, padding=1)
    e = CPUEngine()
    ygp, _, nv, rows = e._direct_columns(g, np.dtype(np.float32))
    cgp = cd.round_up(128, math.lcm(*rows))
    assert cd.PARTS * 9 * cgp * ygp * 4 >= cd.RUNS_BYTES * 8 * 14 * 14


@pytest.mark.parametrize("runs,padding,stride", [(False, 1, 1), (True, 1, 1), (False, 0, 2), (True, 0, 2)])
def test_direct_weight_gradient_does_not_depend_on_threads(monkeypatch, runs, padding, stride):
    """By parts and by runs, from a copy of x or (unpadded) from x itself."""
    monkeypatch.setattr(cd, "GRADIENT_RUNS", runs)
    g = geometry((2, 24, 30, 30), (32, 24, 3, 3), padding=padding, stride=stride)
    x, gy = rng.standard_normal(g.x_shape).astype(np.float32), rng.standard_normal(g.y_shape).astype(np.float32)
    e = CPUEngine()

    def run():
        with e.force("direct"):
            return e.backward_weight(x, gy, g)
    results = at_thread_counts(run)
    np.testing.assert_array_equal(results[0], results[1])


@settings(max_examples=40, deadline=None)
@given(nb=st.integers(1, 3), nd=st.integers(1, 3), length=st.sampled_from([1, 2, 5, 384]), data=st.data())
def test_segments_cover_every_output_once(nb, nd, length, data):
    """Segments tile every output row once; their grid positions and y offsets match a direct count."""
    ints = st.lists(st.integers(1, 3), min_size=nd, max_size=nd)
    kernel, stride, dilation = data.draw(ints), data.draw(ints), data.draw(ints)
    size = tuple(data.draw(st.integers(d * (k - 1) + 1, d * (k - 1) + 9)) for k, d in zip(kernel, dilation))
    cy = 3
    g = geometry((nb, 2) + size, (cy, 2) + tuple(kernel), stride=tuple(stride), dilation=tuple(dilation))
    fwd, bwd = cd.segments(g, length)
    need = [(o - 1) * s + d * (k - 1) + 1 for o, s, d, k in zip(g.y_size, g.stride, g.dilation, g.kernel)]
    seen = np.zeros(g.y_shape, int)
    dense = np.zeros((nb,) + g.y_size, int)
    for (grid, y_off, n), (grid2, row, n2) in zip(fwd, bwd):
        assert (grid, n) == (grid2, n2) and 1 <= n <= length
        idx = np.unravel_index(y_off + np.arange(n), g.y_shape)
        assert (idx[1] == 0).all()                                     # channel 0 of each output
        seen[idx] += 1
        dense.reshape(-1)[row:row + n] += 1
        # the first output's window corner on the padded grid (nb, *need)
        o = [i[0] for i in idx[2:]]
        corner = idx[0][0] * math.prod(need) + sum(v * s * math.prod(need[i + 1:])
                                                     for i, (v, s) in enumerate(zip(o, g.stride)))
        assert grid == corner
        np.testing.assert_array_equal(idx[-1], o[-1] + np.arange(n))  # one row, consecutive
    assert (seen[:, 0] == 1).all() and (seen[:, 1:] == 0).all() and (dense == 1).all()


def test_direct_is_a_candidate_for_float32_and_float64_only():
    e = CPUEngine()
    g = geometry((1, 4, 5, 5), (4, 4, 3, 3), padding=1)
    assert e.supports("direct", "forward", g, 4) and e.supports("direct", "forward", g, 8)
    assert not e.supports("direct", "forward", g, 2)


@pytest.mark.parametrize("size,kernel,stride,padding,dilation,c_in,c_out,groups", [
    ((9, 8), (3, 3), (2, 2), 1, 1, 16, 24, 1),                 # 3x3 s2: phases of 4, 2, 2, 1 taps
    ((7,), (1,), (3,), 0, 1, 4, 5, 1),                         # kernel < stride: phases no tap reaches
    ((6, 5, 7), (4, 2, 3), (2, 3, 1), (1, 0, 2), (1, 2, 1), 6, 8, 2),
    ((11,), (4,), (2,), 1, 2, 17, 33, 1),                      # dilation, column tail blocks
    ((10, 10), (2, 2), (2, 2), 0, 1, 32, 64, 1),               # k = s: one tap per phase
    ((8, 9), (4, 4), (2, 2), ((1, 2), (2, 1)), 1, 8, 70, 1),   # asymmetric padding, 70 channels
])
def test_direct_strided_input_gradient_runs_per_phase(size, kernel, stride, padding, dilation, c_in, c_out, groups):
    """The strided input gradient (a transposed convolution): one forward per phase of x."""
    g = geometry((2, c_in) + size, (c_out, c_in // groups) + kernel, stride=stride, padding=padding,
                 dilation=dilation, groups=groups)
    e = CPUEngine()
    assert e.supports("direct", "backward_input", g, 4)
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert check_against_reference(e, g, args, size) == 3


def test_transposed_phases_cover_every_x_position_once():
    g = geometry((2, 3, 9, 10), (4, 3, 3, 4), stride=(2, 3), padding=(1, 2), dilation=(2, 1))
    need, lo, parts = cd.transposed_phases(g)
    seen = np.zeros(g.x_shape, int)
    for items, taps, offsets in parts:
        assert len(taps) == len(offsets)
        for _, x_off, n in items:
            idx = np.unravel_index(x_off + np.arange(n) * g.stride[-1], g.x_shape)
            assert (idx[1] == 0).all()
            seen[idx] += 1
    assert (seen[:, 0] == 1).all() and (seen[:, 1:] == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("groups,p,q,k,pad", [(1, 37, 20, 9, 11), (3, 5, 33, 4, 0), (2, 16, 16, 1, 16)])
def test_weights_lay_out_the_kernel_for_tiles(dtype, groups, p, q, k, pad):
    """cd.weights against NumPy's transposes: both layouts, a subset of the taps in any
    order, zero padding past w's extent (the buffer starts as garbage)."""
    w = rng.standard_normal((groups, p, q, k)).astype(dtype)
    for swap, extent_a, extent_b in ((False, q, p), (True, p, q)):
        for taps in (np.arange(k), np.arange(k)[::-1][::2].copy()):
            out = np.full((groups, taps.size, extent_a, extent_b + pad), np.nan, dtype)
            cd.weights(w, taps, swap, out)
            want = np.zeros_like(out)
            want[..., :extent_b] = (w[..., taps].transpose(0, 3, 1, 2) if swap
                                    else w[..., taps].transpose(0, 3, 2, 1))
            np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parts,taps,groups,cg,yg", [(4, 9, 1, 13, 37), (1, 16, 2, 5, 16), (4, 1, 3, 2, 3)])
def test_sum_parts_adds_the_parts_in_order_into_the_kernel_layout(dtype, parts, taps, groups, cg, yg):
    """cd.sum_parts against NumPy's sum in part order (the same bits), padded rows and columns ignored."""
    lanes = cd.lanes(dtype)
    gw = rng.standard_normal((parts, taps, groups, cg + 3, cd.round_up(yg, lanes))).astype(dtype)
    out = np.full((groups, yg, cg, taps), np.nan, dtype)
    cd.sum_parts(gw, cg, yg, out)
    want = gw[0].copy()
    for p in range(1, parts):
        want += gw[p]
    np.testing.assert_array_equal(out, want[:, :, :cg, :yg].transpose(1, 3, 2, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_pack_moves_runs_in_transposed_blocks_and_the_rest_element_by_element(dtype, data):
    """cd.pack against NumPy's gather on drawn position maps: runs of consecutive positions
    of every length (below, at and past the lanes, and across the 256-position spans the
    threads take), padding (-1), and column blocks whole, partial, permuted or zero."""
    lanes = cd.lanes(dtype)
    channels, plane = data.draw(st.integers(1, 3 * lanes + 3)), data.draw(st.integers(1, 700))
    x = rng.standard_normal(channels * plane + 3 * lanes).astype(dtype)
    src = []
    while len(src) < data.draw(st.integers(1, 600)):
        if data.draw(st.booleans()):
            src += [-1] * data.draw(st.integers(1, 5))
        else:
            n = data.draw(st.integers(1, 3 * lanes + 2))
            start = data.draw(st.integers(0, plane - 1))
            src += range(start, min(plane, start + n))
    src = np.array(src, np.int64)
    kind = data.draw(st.sampled_from(["identity", "zero tail", "permuted"]))
    columns = np.arange(channels)
    if kind == "zero tail":
        columns = np.concatenate([columns, np.full(data.draw(st.integers(1, lanes)), -1)])
    elif kind == "permuted":
        columns = np.array(data.draw(st.permutations(range(channels))))
    cmap = np.where(columns >= 0, columns * plane, -1).astype(np.int64)
    out = np.full((src.size, cmap.size), np.nan, dtype)
    cd.pack(x, src, cmap, plane, out)
    want = np.where((src[:, None] >= 0) & (cmap[None, :] >= 0), x[np.maximum(0, src[:, None] + cmap[None, :])], 0)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("size,kernel,stride,dilation,hi,c_in,c_out,groups", [
    ((8, 6, 10), (2, 2, 2), 2, 1, 0, 13, 64, 1),     # k2s2 (t3d_unet's shape), 13 rows: tiles of 5, 4, 4
    ((11, 9), (3, 2), (2, 3), (1, 2), 1, 34, 128, 2), # groups, dilation, a tail past the last window
    ((23,), (4,), 3, 2, 0, 70, 150, 1),               # 1-D, column blocks and a narrower one
    ((7, 7), (3, 3), 1, 1, 0, 30, 8, 1),              # stride 1, 8 columns (tiles of 16 rows)
])
@pytest.mark.parametrize("runs", [True, False])
def test_direct_weight_gradient_reads_unpadded_x_itself(monkeypatch, runs, size, kernel, stride, dilation, hi,
                                                        c_in, c_out, groups):
    """Unpadded windows: both schemes read x itself (channel pitch, rows not a multiple of
    the tile's) and give the bits of the channels-last copy, and the reference."""
    monkeypatch.setattr(cd, "GRADIENT_RUNS", runs)
    monkeypatch.setattr(cd, "GRADIENT_BYTES", 2 << 10)             # several runs per call
    padding = tuple((0, hi) for _ in size)
    g = geometry((2, c_in) + size, (c_out, c_in // groups) + kernel, stride=stride, padding=padding,
                 dilation=dilation, groups=groups)
    e = CPUEngine()
    assert e._direct_unpadded(g)
    import reference as ref
    x, gy = rng.standard_normal(g.x_shape), rng.standard_normal(g.y_shape)
    want = ref.conv_grad_weight(x, gy, g.w_shape, stride=stride, padding=padding, dilation=dilation, groups=groups)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        _, _, _, rows = e._direct_columns(g, np.dtype(dtype))
        assert cd.gradient_tiles(c_in // groups, rows)
        got = {}
        for unpacked in (True, False):
            monkeypatch.setattr(cd, "GRADIENT_UNPACKED", unpacked)
            with e.force("direct"):
                got[unpacked] = e.backward_weight(x.astype(dtype), gy.astype(dtype), g)
        np.testing.assert_allclose(got[True], want, rtol=tol, atol=tol * np.abs(want).max())
        np.testing.assert_array_equal(got[True], got[False])


def test_direct_weight_gradient_unpacked_only_where_windows_lie_inside_x():
    e = CPUEngine()
    assert e._direct_unpadded(geometry((1, 4, 8, 8), (4, 4, 2, 2), stride=2))
    assert not e._direct_unpadded(geometry((1, 4, 8, 8), (4, 4, 3, 3), stride=2, padding=1))
    assert not e._direct_unpadded(geometry((1, 4, 8, 8), (4, 4, 3, 3), padding=((0, 1), (0, 0))))
    assert cd.gradient_tiles(64, {6}) and cd.gradient_tiles(13, {6}) and not cd.gradient_tiles(3, {6})


@pytest.mark.parametrize("x_shape,w_shape,stride,padding", [
    ((1, 32, 4, 32), (24, 32, 4, 4), 2, 1),    # input gradient: phases of 16 outputs into 32 channels
    ((2, 8, 5, 17), (32, 8, 3, 3), 1, 1),      # forward: rows of 17 outputs, 32 channels
    ((2, 8, 3, 16), (16, 8, 1, 3), 1, (0, 1)), # float64's 2 vectors: 16 channels
])
def test_direct_two_vector_tiles_of_8_and_9_rows(x_shape, w_shape, stride, padding):
    """Rows of 16-17 outputs into 2 vectors of channels go as two tiles of 8-9 rows (SHORT_FOR)."""
    assert 16 // 2 >= cd.MR_FOR[2] - cd.SHORT_FOR[2]
    g = geometry(x_shape, w_shape, stride=stride, padding=padding)
    assert check_against_reference(CPUEngine(), g, dict(stride=stride, padding=padding), x_shape[2:]) == 3


@pytest.mark.parametrize("x_shape,w_shape,stride,padding", [
    ((2, 8, 3, 28), (64, 8, 3, 3), 2, 1),      # forward rows of 14 outputs: two tiles of 7
    ((1, 5, 2, 13), (70, 5, 1, 3), 1, (0, 1)), # rows of 13 (7 + 6), a narrower column block
    ((1, 64, 3, 28), (8, 64, 3, 3), 2, 1),     # input gradient: phases of 14 into 64 channels
    ((2, 6, 4, 7), (64, 6, 2, 2), 1, 0),       # rows of 6 outputs: a single tile of 6
])
def test_direct_four_vector_tiles_of_7_rows(x_shape, w_shape, stride, padding):
    """Rows of 13-14 outputs into 4 vectors of channels go as two tiles of 6-7 rows (LONG_FOR)."""
    assert cd.LONG_FOR[4] == 1
    g = geometry(x_shape, w_shape, stride=stride, padding=padding)
    assert check_against_reference(CPUEngine(), g, dict(stride=stride, padding=padding), x_shape[2:]) == 3
