"""PyTorch interop: from_torch / to_torch round trips, outputs equal, clear refusals."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from ndconv import gpuarray  # noqa: E402
from ndconv.containers import Sequential  # noqa: E402
from ndconv.interop import from_torch, to_torch  # noqa: E402
from ndconv.modules import (Conv1D, Conv2D, Conv3D, Deconv1D, Deconv2D, Deconv3D,  # noqa: E402
                            DeconvND)

host = gpuarray.to_host

TORCH_LAYERS = [
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9), Conv1D),
    (lambda: nn.Conv2d(3, 4, (2, 3), dilation=(2, 1), padding=(1, 2), bias=False), (2, 3, 7, 6), Conv2D),
    (lambda: nn.Conv2d(2, 4, 3, padding="same", dilation=2, padding_mode="reflect"), (1, 2, 7, 7), Conv2D),
    (lambda: nn.Conv2d(2, 2, 4, padding="same"), (1, 2, 6, 6), Conv2D),
    (lambda: nn.Conv3d(2, 4, 2, padding="valid", padding_mode="circular"), (1, 2, 4, 3, 5), Conv3D),
    (lambda: nn.ConvTranspose1d(4, 2, 3, stride=3, padding=1, output_padding=2, groups=2), (2, 4, 5), Deconv1D),
    (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1, dilation=1), (1, 3, 4, 4),
     Deconv2D),
    (lambda: nn.ConvTranspose3d(2, 2, 2, stride=(2, 1, 2), dilation=(1, 3, 1), output_padding=(1, 2, 0),
                                bias=False), (1, 2, 3, 3, 2), Deconv3D),
]


def _np(t):
    return t.detach().numpy()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("make,shape,cls", TORCH_LAYERS, ids=[str(i) for i in range(len(TORCH_LAYERS))])
def test_from_torch_then_back(make, shape, cls):
    torch.manual_seed(0)
    m = make()
    x = torch.randn(*shape)
    mod = from_torch(m)
    assert type(mod) is cls
    got = host(mod(gpuarray.to_gpu(x.numpy())))
    want = _np(m(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Weights are copies, not shared.
    with torch.no_grad():
        m.weight.add_(1.0)
    np.testing.assert_array_equal(host(mod(gpuarray.to_gpu(x.numpy()))), got)
    back = to_torch(mod)
    assert type(back) is type(m)
    np.testing.assert_array_equal(_np(back.weight), host(mod.W))
    np.testing.assert_allclose(_np(back(x)), got, rtol=1e-5, atol=1e-5)
    for attr in ("stride", "dilation", "groups", "padding_mode", "in_channels", "out_channels", "kernel_size"):
        assert getattr(back, attr) == getattr(m, attr)


def test_sequential_round_trip_and_training_equivalence():
    torch.manual_seed(1)
    tnet = nn.Sequential()
    tnet.add_module("enc", nn.Conv2d(1, 4, 3, stride=2, padding=1))
    tnet.add_module("mid", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4)))
    tnet.add_module("dec", nn.ConvTranspose2d(4, 1, 3, stride=2, padding=1, output_padding=1))
    net = from_torch(tnet)
    assert isinstance(net, Sequential) and isinstance(net["mid"], Sequential)
    assert sorted(net.vars) == ["dec.W", "dec.b", "enc.W", "enc.b", "mid.0.W", "mid.0.b"]
    x = torch.randn(2, 1, 8, 8)
    np.testing.assert_allclose(host(net(gpuarray.to_gpu(x.numpy()))), _np(tnet(x)), rtol=1e-5, atol=1e-5)
    # One SGD step on both sides gives the same weights.
    g = torch.randn(2, 1, 8, 8)
    tnet(x).backward(g)
    net.backward(gpuarray.to_gpu(g.numpy()))
    with torch.no_grad():
        for p in tnet.parameters():
            p -= 0.1 * p.grad
    net.updateParams(0.1)
    np.testing.assert_allclose(host(net.getVar("mid.0.W").data), _np(tnet.mid[0].weight), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(host(net.getVar("dec.b").data).reshape(-1), _np(tnet.dec.bias), rtol=1e-5,
                               atol=1e-6)
    back = to_torch(net)
    assert list(dict(back.named_children())) == ["enc", "mid", "dec"]
    np.testing.assert_allclose(_np(back(x)), _np(tnet(x)), rtol=1e-5, atol=1e-5)


def test_dtypes_follow_torch():
    m = nn.Conv1d(2, 2, 3).double()
    mod = from_torch(m)
    assert mod.W.dtype == np.float64 and mod.calctype == np.float64
    x = torch.randn(1, 2, 6, dtype=torch.float64)
    np.testing.assert_allclose(host(mod(gpuarray.to_gpu(x.numpy()))), _np(m(x)), rtol=1e-12)
    assert to_torch(mod).weight.dtype == torch.float64


def test_refusals():
    with pytest.raises(TypeError, match="torch.nn.modules.linear.Linear"):
        from_torch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"nn.Sequential of them, got .*LeakyReLU"):
        from_torch(nn.Sequential(nn.Conv2d(1, 1, 1), nn.LeakyReLU()))
    with pytest.raises(ValueError, match="asymmetric pad"):
        to_torch(Conv2D(1, 1, 3, pad=((0, 1), (1, 1))))
    with pytest.raises(ValueError, match="asymmetric pad"):
        to_torch(DeconvND(1, 1, 1, 3, pad=((1, 2),)))
    with pytest.raises(ValueError, match="not set"):
        to_torch(Conv2D(1, 1, 1, empty=True))
    with pytest.raises(TypeError, match="to_torch converts"):
        to_torch(object())
    # 'same'-shaped asymmetric pads do convert (stride 1).
    t = to_torch(Conv2D(1, 1, 4, pad=((1, 2), (1, 2))))
    assert t.padding == "same"


def test_activations_convert_inside_sequentials():
    torch.manual_seed(2)
    tnet = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 1), nn.Tanh(),
                         nn.ConvTranspose1d(4, 1, 2, stride=2), nn.Sigmoid())
    net = from_torch(tnet)
    assert [type(m).__name__ for m in net] == ["Conv1D", "ReLU", "Conv1D", "Tanh", "Deconv1D", "Sigmoid"]
    x = torch.randn(3, 2, 7)
    np.testing.assert_allclose(host(net(gpuarray.to_gpu(x.numpy()))), _np(tnet(x)), rtol=1e-5, atol=1e-6)
    back = to_torch(net)
    assert [type(m) for m in back] == [type(m) for m in tnet]
    np.testing.assert_allclose(_np(back(x)), _np(tnet(x)), rtol=1e-5, atol=1e-6)
