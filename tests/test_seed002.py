"""Seed 002: the Q&A on how PyTorch's ConvTranspose2d uses stride and padding.

Its printed 8x8 result (ones(1,1,4,4), weight 1..16 as (1,1,4,4), stride 2,
padding 1, no bias) must be reproduced exactly, and its four small pictures
(input [[2,4],[0,1]], kernel [[3,1],[1,5]], stride/padding 1/0, 1/1, 2/0, 2/1)
must equal PyTorch's values (hard-coded here, checked live when torch is present).
"""
from __future__ import annotations

import numpy as np
import pytest

import ndconv
import reference as ref

SEED_8x8 = np.array([
    [6., 12., 14., 12., 14., 12., 14., 7.],
    [12., 24., 28., 24., 28., 24., 28., 14.],
    [20., 40., 44., 40., 44., 40., 44., 22.],
    [12., 24., 28., 24., 28., 24., 28., 14.],
    [20., 40., 44., 40., 44., 40., 44., 22.],
    [12., 24., 28., 24., 28., 24., 28., 14.],
    [20., 40., 44., 40., 44., 40., 44., 22.],
    [10., 20., 22., 20., 22., 20., 22., 11.],
])

SMALL_INPUT = np.array([[2., 4.], [0., 1.]])
SMALL_KERNEL = np.array([[3., 1.], [1., 5.]])
# PyTorch 2.13 F.conv_transpose2d on these values
SMALL_CASES = {
    (1, 0): [[6, 14, 4], [2, 17, 21], [0, 1, 5]],
    (1, 1): [[17]],
    (2, 0): [[6, 2, 12, 4], [2, 10, 4, 20], [0, 0, 3, 1], [0, 0, 1, 5]],
    (2, 1): [[10, 4], [0, 3]],
}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_printed_8x8_result(dtype):
    x = np.ones((1, 1, 4, 4), dtype=dtype)
    w = np.arange(1, 17, dtype=dtype).reshape(1, 1, 4, 4)
    out = ndconv.conv_transpose2d(x, w, stride=2, padding=1)
    assert out.shape == (1, 1, 8, 8) and out.dtype == dtype
    np.testing.assert_array_equal(out[0, 0], SEED_8x8)   # small integers: exact in every dtype


def test_printed_8x8_result_other_faces():
    x = np.ones((1, 1, 4, 4))
    w = np.arange(1, 17, dtype=np.float64).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(ndconv.conv_transpose_nd(x, w, stride=2, padding=1)[0, 0], SEED_8x8)
    np.testing.assert_array_equal(ndconv.conv_transpose2d(x[0], w, stride=(2, 2), padding=(1, 1))[0],
                                  SEED_8x8)                                     # unbatched
    np.testing.assert_array_equal(
        ndconv.conv_transpose2d(x.transpose(0, 2, 3, 1), w, stride=2, padding=[(1, 1), (1, 1)],
                                data_format="NHWC")[0, :, :, 0], SEED_8x8)     # channels-last
    # as the input gradient of the matching strided convolution
    gx, _, _ = ndconv.conv_backward(x, np.zeros((1, 1, 8, 8)), w, stride=2, padding=1,
                                    needs=("input",))
    np.testing.assert_array_equal(gx[0, 0], SEED_8x8)
    np.testing.assert_array_equal(ref.conv_transpose(x, w, stride=2, padding=1)[0, 0], SEED_8x8)


@pytest.mark.parametrize("stride, padding", list(SMALL_CASES))
def test_small_pictures(stride, padding):
    x = SMALL_INPUT.reshape(1, 1, 2, 2)
    w = SMALL_KERNEL.reshape(1, 1, 2, 2)
    out = ndconv.conv_transpose2d(x, w, stride=stride, padding=padding)
    expected = np.array(SMALL_CASES[stride, padding], dtype=np.float64)
    np.testing.assert_array_equal(out[0, 0], expected)
    np.testing.assert_array_equal(ref.conv_transpose(x, w, stride=stride, padding=padding)[0, 0], expected)


@pytest.mark.requires_torch
def test_small_pictures_and_8x8_match_torch_live(torch):
    import torch.nn.functional as F
    x = torch.tensor(SMALL_INPUT).reshape(1, 1, 2, 2)
    w = torch.tensor(SMALL_KERNEL).reshape(1, 1, 2, 2)
    for (s, p), values in SMALL_CASES.items():
        np.testing.assert_array_equal(F.conv_transpose2d(x, w, stride=s, padding=p)[0, 0].numpy(),
                                      np.array(values, dtype=np.float64))
    mod = torch.nn.ConvTranspose2d(1, 1, 4, 2, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        mod.weight.copy_(torch.arange(1., 17.).reshape(1, 1, 4, 4))
        np.testing.assert_array_equal(mod(torch.ones(1, 1, 4, 4, dtype=torch.float64))[0, 0].numpy(),
                                      SEED_8x8)
