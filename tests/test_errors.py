"""Bad input: one test per class listed in SPEC.md, each with the exception type and a
message fragment naming the parameter and the offending value.  Every case also
checks that the caller's arrays are untouched after the error, and the last tests
check the same after successful calls (the engine must never write into them).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import ndconv


def _arrays():
    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal((2, 3, 8, 8)),            # conv2d input
        w=rng.standard_normal((4, 3, 3, 3)),            # conv2d weight (C_out, C_in, kh, kw)
        b=rng.standard_normal(4),
        y=rng.standard_normal((2, 3, 4, 4)),            # conv_transpose2d input
        wt=rng.standard_normal((3, 4, 3, 3)),           # transposed weight (C_in, C_out, kh, kw)
        x3=rng.standard_normal((1, 2, 4, 4, 4)),
        w3=rng.standard_normal((2, 2, 2, 2, 2)),
    )


# (id, call, exception, message fragment); ``call`` takes the dict of arrays
CASES = [
    # padding
    ("negative padding", lambda a: ndconv.conv2d(a["x"], a["w"], padding=-1),
     ValueError, "padding=-1"),
    ("negative padding per dim", lambda a: ndconv.conv2d(a["x"], a["w"], padding=(1, -2)),
     ValueError, "padding=(1, -2)"),
    ("negative asymmetric padding", lambda a: ndconv.conv2d(a["x"], a["w"], padding=[(0, -1), (0, 0)]),
     ValueError, "padding=[(0, -1), (0, 0)]"),
    ("negative transposed padding", lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], padding=-1),
     ValueError, "padding=-1"),
    ("padding of the wrong length", lambda a: ndconv.conv2d(a["x"], a["w"], padding=(1, 1, 1)),
     TypeError, "padding=(1, 1, 1)"),
    ("padding of the wrong type", lambda a: ndconv.conv2d(a["x"], a["w"], padding=1.5),
     TypeError, "padding=1.5"),
    # stride, dilation
    ("zero stride", lambda a: ndconv.conv2d(a["x"], a["w"], stride=0), ValueError, "stride=0"),
    ("negative stride", lambda a: ndconv.conv2d(a["x"], a["w"], stride=(1, -2)),
     ValueError, "stride=(1, -2)"),
    ("zero transposed stride", lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], stride=0),
     ValueError, "stride=0"),
    ("float stride", lambda a: ndconv.conv2d(a["x"], a["w"], stride=1.5), TypeError, "stride=1.5"),
    ("stride of the wrong length", lambda a: ndconv.conv2d(a["x"], a["w"], stride=(1, 1, 1)),
     TypeError, "stride=(1, 1, 1)"),
    ("zero dilation", lambda a: ndconv.conv2d(a["x"], a["w"], dilation=0), ValueError, "dilation=0"),
    ("negative dilation", lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], dilation=(-1, 1)),
     ValueError, "dilation=(-1, 1)"),
    # groups
    ("zero groups", lambda a: ndconv.conv2d(a["x"], a["w"], groups=0), ValueError, "groups=0"),
    ("negative groups", lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], groups=-1),
     ValueError, "groups=-1"),
    ("float groups", lambda a: ndconv.conv2d(a["x"], a["w"], groups=1.0), TypeError, "groups=1.0"),
    ("groups not dividing out_channels",
     lambda a: ndconv.conv2d(np.zeros((1, 3, 5, 5)), np.zeros((4, 1, 3, 3)), groups=3),
     ValueError, "groups=3"),
    ("groups not dividing in_channels",
     lambda a: ndconv.conv2d(np.zeros((1, 5, 5, 5)), np.zeros((4, 2, 3, 3)), groups=2),
     ValueError, "5 channels"),
    ("groups not dividing transposed in_channels",
     lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], groups=2), ValueError, "groups=2"),
    # ranks and channels
    ("input rank too small for conv3d", lambda a: ndconv.conv3d(a["x"][0, 0], a["w3"]),
     ValueError, "Expected 4D (unbatched) or 5D (batched) input to conv3d"),
    ("input rank too large for conv1d",
     lambda a: ndconv.conv1d(a["x"], np.zeros((4, 3, 3))), ValueError, "input to conv1d"),
    ("input rank for transposed", lambda a: ndconv.conv_transpose2d(a["y"][0, 0], a["wt"]),
     ValueError, "input to conv_transpose2d"),
    ("weight rank not matching the op", lambda a: ndconv.conv2d(a["x"], a["w3"]),
     ValueError, "weight of size [2, 2, 2, 2, 2]"),
    ("weight with a zero kernel", lambda a: ndconv.conv2d(a["x"], np.zeros((4, 3, 0, 3))),
     ValueError, "weight of size [4, 3, 0, 3]"),
    ("channel mismatch", lambda a: ndconv.conv2d(np.zeros((1, 5, 8, 8)), a["w"]),
     ValueError, "expected input[1, 5, 8, 8] to have 3 channels, but got 5 channels instead"),
    ("transposed channel mismatch", lambda a: ndconv.conv_transpose2d(np.zeros((1, 5, 4, 4)), a["wt"]),
     ValueError, "to have 3 channels, but got 5 channels"),
    ("bias of the wrong length", lambda a: ndconv.conv2d(a["x"], a["w"], np.zeros(3)),
     ValueError, "bias of shape (3,)"),
    ("transposed bias of the wrong length", lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], np.zeros(3)),
     ValueError, "bias of shape (3,)"),
    # sizes
    ("kernel larger than the padded input",
     lambda a: ndconv.conv2d(np.zeros((1, 3, 2, 2)), a["w"]),
     ValueError, "Kernel size can't be greater than actual input size"),
    ("dilated kernel larger than the padded input",
     lambda a: ndconv.conv2d(np.zeros((1, 3, 5, 5)), a["w"], dilation=3, padding=0),
     ValueError, "Kernel size: (7 x 7)"),
    ("transposed output size <= 0",
     lambda a: ndconv.conv_transpose2d(np.zeros((1, 3, 1, 1)), np.zeros((3, 4, 1, 1)), padding=1),
     ValueError, "Output size is too small"),
    ("output_padding equal to stride",
     lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], stride=2, output_padding=2),
     ValueError, "output_padding=(2, 2)"),
    ("output_padding >= max(stride, dilation)",
     lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], stride=2, dilation=3, output_padding=(3, 0)),
     ValueError, "output_padding=(3, 0)"),
    ("negative output_padding",
     lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], stride=2, output_padding=-1),
     ValueError, "output_padding=-1"),
    ("output_size above the range",
     lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], stride=2, output_size=(11, 9)),
     ValueError, "valid sizes range from [9, 9] to [10, 10]"),
    ("output_size below the range",
     lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], stride=2, output_size=(8, 9)),
     ValueError, "valid sizes range from [9, 9] to [10, 10]"),
    ("output_size of the wrong length",
     lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], stride=2, output_size=(9, 9, 9)),
     ValueError, "output_size=(9, 9, 9)"),
    # strings
    ("unknown padding string", lambda a: ndconv.conv2d(a["x"], a["w"], padding="full"),
     ValueError, "padding='full'"),
    ("unknown padding_mode", lambda a: ndconv.conv2d(a["x"], a["w"], padding_mode="mirror"),
     ValueError, "padding_mode='mirror'"),
    ("reflect padding as wide as the input",
     lambda a: ndconv.conv2d(np.zeros((1, 3, 3, 3)), a["w"], padding=3, padding_mode="reflect"),
     ValueError, "padding_mode='reflect'"),
    ("non-zeros padding_mode for transposed",
     lambda a: ndconv.conv_transpose_nd(a["y"], a["wt"], padding_mode="reflect"),
     ValueError, "padding_mode='reflect'"),
    ("non-zeros padding_mode for the transposed backward",
     lambda a: ndconv.conv_backward(np.zeros((2, 4, 6, 6)), a["y"], a["wt"], transposed=True,
                                    padding_mode="circular"),
     ValueError, "padding_mode='circular'"),
    ("'same' with stride > 1", lambda a: ndconv.conv2d(a["x"], a["w"], padding="same", stride=2),
     ValueError, "stride=(2, 2)"),
    ("'same' for transposed", lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], padding="same"),
     ValueError, "padding='same'"),
    ("bad data_format", lambda a: ndconv.conv2d(a["x"], a["w"], data_format="NCDHW"),
     ValueError, "data_format='NCDHW'"),
    ("lower-case data_format", lambda a: ndconv.conv2d(a["x"], a["w"], data_format="nhwc"),
     ValueError, "data_format='nhwc'"),
    ("bad transposed data_format", lambda a: ndconv.conv_transpose2d(a["y"], a["wt"], data_format="NLC"),
     ValueError, "data_format='NLC'"),
    # dtypes and types
    ("mixed input/weight dtypes", lambda a: ndconv.conv2d(a["x"].astype(np.float32), a["w"]),
     TypeError, "got input float32, weight float64"),
    ("mixed bias dtype", lambda a: ndconv.conv2d(a["x"], a["w"], a["b"].astype(np.float32)),
     TypeError, "bias float32"),
    ("mixed transposed dtypes", lambda a: ndconv.conv_transpose2d(a["y"], a["wt"].astype(np.float16)),
     TypeError, "weight float16"),
    ("mixed grad_output dtype",
     lambda a: ndconv.conv_backward(np.zeros((2, 4, 6, 6), np.float32), a["x"], a["w"]),
     TypeError, "float32"),
    ("integer dtype", lambda a: ndconv.conv2d(a["x"].astype(np.int64), a["w"].astype(np.int64)),
     TypeError, "input.dtype=int64"),
    ("complex dtype", lambda a: ndconv.conv2d(a["x"].astype(complex), a["w"].astype(complex)),
     TypeError, "complex128"),
    ("non-array input", lambda a: ndconv.conv2d(a["x"].tolist(), a["w"]), TypeError, "input must be"),
    ("non-array weight", lambda a: ndconv.conv_transpose2d(a["y"], a["wt"].tolist()),
     TypeError, "weight must be"),
    # conv_backward specifics
    ("grad_output of the wrong shape",
     lambda a: ndconv.conv_backward(np.zeros((2, 4, 5, 6)), a["x"], a["w"]),
     ValueError, "grad_output of shape (2, 4, 5, 6)"),
    ("unknown gradient in needs",
     lambda a: ndconv.conv_backward(np.zeros((2, 4, 6, 6)), a["x"], a["w"], needs=("inputs",)),
     ValueError, "needs=('inputs',)"),
]


@pytest.mark.parametrize("call, exc, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected(call, exc, fragment):
    arrays = _arrays()
    before = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(exc, match=re.escape(fragment)):
        call(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} was modified")


def test_output_size_message_names_the_range_per_dim():
    y, wt = np.zeros((1, 3, 5)), np.zeros((3, 2, 4))
    # stride 3, padding 1: smallest (5-1)*3 - 2 + 3 + 1 = 14, largest 16
    with pytest.raises(ValueError, match=re.escape("from [14] to [16]")):
        ndconv.conv_transpose1d(y, wt, stride=3, padding=1, output_size=[17])
    for size in (14, 15, 16, [16], (1, 2, 16)):
        ndconv.conv_transpose1d(y, wt, stride=3, padding=1, output_size=size)


def test_output_padding_below_dilation_is_accepted():
    """PyTorch's rule: output_padding only has to be below stride OR dilation."""
    y, wt = np.ones((1, 1, 3)), np.ones((1, 1, 2))
    out = ndconv.conv_transpose1d(y, wt, stride=1, dilation=3, output_padding=2)
    # full scatter length (3-1) + 3 + 1 = 6, plus 2 zeros that no kernel copy reaches
    np.testing.assert_array_equal(out.ravel(), [1, 1, 1, 1, 1, 1, 0, 0])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_propagate(value):
    x = np.ones((1, 1, 5, 5))
    x[0, 0, 2, 2] = value
    w = np.ones((1, 1, 3, 3))
    y = ndconv.conv2d(x, w)
    # every window covers the centre, so every output carries it
    expected = np.full((1, 1, 3, 3), value + 8.0)
    np.testing.assert_array_equal(y, expected)
    gx, gw, gb = ndconv.conv_backward(np.ones_like(y), x, w)
    assert np.all(np.isfinite(gx))               # gx only depends on w and grad_output
    assert np.isnan(gw).any() or np.isinf(gw).any()
    t = ndconv.conv_transpose2d(x, w, stride=2)
    assert np.isnan(t).any() or np.isinf(t).any()
    assert np.isfinite(t[0, 0, 0]).all()         # the first rows never see the centre


