"""Frequency-domain noise filter: pass-through at init, any size, learnable low-pass, teacher-only."""

import io

import pytest
import torch

from d3n.train.teacher.freqfilter import FreqFilter, FreqFilterConfig


@pytest.mark.parametrize("size", [(7, 9), (8, 8), (5, 2), (1, 1), (33, 17)])
@pytest.mark.parametrize("attention", [True, False])
def test_pass_through_at_init_any_size(size, attention):
    torch.manual_seed(0)
    f = FreqFilter(6, FreqFilterConfig(attention=attention))
    x = torch.randn(2, 6, *size)
    y = f(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_gradients_reach_gain_attention_and_input():
    torch.manual_seed(0)
    f = FreqFilter(4)
    x = torch.randn(2, 4, 9, 7, requires_grad=True)
    (f(x) * torch.randn(2, 4, 9, 7)).sum().backward()
    for name, p in f.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(8, 8), (8, 10), (16, 6)])
def test_learned_low_pass_removes_nyquist_checkerboard(size):
    """A gain map that keeps only |f| <= 0.25 cycles/px removes a checkerboard, keeps the mean."""
    f = FreqFilter(3, FreqFilterConfig(bins=8))
    b = 8
    rows = torch.arange(-b, b + 1).abs()[:, None]
    cols = torch.arange(b + 1)[None]
    with torch.no_grad():
        f.gain[:3] = ((rows <= b // 2) & (cols <= b // 2)).float()
        f.gain[3:] = 0.0
    i, j = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    x = (3.0 + (-1.0) ** (i + j))[None, None].repeat(2, 3, 1, 1)
    torch.testing.assert_close(f(x), torch.full_like(x, 3.0), atol=1e-5, rtol=0)


def test_zero_gain_blocks_everything():
    f = FreqFilter(2, FreqFilterConfig(attention=False))
    with torch.no_grad():
        f.gain.zero_()
    assert f(torch.randn(1, 2, 5, 6)).abs().max() < 1e-6


def test_half_precision_input_keeps_dtype():
    f = FreqFilter(2)
    x = torch.randn(1, 2, 6, 5).to(torch.bfloat16)
    assert f(x).dtype == torch.bfloat16


def test_wrong_channels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects \(B, 4, H, W\)"):
        FreqFilter(4)(torch.randn(1, 3, 8, 8))


def test_fft_filter_is_teacher_only_it_does_not_export_to_onnx():
    """torch.fft.rfft2 has no ONNX symbolic: the filter stays in the teacher, never exported."""
    f = FreqFilter(2).eval()
    assert FreqFilter.teacher_only is True
    with pytest.raises(Exception, match="fft_rfft2"):
        torch.onnx.export(f, (torch.randn(1, 2, 8, 8),), io.BytesIO(), dynamo=False, opset_version=18)
