"""The ``depthwise_rows`` GPU algorithm (stride-1 depthwise forward and input gradient
from register windows): its plan, checked anywhere, and its kernel against the CPU
engine in float64, on a GPU only.
"""
from __future__ import annotations

import numpy as np
import pytest

import ndconv
from gpu_support import check_forced, on_gpu
from ndconv.engine import gpu_depthwise
from ndconv.engine.gpu_depthwise import rows_plan

try:
    import hypothesis as hyp
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    hyp = None

PRIMITIVES = ("forward", "backward_input")


def geometry(x_shape, w_shape, **kw):
    return ndconv.conv_geometry(x_shape, w_shape, None, **kw)[0]


ROWS_GEOMETRIES = [
    geometry((2, 8, 56, 56), (8, 1, 3, 3), padding=1, groups=8),                      # VX 8, float4
    geometry((1, 4, 13, 30), (4, 1, 3, 3), padding=1, groups=4),                      # widths not multiples of 4
    geometry((2, 3, 9, 17, 20), (3, 1, 3, 3, 3), padding=1, groups=3),
    geometry((1, 2, 6, 11, 12), (4, 1, 2, 3, 3), padding=[(1, 0), (0, 2), (2, 1)], dilation=(2, 1, 1), groups=2),
    geometry((2, 3, 300), (3, 1, 31), padding=15, groups=3),                          # long 1-D kernel
    geometry((2, 2, 40), (6, 1, 5), padding=[(3, 1)], dilation=2, groups=2),          # multiplier 3
    geometry((1, 4, 19, 52), (8, 1, 3, 5), padding=[(2, 0), (1, 3)], dilation=(1, 2), groups=4),
    geometry((1, 2, 5, 7), (2, 1, 3, 3), padding=[(0, 0), (2, 3)], groups=2),         # no low complement in y
]


