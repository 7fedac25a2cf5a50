"""ndconv.explain / `ndconv explain`: values equal PyTorch and ndconv, pictures are valid files."""
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import ndconv
from ndconv.cli import main
from ndconv.tools.explain import parse_matrix

X = [[2.0, 4.0], [0.0, 1.0]]
W = [[3.0, 1.0], [1.0, 5.0]]


def _torch_t(x, w, **kw):
    fn = {1: TF.conv_transpose1d, 2: TF.conv_transpose2d, 3: TF.conv_transpose3d}[np.ndim(x)]
    return fn(torch.tensor(x, dtype=torch.float64)[None, None], torch.tensor(w, dtype=torch.float64)[None, None],
              **kw)[0, 0].numpy()


def _torch_c(x, w, **kw):
    fn = {1: TF.conv1d, 2: TF.conv2d, 3: TF.conv3d}[np.ndim(x)]
    return fn(torch.tensor(x, dtype=torch.float64)[None, None], torch.tensor(w, dtype=torch.float64)[None, None],
              **kw)[0, 0].numpy()


# Seed 002's four cases: sizes from the seed's answer, values from PyTorch.
@pytest.mark.parametrize("stride,padding,size,expected", [
    (1, 0, (3, 3), [[6, 14, 4], [2, 17, 21], [0, 1, 5]]),
    (1, 1, (1, 1), [[17]]),
    (2, 0, (4, 4), [[6, 2, 12, 4], [2, 10, 4, 20], [0, 0, 3, 1], [0, 0, 1, 5]]),
    (2, 1, (2, 2), [[10, 4], [0, 3]]),
])
def test_seed_002_four_cases(stride, padding, size, expected):
    e = ndconv.explain("conv_transpose2d", X, W, stride=stride, padding=padding)
    ref = _torch_t(X, W, stride=stride, padding=padding)
    assert e.output.shape == size == ref.shape
    np.testing.assert_array_equal(e.output, ref)
    np.testing.assert_array_equal(e.output, expected)
    # the copies: each one is its element times the kernel, placed index*stride on the canvas
    assert e.contributions.shape == (2, 2) + e.canvas.shape
    for (i, j) in np.ndindex(2, 2):
        block = e.contributions[i, j][i * stride:i * stride + 2, j * stride:j * stride + 2]
        np.testing.assert_array_equal(block, X[i][j] * np.array(W))
        assert e.footprints[i, j].sum() == 4
    np.testing.assert_array_equal(e.contributions.sum(axis=(0, 1)), e.canvas)
    np.testing.assert_array_equal(e.full, _torch_t(X, W, stride=stride))


def test_seed_002_all_ones_4x4():
    x = np.ones((4, 4))
    w = np.arange(1, 17, dtype=float).reshape(4, 4)
    printed = [[6, 12, 14, 12, 14, 12, 14, 7], [12, 24, 28, 24, 28, 24, 28, 14],
               [20, 40, 44, 40, 44, 40, 44, 22], [12, 24, 28, 24, 28, 24, 28, 14],
               [20, 40, 44, 40, 44, 40, 44, 22], [12, 24, 28, 24, 28, 24, 28, 14],
               [20, 40, 44, 40, 44, 40, 44, 22], [10, 20, 22, 20, 22, 20, 22, 11]]
    e = ndconv.explain("conv_transpose2d", x, w, stride=2, padding=1)
    np.testing.assert_array_equal(e.output, printed)
    np.testing.assert_array_equal(e.output, _torch_t(x, w, stride=2, padding=1))
    assert e.canvas.shape == (10, 10) and e.crop == ((1, 9), (1, 9))
    assert e.contributions.shape == (4, 4, 10, 10)


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1, output_padding=1), dict(stride=3, padding=2, output_padding=2),
                                dict(stride=2, padding=0, output_padding=1), dict(stride=(2, 1), dilation=(1, 2)),
                                dict(stride=1, dilation=3, padding=2, output_padding=2)])
def test_transposed_output_padding_and_dilation_match_torch(kw):
    x = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
    w = np.array([[1.0, 2.0], [3.0, -4.0]])
    e = ndconv.explain("conv_transpose2d", x, w, **kw)
    np.testing.assert_allclose(e.output, _torch_t(x, w, **kw))
    np.testing.assert_allclose(e.output, ndconv.conv_transpose2d(x[None, None], w[None, None], **kw)[0, 0])
    kinds = {e.position_kind(0, p) for p in range(e.canvas.shape[0])}
    if kw.get("output_padding") and kw.get("padding"):
        assert "op" in kinds       # uncropped real values
    if kw.get("output_padding") and not kw.get("padding"):
        assert "zero" in kinds     # nothing to uncrop: zeros past the canvas


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=2, padding=2),
                                dict(stride=(2, 1), padding=(0, 1))])
