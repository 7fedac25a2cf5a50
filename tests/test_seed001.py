"""Seed 001 (Conv2D of the seed framework): every printed output, reproduced exactly.

The example code is the seed's, with only the import lines changed.
"""
import numpy as np
import pytest

from ndconv import gpuarray
from ndconv.containers import Sequential
from ndconv.modules import Conv2D
from ndconv.variable import Variable

batchsize, inmaps, h, w = 1, 1, 5, 5
outmaps = 2


def customW(size):
    w1 = np.diag(np.full(size, 1)).reshape((1, 1, size, size))
    w2 = np.flip(np.diag(np.arange(1, size + 1) * (-1)), 1).reshape((1, 1, size, size))
    w = np.vstack([w1, w2]).astype(np.float32)
    return w


def make_data():
    return gpuarray.to_gpu(np.arange(batchsize * inmaps * h * w).reshape((batchsize, inmaps, h, w))
                           .astype(np.float32))


def printed(a):
    return str(gpuarray.to_host(a))


DATA = """\
[[[[ 0.  1.  2.  3.  4.]
   [ 5.  6.  7.  8.  9.]
   [10. 11. 12. 13. 14.]
   [15. 16. 17. 18. 19.]
   [20. 21. 22. 23. 24.]]]]"""

W2 = """\
[[[[ 1.  0.]
   [ 0.  1.]]]


 [[[ 0. -1.]
   [-2.  0.]]]]"""

# (constructor keywords, printed conv.data) in the seed's order.
CASES = [
    (dict(size=2), """\
[[[[  6.   8.  10.  12.]
   [ 16.  18.  20.  22.]
   [ 26.  28.  30.  32.]
   [ 36.  38.  40.  42.]]

  [[-11. -14. -17. -20.]
   [-26. -29. -32. -35.]
   [-41. -44. -47. -50.]
   [-56. -59. -62. -65.]]]]"""),
    (dict(size=3), """\
[[[[  18.   21.   24.]
   [  33.   36.   39.]
   [  48.   51.   54.]]

  [[ -44.  -50.  -56.]
   [ -74.  -80.  -86.]
   [-104. -110. -116.]]]]"""),
    (dict(size=3, pad=1), """\
[[[[   6.    8.   10.   12.    4.]
   [  16.   18.   21.   24.   12.]
   [  26.   33.   36.   39.   22.]
   [  36.   48.   51.   54.   32.]
   [  20.   36.   38.   40.   42.]]

  [[   0.  -17.  -22.  -27.  -32.]
   [ -11.  -44.  -50.  -56.  -57.]
   [ -26.  -74.  -80.  -86.  -82.]
   [ -41. -104. -110. -116. -107.]
   [ -56.  -59.  -62.  -65.  -48.]]]]"""),
    (dict(size=3, pad=(1, 0)), """\
[[[[   8.   10.   12.]
   [  18.   21.   24.]
   [  33.   36.   39.]
   [  48.   51.   54.]
   [  36.   38.   40.]]

  [[ -17.  -22.  -27.]
   [ -44.  -50.  -56.]
   [ -74.  -80.  -86.]
   [-104. -110. -116.]
   [ -59.  -62.  -65.]]]]"""),
    (dict(size=2, stride=2), """\
[[[[  6.  10.]
   [ 26.  30.]]

  [[-11. -17.]
   [-41. -47.]]]]"""),
    (dict(size=2, stride=2, pad=3), """\
[[[[  0.   0.   0.   0.   0.]
   [  0.   0.   2.   4.   0.]
   [  0.  10.  18.  22.   0.]
   [  0.  20.  38.  42.   0.]
   [  0.   0.   0.   0.   0.]]

  [[  0.   0.   0.   0.   0.]
   [  0.   0.  -2.  -6.   0.]
   [  0.  -5. -29. -35.   0.]
   [  0. -15. -59. -65.   0.]
   [  0.   0.   0.   0.   0.]]]]"""),
    (dict(size=2, stride=(2, 4), pad=3), """\
[[[[  0.   0.   0.]
   [  0.   2.   0.]
   [  0.  18.   0.]
   [  0.  38.   0.]
   [  0.   0.   0.]]

  [[  0.   0.   0.]
   [  0.  -2.   0.]
   [  0. -29.   0.]
   [  0. -59.   0.]
   [  0.   0.   0.]]]]"""),
    (dict(size=2, stride=1, pad=0, dilation=2), """\
[[[[ 12.  14.  16.]
   [ 22.  24.  26.]
   [ 32.  34.  36.]]

  [[-22. -25. -28.]
   [-37. -40. -43.]
   [-52. -55. -58.]]]]"""),
    (dict(size=2, stride=1, pad=0, dilation=(3, 1)), """\
[[[[ 16.  18.  20.  22.]
   [ 26.  28.  30.  32.]]

  [[-31. -34. -37. -40.]
   [-46. -49. -52. -55.]]]]"""),
]