def test_rows_plan_covers_every_output_and_declines():
    for g in ROWS_GEOMETRIES:
        for op in PRIMITIVES:
            for dtype in ("float16", "float32", "float64"):
                p = rows_plan(op, g, dtype)
                assert p is not None, (op, g)
                c = dict(p.consts)
                assert c["R"] * c["VX"] <= gpu_depthwise.ROWS_OUTPUTS and c["VX"] in (4, 8)
                assert c["FLIP"] == (op == "backward_input") and min(c["LZ"], c["LY"], c["LX"]) >= 0
                assert c["M"] == g.y_channels // g.x_channels
                out3 = gpu_depthwise.as3(g.y_size if op == "forward" else g.x_size, 1)
                assert (c["YZ"], c["YY"], c["YX"]) == out3
                threads = p.planes * -(-out3[0] // c["RZ"]) * -(-out3[1] // c["R"]) * -(-out3[2] // c["VX"])
                assert p.blocks * c["NT"] >= threads > (p.blocks - 1) * c["NT"]
                assert p.vec4 == (dtype == "float32" and c["XX"] % 4 == 0 and c["YX"] % 4 == 0)
    dw = ROWS_GEOMETRIES[0]
    assert rows_plan("backward_weight", dw, "float64") is None                     # lanes only
    assert rows_plan("backward_weight", ROWS_GEOMETRIES[1], "float32") is None     # not float4 rows
    strided = geometry((2, 4, 8, 8), (4, 1, 3, 3), stride=2, padding=1, groups=4)
    dense = geometry((2, 4, 8, 8), (8, 2, 3, 3), padding=1, groups=2)
    assert rows_plan("forward", strided, "float32") is None and rows_plan("forward", dense, "float32") is None
    # input gradient: padding past the kernel's reach leaves a negative complementary padding
    wide_pad = geometry((1, 2, 9, 9), (2, 1, 3, 3), padding=[(3, 0), (0, 0)], groups=2)
    assert rows_plan("forward", wide_pad, "float32") is not None
    assert rows_plan("backward_input", wide_pad, "float32") is None
    too_wide = geometry((1, 2, 200), (2, 1, 41), padding=20, groups=2)             # window past registers
    too_many_taps = geometry((1, 2, 9, 9, 9), (2, 1, 5, 5, 5), padding=2, groups=2)
    assert rows_plan("forward", too_wide, "float32") is None
    assert rows_plan("forward", too_many_taps, "float32") is None
    assert rows_plan("forward", dw, "int32") is None


# short float4 rows: one lane per float4, halo by shuffles (LANES)
LANE_GEOMETRIES = [
    geometry((3, 5, 56, 56), (5, 1, 3, 3), padding=1, groups=5),                      # 14 lanes an item, 4 idle
    geometry((2, 3, 6, 7, 12), (3, 1, 3, 3, 3), padding=1, groups=3),                 # 3 lanes an item, 10 items a warp
    geometry((2, 2, 128), (4, 1, 7), padding=3, groups=2),                            # 32 lanes, multiplier 2
    geometry((1, 3, 9, 20), (3, 1, 3, 3), padding=[(1, 1), (7, 5)], dilation=(1, 4), groups=3),  # halo 2 lanes left
    geometry((2, 2, 40), (6, 1, 5), padding=[(3, 1)], dilation=2, groups=2),          # input gradient only: y narrower
    geometry((1, 2, 5, 8), (2, 1, 3, 5), padding=[(1, 1), (4, 4)], groups=2),         # forward only: y wider than x
]


def test_lanes_plan():
    for g in LANE_GEOMETRIES:
        used = 0
        for op in PRIMITIVES:
            c = dict(rows_plan(op, g, "float32", True).consts)
            used += c["LANES"]
            if not c["LANES"]:          # a source row wider than the lanes' columns
                assert c["XX"] > c["YX"], (op, g)
                continue
            p = rows_plan(op, g, "float32", True)
            assert c["VX"] == 4 and c["VEC4"] and c["YX"] <= gpu_depthwise.LANE_MAX_WIDTH == 128 and c["XX"] <= c["YX"]
            segs = c["YX"] // 4
            assert c["GPW"] == 32 // segs
            items = p.planes * -(-c["YZ"] // c["RZ"]) * -(-c["YY"] // c["R"])
            warps = p.blocks * c["NT"] // 32
            assert warps * c["GPW"] >= items > (warps - c["NT"] // 32) * c["GPW"]
            assert not dict(rows_plan(op, g, "float32", False).consts)["LANES"]
            assert not dict(rows_plan(op, g, "float64", True).consts)["LANES"]
        assert used, g
    assert dict(rows_plan("backward_input", LANE_GEOMETRIES[4], "float32", True).consts)["LANES"]
    for g in LANE_GEOMETRIES:      # weight gradient: (channel, part) items over every (sample, row chunk)
        p = rows_plan("backward_weight", g, "float32")
        if p is None:
            assert g.x_size[-1] > g.y_size[-1]
            continue
        c = dict(p.consts)
        assert c["LANES"] and c["WGRAD"] and not c["FLIP"] and p.parts >= 1 and p.chunk >= 1
        runs = g.batch * -(-c["YZ"] // c["RZ"]) * -(-c["YY"] // c["R"])
        assert p.parts * p.chunk >= runs > (p.parts - 1) * p.chunk
        warps = p.blocks * c["NT"] // 32
        assert warps * c["GPW"] >= g.y_channels * p.parts > (warps - c["NT"] // 32) * c["GPW"]
        assert p == rows_plan("backward_weight", g, "float32", True)      # planned as aligned either way
    assert not dict(rows_plan("forward", ROWS_GEOMETRIES[4], "float32", True).consts)["LANES"]   # 300 wide


def test_rows_is_the_untuned_choice_in_2d_and_3d():
    from ndconv.engine.gpu import ALGORITHMS
    names = ALGORITHMS.names()
    assert names.index("depthwise_rows") < names.index("plane")
    rows = ALGORITHMS.get("depthwise_rows")
    assert rows.preferred("forward", ROWS_GEOMETRIES[0], np.float32)
    assert rows.preferred("backward_input", ROWS_GEOMETRIES[2], np.float32)
    assert not rows.preferred("forward", ROWS_GEOMETRIES[4], np.float32)        # 1-D: plane
    assert rows.preferred("backward_weight", ROWS_GEOMETRIES[0], np.float32)
    assert not rows.preferred("backward_weight", ROWS_GEOMETRIES[2], np.float32)  # 3-D: plane


# ---------------------------------------------------------------------- on a GPU

def _check(g, dtype, seed=0, offset=0):
    """Forced depthwise_rows against the CPU engine in float64, bitwise repeatable;
    ``offset`` elements shift the first operand off its buffer's alignment."""
    ops = [op for op in PRIMITIVES + ("backward_weight",) if rows_plan(op, g, dtype) is not None]
    check_forced("depthwise_rows", g, dtype, ops, seed, offset, repeat=True)


@pytest.mark.parametrize("dtype", ("float64", "float32", "float16"))
@pytest.mark.parametrize("g", ROWS_GEOMETRIES, ids=lambda g: f"{g.nd}d-{g.x_shape}-{g.w_shape}")
@pytest.mark.gpu
@on_gpu
def test_rows_vs_cpu(g, dtype):
    _check(g, dtype)


@pytest.mark.parametrize("g", LANE_GEOMETRIES, ids=lambda g: f"{g.nd}d-{g.x_shape}-{g.w_shape}")
@pytest.mark.gpu
@on_gpu
def test_lanes_vs_cpu(g):
    _check(g, "float32", seed=5)


@pytest.mark.gpu
@on_gpu
def test_rows_input_not_16_byte_aligned():
    """A float32 input 4 bytes into its buffer takes the scalar loads (the weight
    gradient: an aligned copy), with the same results."""
    g = ROWS_GEOMETRIES[0]
    assert rows_plan("forward", g, "float32").vec4 and rows_plan("backward_weight", g, "float32")
    _check(g, "float32", seed=3, offset=1)


if hyp is not None:
    @st.composite
    def depthwise_geometries(draw):
        nd = draw(st.integers(1, 3))
        channels, mult = draw(st.integers(2, 3)), draw(st.integers(1, 2))
        kernel, dil, pad, xs = [], [], [], []
        for _ in range(nd):
            k, d = draw(st.integers(1, 4)), draw(st.integers(1, 2))
            lo, hi = draw(st.integers(0, (k - 1) * d)), draw(st.integers(0, 3))
            span = d * (k - 1) + 1
            xs.append(max(1, span - lo - hi + draw(st.integers(0, 60 if nd == 1 else 20 if nd == 2 else 6))))
            kernel.append(k), dil.append(d), pad.append((lo, hi))
        return geometry((draw(st.integers(1, 2)), channels) + tuple(xs), (channels * mult, 1) + tuple(kernel),
                        padding=pad, dilation=tuple(dil), groups=channels)

    @pytest.mark.gpu
    @on_gpu
    @hyp.settings(max_examples=30, deadline=None)
    @hyp.given(g=depthwise_geometries(), seed=st.integers(0, 2 ** 16),
               dtype=st.sampled_from(("float64", "float32")))
    def test_rows_random_geometries(g, seed, dtype):
        _check(g, dtype, seed)
