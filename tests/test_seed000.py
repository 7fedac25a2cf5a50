"""Seed 000 (Deconv3D of the seed framework): every example runs and equals PyTorch's
ConvTranspose3d with the same weights; output sizes follow the seed's formula."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ndconv import gpuarray  # noqa: E402
from ndconv.modules import Deconv3D  # noqa: E402

batchsize, inmaps, d, h, w = 1, 2, 5, 5, 5
outsize = 2

# The seed's examples, in order (all with useBias=False).
EXAMPLES = [
    dict(size=2),
    dict(size=3),
    dict(size=3, pad=1),
    dict(size=2, stride=2),
    dict(size=2, stride=2, pad=3),
    dict(size=2, stride=(2, 4, 2), pad=3),
    dict(size=2, stride=1, pad=0, dilation=2),
    dict(size=2, stride=1, pad=0, dilation=(3, 1, 3)),
    dict(size=2, groups=2),
]


def _triple(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("kwargs", EXAMPLES, ids=[str(k) for k in EXAMPLES])
def test_example_matches_torch(kwargs):
    data = gpuarray.to_gpu(np.arange(batchsize * inmaps * d * h * w).reshape((batchsize, inmaps, d, h, w))
                           .astype(np.float32))
    deconv = Deconv3D(inmaps=inmaps, outmaps=outsize, useBias=False, **kwargs)
    out = deconv(data)
    assert out is deconv.data
    k = kwargs["size"]
    s, p, dil = (_triple(kwargs.get(key, dflt)) for key, dflt in (("stride", 1), ("pad", 0), ("dilation", 1)))
    groups = kwargs.get("groups", 1)
    assert deconv.W.shape == (inmaps, outsize // groups, k, k, k)
    # The seed's size formula: (in - 1)s - 2p + dil(k - 1) + 1.
    expect = tuple((n - 1) * s_ - 2 * p_ + d_ * (k - 1) + 1 for n, s_, p_, d_ in zip((d, h, w), s, p, dil))
    assert out.shape == (batchsize, outsize) + expect
    ref = torch.nn.ConvTranspose3d(inmaps, outsize, k, stride=s, padding=p, dilation=dil, groups=groups,
                                   bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(gpuarray.to_host(deconv.W).copy()))
        want = ref(torch.from_numpy(gpuarray.to_host(data).copy())).numpy()
    got = gpuarray.to_host(out)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_default_weights_are_xavier_uniform_over_the_transposed_fan():
    np.random.seed(3)
    deconv = Deconv3D(inmaps=inmaps, outmaps=outsize, size=2, useBias=False)
    W = gpuarray.to_host(deconv.W)
    # Transposed weight (in, out, k, k, k): fans swap, fan "in" = shape[0] * k^3 = 16, bound sqrt(3/16).
    bound = np.sqrt(3.0 / 16)
    assert W.min() >= -bound and W.max() <= bound
    np.random.seed(3)
    again = gpuarray.to_host(Deconv3D(inmaps, outsize, 2, useBias=False).W)
    np.testing.assert_array_equal(W, again)