def _snapshot(*arrays):
    return [np.array(a, copy=True) for a in arrays]


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_successful_calls_leave_inputs_untouched(mode):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 7, 6))
    w = rng.standard_normal((6, 2, 3, 2))
    b = rng.standard_normal(6)
    snap = _snapshot(x, w, b)
    y = ndconv.conv2d(x, w, b, stride=(2, 1), padding=[(1, 2), (0, 1)], dilation=(1, 2), groups=2,
                      padding_mode=mode)
    g = rng.standard_normal(y.shape)
    gsnap = _snapshot(g)
    outs = ndconv.conv_backward(g, x, w, (2, 1), [(1, 2), (0, 1)], (1, 2), 2, padding_mode=mode)
    for a, s in zip((x, w, b, g), snap + gsnap):
        np.testing.assert_array_equal(a, s)
    # results are fresh arrays, never views of the caller's
    for r in (y,) + outs:
        for a in (x, w, b, g):
            assert not np.shares_memory(r, a)


def test_successful_transposed_calls_leave_inputs_untouched():
    rng = np.random.default_rng(4)
    y = rng.standard_normal((2, 4, 3, 5))
    w = rng.standard_normal((4, 3, 3, 2))
    b = rng.standard_normal(6)
    snap = _snapshot(y, w, b)
    out = ndconv.conv_transpose2d(y, w, b, stride=2, padding=1, output_padding=1, groups=2)
    g = rng.standard_normal(out.shape)
    gsnap = _snapshot(g)
    outs = ndconv.conv_backward(g, y, w, 2, 1, 1, 2, transposed=True, output_padding=1)
    for a, s in zip((y, w, b, g), snap + gsnap):
        np.testing.assert_array_equal(a, s)
    for r in (out,) + outs:
        for a in (y, w, b, g):
            assert not np.shares_memory(r, a)