def test_synthetic_tensor_and_custom_weights_print_as_in_the_seed():
    assert printed(make_data()) == DATA
    assert str(customW(2)) == W2


@pytest.mark.parametrize("kwargs,expected", CASES, ids=[str(c[0]) for c in CASES])
def test_printed_output(kwargs, expected):
    data = make_data()
    conv = Conv2D(inmaps=inmaps, outmaps=outmaps, useBias=False, **kwargs)
    conv.setVar("W", Variable(gpuarray.to_gpu(customW(kwargs["size"]))))
    out = conv(data)
    assert out is conv.data                          # print(conv(data)) and print(conv.data) agree
    assert printed(conv.data) == expected
    assert conv.data.dtype == np.float32


def test_groups_weight_shapes():
    inmaps, outmaps = 16, 32
    conv = Conv2D(inmaps, outmaps, size=2, initscheme="gaussian", groups=1)
    assert str(conv.W.shape) == "(32, 16, 2, 2)"
    conv = Conv2D(inmaps, outmaps, size=2, initscheme="gaussian", groups=4)
    assert str(conv.W.shape) == "(32, 4, 2, 2)"
    # Group g reads input maps [4g, 4g+4) and writes output maps [8g, 8g+8).
    x = gpuarray.to_gpu(np.random.default_rng(0).standard_normal((1, inmaps, 5, 5)).astype(np.float32))
    y = gpuarray.to_host(conv(x))
    W = gpuarray.to_host(conv.W)
    xh = gpuarray.to_host(x)
    for g in range(4):
        one = Conv2D(4, 8, size=2, useBias=False)
        one.setVar("W", Variable(gpuarray.to_gpu(W[8 * g:8 * g + 8])))
        part = gpuarray.to_host(one(gpuarray.to_gpu(xh[:, 4 * g:4 * g + 4])))
        np.testing.assert_allclose(y[:, 8 * g:8 * g + 8], part, rtol=1e-5, atol=1e-5)


def test_depthwise_separable_sequential():
    batchsize, inmaps, h, w = 1, 3, 5, 5
    outmaps = 32
    seq = Sequential()
    seq.append(Conv2D(inmaps, inmaps, size=4, initscheme="gaussian", groups=inmaps, name="depthwise"))
    seq.append(Conv2D(inmaps, outmaps, size=1, initscheme="gaussian", name="pointwise"))
    assert str(seq["depthwise"].W.shape) == "(3, 1, 4, 4)"
    assert str(seq["pointwise"].W.shape) == "(32, 3, 1, 1)"
    data = gpuarray.to_gpu(np.random.randn(batchsize, inmaps, h, w).astype(np.float32))
    seq(data)
    assert seq.data.shape == (1, 32, 2, 2)
    # The block is depthwise (each map alone) then pointwise (a 1x1 mix of the maps).
    x = gpuarray.to_host(data).astype(np.float64)
    dw = gpuarray.to_host(seq["depthwise"].W).astype(np.float64)
    pw = gpuarray.to_host(seq["pointwise"].W).astype(np.float64)[:, :, 0, 0]
    mid = np.zeros((1, 3, 2, 2))
    for c in range(3):
        for i in range(2):
            for j in range(2):
                mid[0, c, i, j] = (x[0, c, i:i + 4, j:j + 4] * dw[c, 0]).sum()
    ref = np.einsum("oc,ncij->noij", pw, mid)
    np.testing.assert_allclose(gpuarray.to_host(seq.data), ref, rtol=1e-4, atol=1e-4)
