"""The AttZoom layer: fused == literal, gradients, the threshold rule and zero insertion."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from attzoom.config import ConfigError, TrainConfig
from attzoom.layer import AttZoom, zero_insert


def _pair(channels, kernel_size, zoom, dtype, gate=True, seed=0):
    """A literal layer and a fused one loaded from the literal's state_dict."""
    torch.manual_seed(seed)
    literal = AttZoom(channels, kernel_size, zoom=zoom, gate=gate, fused=False).to(dtype)
    fused = AttZoom(channels, kernel_size, zoom=zoom, gate=gate, fused=True).to(dtype)
    fused.load_state_dict(literal.state_dict())
    return literal, fused


def _spec_forward(layer, x):
    """The paper's steps 1-4 written out independently of the module's code paths."""
    k, s, t = layer.kernel_size, layer.zoom, layer.threshold
    if layer.attention is not None:
        a = torch.sigmoid(F.conv2d(x, layer.attention.weight, layer.attention.bias, padding=k // 2))
        x = x * torch.where(a >= t, torch.ones_like(a), a)
    n, c, h, w = x.shape
    u = torch.zeros(n, c, s * h, s * w, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            u[:, :, s * i, s * j] = x[:, :, i, j]
    return F.conv2d(u, layer.enhance.weight, layer.enhance.bias, padding=k // 2)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("hw", [(7, 6), (8, 9)])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("zoom", [1, 2, 3, 4])
def test_fused_equals_literal_forward_and_gradients(zoom, kernel_size, hw, dtype, tol):
    literal, fused = _pair(3, kernel_size, zoom, dtype)
    x = torch.randn(2, 3, *hw, dtype=dtype)
    xl, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_l, out_f = literal(xl), fused(xf)
    assert out_f.shape == out_l.shape == (2, 3, zoom * hw[0], zoom * hw[1])
    assert (out_f - out_l).abs().max() < tol
    grad_out = torch.randn_like(out_l)
    out_l.backward(grad_out)
    out_f.backward(grad_out)
    assert (xf.grad - xl.grad).abs().max() < tol
    params_l, params_f = dict(literal.named_parameters()), dict(fused.named_parameters())
    assert params_l.keys() == params_f.keys() == {
        "attention.weight", "attention.bias", "enhance.weight", "enhance.bias"}
    for name in params_l:
        assert params_f[name].grad is not None and params_l[name].grad is not None, name
        assert (params_f[name].grad - params_l[name].grad).abs().max() < tol, name


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("gate", [True, False])
def test_matches_the_paper_steps(fused, gate):
    torch.manual_seed(1)
    layer = AttZoom(4, 3, threshold=0.5, zoom=2, gate=gate, fused=fused).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    if gate:  # make sure both branches of f(A) occur
        a = torch.sigmoid(layer.attention(x))
        assert (a >= 0.5).any() and (a < 0.5).any()
    assert torch.allclose(layer(x), _spec_forward(layer, x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_gradcheck(fused, gate):
    torch.manual_seed(2)
    layer = AttZoom(2, 3, zoom=2, gate=gate, fused=fused).double()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)

    def run(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-7)


def _constant_attention(value_logit, threshold, channels=2):
    """An AttZoom whose attention is sigmoid(value_logit) everywhere, whatever the input."""
    layer = AttZoom(channels, 3, threshold=threshold, zoom=2).double()
    with torch.no_grad():
        layer.attention.weight.zero_()
        layer.attention.bias.fill_(value_logit)
    return layer


def _logit(p):
    return math.log(p / (1 - p))


def test_threshold_at_exactly_t_gives_one():
    layer = _constant_attention(0.0, 0.5)  # sigmoid(0) == 0.5 exactly
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    assert torch.sigmoid(torch.zeros((), dtype=torch.float64)) == 0.5
    m = layer.attention_map(x)
    assert m.shape == (2, 1, 5, 4)
    assert torch.equal(m, torch.ones_like(m))


@pytest.mark.parametrize("threshold, expected", [
    (math.nextafter(0.5, 0.0), 1.0),  # A just above t -> 1
    (math.nextafter(0.5, 1.0), 0.5),  # A just below t -> A itself
])
def test_threshold_around_t(threshold, expected):
    layer = _constant_attention(0.0, threshold)
    m = layer.attention_map(torch.randn(1, 2, 3, 3, dtype=torch.float64))
    assert torch.equal(m, torch.full_like(m, expected))


@pytest.mark.parametrize("value", [0.05, 0.3, 0.49])
def test_below_threshold_returns_attention(value):
    layer = _constant_attention(_logit(value), 0.5)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    m = layer.attention_map(x)
    assert torch.allclose(m, torch.full_like(m, value), atol=1e-12)
    # the forward scales the input by A before zooming
    expected = F.conv2d(zero_insert(x * value, 2), layer.enhance.weight, layer.enhance.bias, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-12)


@pytest.mark.parametrize("value", [0.51, 0.7, 0.99])
def test_above_threshold_returns_one(value):
    layer = _constant_attention(_logit(value), 0.5)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    assert torch.equal(layer.attention_map(x), torch.ones(2, 1, 4, 4, dtype=torch.float64))
    expected = F.conv2d(zero_insert(x, 2), layer.enhance.weight, layer.enhance.bias, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-12)


def test_attention_map_mixes_both_rules_per_position():
    torch.manual_seed(3)
    layer = AttZoom(3, 3, threshold=0.6).double()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    a = torch.sigmoid(layer.attention(x))
    m = layer.attention_map(x)
    assert m.shape == (2, 1, 6, 7)
    above = a >= 0.6
    assert above.any() and (~above).any()
    assert torch.equal(m[above], torch.ones_like(m[above]))
    assert torch.equal(m[~above], a[~above])


@pytest.mark.parametrize("fused", [True, False])
def test_gate_off_is_plain_zoom(fused):
    torch.manual_seed(4)
    layer = AttZoom(3, 3, zoom=3, gate=False, fused=fused).double()
    assert layer.attention is None
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    m = layer.attention_map(x)
    assert m.shape == (2, 1, 5, 4) and torch.equal(m, torch.ones_like(m))
    expected = F.conv2d(zero_insert(x, 3), layer.enhance.weight, layer.enhance.bias, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("channels, k", [(3, 3), (8, 5)])
def test_parameter_counts(channels, k):
    gated = sum(p.numel() for p in AttZoom(channels, k).parameters())
    ungated = sum(p.numel() for p in AttZoom(channels, k, gate=False).parameters())
    assert ungated == channels * channels * k * k + channels
    assert gated - ungated == channels * k * k + 1


@pytest.mark.parametrize("zoom", [1, 2, 3])
def test_zero_insert_places_values(zoom):
    x = torch.rand(2, 3, 4, 5) + 1  # no zeros in x
    u = zero_insert(x, zoom)
    assert u.shape == (2, 3, zoom * 4, zoom * 5)
    assert u.dtype == x.dtype
    mask = torch.zeros_like(u, dtype=torch.bool)
    for h in range(4):
        for w in range(5):
            assert torch.equal(u[:, :, zoom * h, zoom * w], x[:, :, h, w])
            mask[:, :, zoom * h, zoom * w] = True
    assert (u[~mask] == 0).all()
    assert int((u != 0).sum()) == x.numel()


def test_literal_forward_is_conv_of_zero_insert():
    torch.manual_seed(5)
    layer = AttZoom(3, 5, zoom=2, fused=False).double()
    x = torch.randn(1, 3, 6, 5, dtype=torch.float64)
    weighted = x * layer.attention_map(x)
    expected = F.conv2d(zero_insert(weighted, 2), layer.enhance.weight, layer.enhance.bias, padding=2)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)  # the bias is added apart: rounding only


FLOAT32_EPS = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("zoom", [2, 4])
def test_float32_gradients_stay_close_to_float64(fused, zoom):
    """Both modes' float32 gradients are within float32 rounding of the float64 ones (no lossy reduction). The
    bound, 16 float32 epsilons of the largest gradient, holds for any summation order: one thread (as a Ray trial
    runs, OMP_NUM_THREADS=1) sums the weight gradients in one long run, 3.8 epsilons off here, where two threads
    were 2.4 off; a half-precision reduction would be thousands off."""
    torch.manual_seed(3)
    layer = AttZoom(3, 3, zoom=zoom, fused=fused)
    x = torch.randn(2, 3, 8, 9)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        layer.zero_grad(set_to_none=True)
        out = layer.to(dtype)(x.to(dtype))
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype))
        grads[dtype] = {name: p.grad.double() for name, p in layer.named_parameters()}
    for name, exact in grads[torch.float64].items():
        scale = exact.abs().max().item()
        assert (grads[torch.float32][name] - exact).abs().max() < 16 * FLOAT32_EPS * max(scale, 1), name


def test_state_dict_is_shared_between_modes():
    fused = AttZoom(4, 3, fused=True)
    literal = AttZoom(4, 3, fused=False)
    assert fused.state_dict().keys() == literal.state_dict().keys()
    for key, value in fused.state_dict().items():
        assert value.shape == literal.state_dict()[key].shape
    assert fused.enhance.weight.shape == (4, 4, 3, 3)  # Conv2d layout in both modes


@pytest.mark.parametrize("kwargs", [{"kernel_size": 2}, {"kernel_size": 4}, {"kernel_size": 0},
                                    {"kernel_size": -3}, {"zoom": 0}, {"zoom": -1}])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        AttZoom(3, **kwargs)


@pytest.mark.parametrize("threshold", [1.5, -0.5, math.nan])
def test_a_threshold_outside_0_1_is_refused_as_fit_refuses_it(threshold):
    with pytest.raises(ConfigError) as from_fit:
        TrainConfig(threshold=threshold).validate()
    with pytest.raises(ConfigError, match=r"^threshold must be ") as from_layer:
        AttZoom(3, threshold=threshold)
    assert str(from_layer.value) == str(from_fit.value)


@pytest.mark.parametrize("shape", [(16, 8, 8), (2, 8, 8, 8), (1, 2, 16, 8, 8), (8,)])
def test_an_input_that_is_not_n_c_h_w_with_its_channels_is_one_clear_error(shape):
    # (16, 8, 8) failed deep inside: "required rank 4 tensor to use channels_last format"
    for fused in (True, False):
        with pytest.raises(ValueError, match=re.escape(f"(N, 16, H, W), got {tuple(shape)}")):
            AttZoom(16, fused=fused)(torch.randn(shape))


@pytest.mark.parametrize("bias, open_share", [(30.0, 100.0), (-30.0, 0.0)])
def test_gate_stats_count_positions_where_the_gate_is_fully_open(bias, open_share):
    from attzoom.layer import GateStats

    layer = AttZoom(4, threshold=0.5).eval()
    with torch.no_grad():
        layer.attention.weight.zero_()
        layer.attention.bias.fill_(bias)
    layer.stats = GateStats()
    layer(torch.randn(2, 4, 6, 6))
    seen = layer.stats.metrics()
    assert seen["gate_open"] == open_share
    assert seen["gate_sigma"] == pytest.approx(open_share / 100, abs=1e-6)


def test_gate_stats_split_open_and_scaled_positions_at_the_threshold():
    from attzoom.layer import GateStats

    stats = GateStats()
    stats.add(torch.tensor([0.2, 0.5, 0.7, 0.9]), threshold=0.6)
    assert stats.metrics() == pytest.approx({"gate_open": 50.0, "gate_sigma": 0.575})
    assert GateStats().metrics() == {}  # a model without a gate reports nothing