def test_read_only_inputs_are_accepted():
    x = np.ones((1, 2, 5, 5))
    w = np.ones((3, 2, 2, 2))
    for a in (x, w):
        a.flags.writeable = False
    y = ndconv.conv2d(x, w)
    y += 1  # the result is the caller's to write
    ndconv.conv_backward(np.ones((1, 3, 4, 4)), x, w)
    ndconv.conv_transpose2d(np.ones((1, 2, 4, 4)), w.transpose(1, 0, 2, 3))


def test_memoized_geometry_keeps_values_the_checks_treat_differently_apart():
    """The geometry parsers remember successful calls by their arguments: a call that
    equals a remembered one in Python (True == 1 == 1.0, (True,) == (1,)) must still
    get its own checks and error."""
    good = ndconv.conv_geometry((1, 2, 5), (2, 2, 3), None, stride=1, padding=(1,))
    assert ndconv.conv_geometry((1, 2, 5), (2, 2, 3), None, stride=1, padding=(1,)) == good
    for bad in (True, 1.0, (True,), [1.0]):
        with pytest.raises(TypeError, match="stride"):
            ndconv.conv_geometry((1, 2, 5), (2, 2, 3), None, stride=bad, padding=(1,))
    with pytest.raises(TypeError, match="padding"):
        ndconv.conv_geometry((1, 2, 5), (2, 2, 3), None, stride=1, padding=(True,))
    # other integer types and lists pass the checks, the same geometry either way
    assert ndconv.conv_geometry((1, 2, 5), (2, 2, 3), None, stride=np.int64(1), padding=[1]) == good