def test_conv_windows_and_values(kw):
    x = np.arange(1.0, 21.0).reshape(4, 5)
    w = np.array([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]])
    e = ndconv.explain("conv2d", x, w, **kw)
    np.testing.assert_allclose(e.output, _torch_c(x, w, **kw))
    assert e.contributions.shape == e.output.shape + w.shape
    for o in np.ndindex(*e.output.shape):
        pos = e.windows(o)
        products = [e.padded[p] * w[t] for p, t in zip(pos, np.ndindex(*w.shape))]
        np.testing.assert_allclose(e.contributions[o].ravel(), products)
        assert np.isclose(sum(products), e.output[o])


def test_one_d_and_three_d():
    e = ndconv.explain("conv_transpose1d", [1, 2, 3], [1, -1], stride=2, padding=1, output_padding=1)
    np.testing.assert_array_equal(e.output, _torch_t([1, 2, 3], [1, -1], stride=2, padding=1, output_padding=1))
    x3 = np.arange(8.0).reshape(2, 2, 2)
    w3 = np.ones((2, 1, 2))
    e3 = ndconv.explain("conv_transpose3d", x3, w3, stride=2, padding=(1, 0, 0))
    np.testing.assert_array_equal(e3.output, _torch_t(x3, w3, stride=2, padding=(1, 0, 0)))
    c3 = ndconv.explain("conv", "1 2; 3 4 | 5 6; 7 8", "1 0; 0 1 | 1 1; 1 1", padding=1)
    assert c3.op == "conv3d"
    np.testing.assert_array_equal(c3.output, _torch_c(c3.input, c3.kernel, padding=1))
    text = c3.text()
    assert "depth 0" in text and "depth 3" in text


def test_parse_matrix_and_errors():
    np.testing.assert_array_equal(parse_matrix("2 4; 0 1"), X)
    np.testing.assert_array_equal(parse_matrix("1, 2,3"), [1, 2, 3])
    assert parse_matrix("1 2; 3 4 | 5 6; 7 8").shape == (2, 2, 2)
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_matrix("2 x; 0 1", "--input")
    with pytest.raises(ValueError, match="rows have different lengths"):
        parse_matrix("1 2; 3", "--input")
    with pytest.raises(ValueError, match="needs a 2-D kernel"):
        ndconv.explain("conv_transpose2d", X, [1, 2])
    with pytest.raises(ValueError, match="Kernel size can't be greater"):
        ndconv.explain("conv2d", X, np.ones((3, 3)))
    with pytest.raises(ValueError, match="output_padding must be smaller"):
        ndconv.explain("conv_transpose2d", X, W, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="op must be one of"):
        ndconv.explain("deconv2d", X, W)
    with pytest.raises(ValueError, match="too large to draw"):
        ndconv.explain("conv2d", np.ones((30, 30)), W)


def test_png_and_svg_files(tmp_path):
    e = ndconv.explain("conv_transpose2d", X, W, stride=2, padding=1)
    png = e.save(tmp_path / "t.png")
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 600 < width < 3000 and 400 < height < 3000
    svg = e.save(tmp_path / "t.svg")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    c = ndconv.explain("conv1d", [1, 2, 3, 4], [1, -1], padding=1)
    assert open(c.save(tmp_path / "c.png"), "rb").read()[:4] == b"\x89PNG"
    assert e.figure is e.figure  # made once
    with pytest.raises(ValueError, match="must end in"):
        e.save(tmp_path / "t.jpg")


def test_cli_terminal_and_files(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    rc = main(["explain", "conv_transpose2d", "--input", "2 4; 0 1", "--kernel", "3 1; 1 5",
               "--stride", "2", "--padding", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "\033[" not in out  # captured stdout is not a terminal
    assert "x[0,1] = 4: 4*w added at rows 0..1, cols 2..3" in out
    assert "(6)" in out and "output = canvas rows 1..2, cols 1..2" in out
    assert ndconv.explain("conv_transpose2d", X, W, stride=2, padding=1).text(color=True).count("\033[") > 10
    rc = main(["explain", "conv2d", "--input", "1 2 3; 4 5 6; 7 8 9", "--kernel", "1 0; 0 -1", "--padding", "1",
               "--stride", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "y[1,1] = 5*1 + 6*0 + 8*0 + 9*(-1) = -4" in out
    target = tmp_path / "e.svg"
    assert main(["explain", "conv_transpose1d", "--input", "1 2", "--kernel", "1 1 1", "--stride", "2",
                 "--out", str(target)]) == 0
    assert ET.parse(target).getroot().tag.endswith("svg")


@pytest.mark.parametrize("argv,msg", [
    (["--input", "2 x; 0 1", "--kernel", "1"], "'x' is not a number"),
    (["--input", "2 4; 0", "--kernel", "3 1; 1 5"], "rows have different lengths"),
    (["--input", "2 4; 0 1", "--kernel", "3 1; 1 5", "--padding", "-1"], "--padding values must be >= 0"),
    (["--input", "2 4; 0 1", "--kernel", "3 1; 1 5", "--stride", "2", "--output-padding", "3"],
     "output_padding must be smaller"),
    (["--input", "2 4; 0 1", "--kernel", "3 1; 1 5", "--out", "x.gif"], "--out must end in"),
])
def test_cli_errors(argv, msg, capsys):
    rc = main(["explain", "conv_transpose2d"] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and msg in err and "Traceback" not in err
