"""Dynamic cross-fusion (Fig. 6) and its Table I-II switches: shapes, gradients, init, weights."""

import pytest
import torch
from pydantic import ValidationError

from d3n.train.teacher.fusion import CrossFusion, FusionConfig, PooledAttention

CX, CD = 16, 12
SWITCHES = ["use_filter", "use_cross", "use_self_x", "use_self_d", "learn_weights", "residual", "norm"]
MODES = ["dynamic", "concat", "sum", "weighted_sum"]


def _inputs(h=7, w=5, b=2):
    torch.manual_seed(0)
    return torch.randn(b, CX, h, w), torch.randn(b, CD, h, w)


def _perturb(module):
    """Move every parameter off its initial value so all paths carry signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _check_shape_and_grads(cfg):
    fusion = CrossFusion(CX, CD, cfg)
    _perturb(fusion)
    x, d = _inputs()
    x.requires_grad_(True)
    d.requires_grad_(True)
    out = fusion(x, d)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad.abs().sum() > 0
    assert d.grad.abs().sum() > 0
    missing = [n for n, p in fusion.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("residual", [True, False])
def test_every_mode_shapes_and_gradients(mode, residual):
    _check_shape_and_grads(FusionConfig(mode=mode, residual=residual))


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_off_still_works(switch):
    _check_shape_and_grads(FusionConfig(**{switch: False}))


def test_switches_remove_their_modules():
    cfg = FusionConfig(use_filter=False, use_cross=False, use_self_d=False, norm=False, residual=False,
                       learn_weights=False)
    fusion = CrossFusion(CX, CD, cfg)
    assert fusion.filter is None and fusion.cross is None and fusion.self_d is None
    assert fusion.self_x is not None and fusion.out is None and fusion.logits is None
    assert isinstance(fusion.norm_d, torch.nn.Identity)


@pytest.mark.parametrize("mode", MODES)
def test_starts_as_the_detector_features_with_the_residual(mode):
    """Zero-initialised output projection: out == X at init, whatever D is."""
    x, d = _inputs()
    torch.testing.assert_close(CrossFusion(CX, CD, FusionConfig(mode=mode, residual=True))(x, d), x)


def test_table_ii_rows_are_the_plain_operations():
    """Table II compares the operations themselves: Sum is X + D', weighted sum w1 X + w2 D', with no
    residual wrapper unless asked for; the dynamic fusion keeps its residual by default."""
    x, d = _inputs()
    assert FusionConfig().residual is True and FusionConfig(mode="sum").residual is False
    s = CrossFusion(CX, CD, FusionConfig(mode="sum"))
    torch.testing.assert_close(s(x, d), x + s.ddpm_branch(d))
    w = CrossFusion(CX, CD, FusionConfig(mode="weighted_sum"))
    torch.testing.assert_close(w(x, d), 0.5 * x + 0.5 * w.ddpm_branch(d))
    assert s.out is None and w.out is None


def test_table_i_row_4_weighs_cross_against_the_detector_residual():
    """Weighted sum + residual without dual self-attention: the weights choose between the cross
    branch and X, and they receive gradient (a softmax over the cross branch alone would not)."""
    x, d = _inputs()
    fusion = CrossFusion(CX, CD, FusionConfig(use_self_x=False, use_self_d=False))
    torch.testing.assert_close(fusion(x, d), x)  # still starts as the detector
    w = fusion.branch_weights()
    assert w[0] > 0 and w[1] > 0 and w[2] == 0
    _perturb(fusion)  # the zero-initialised projection after some training
    fusion.logits.grad = None
    fusion(x, d).pow(2).mean().backward()
    assert fusion.logits.grad[:2].abs().min() > 0


def test_concat_without_residual_starts_as_x():
    x, d = _inputs()
    fusion = CrossFusion(CX, CD, FusionConfig(mode="concat", residual=False))
    torch.testing.assert_close(fusion(x, d), x)


def test_ddpm_features_change_the_output_once_trained():
    x, d = _inputs()
    fusion = CrossFusion(CX, CD)
    _perturb(fusion)
    assert (fusion(x, d) - fusion(x, d + 1.0 * torch.randn_like(d))).abs().max() > 1e-3


def test_zero_initialised_fusion_learns_to_use_the_ddpm_features():
    """From out == X, a few optimiser steps pull the output towards a target built from D."""
    x, d = _inputs(h=6, w=6)
    target = x + torch.tanh(d[:, :CX // 2].repeat(1, 2, 1, 1))
    fusion = CrossFusion(CX, CD, FusionConfig(kv_size=6))
    opt = torch.optim.Adam(fusion.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = (fusion(x, d) - target).pow(2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("cfg,expect_zero", [
    (FusionConfig(), []),
    (FusionConfig(use_cross=False), [0]),
    (FusionConfig(use_self_x=False, use_self_d=False), [2]),  # Table I row 4: cross vs X
    (FusionConfig(use_self_x=False, use_self_d=False, learn_weights=False), [1, 2]),
    (FusionConfig(mode="weighted_sum"), [0]),
    (FusionConfig(mode="sum"), [0]),
    (FusionConfig(learn_weights=False, use_self_d=False), [2]),
])
def test_branch_weights_sum_to_one(cfg, expect_zero):
    fusion = CrossFusion(CX, CD, cfg)
    _perturb(fusion)
    w = fusion.branch_weights()
    assert w.shape == (3,)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    for i in range(3):
        assert (w[i] == 0) == (i in expect_zero)


def test_branch_weights_follow_the_logits_and_concat_has_none():
    fusion = CrossFusion(CX, CD)
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([2.0, 0.0, -1.0]))
    torch.testing.assert_close(fusion.branch_weights(), torch.softmax(torch.tensor([2.0, 0.0, -1.0]), 0))
    assert CrossFusion(CX, CD, FusionConfig(mode="concat")).branch_weights() is None


def test_large_maps_attend_over_pooled_tokens():
    """Keys/values are pooled to kv_size^2 tokens: the attention sees 4x4 tokens for a 32x24 map."""
    att = PooledAttention(CX, 4, kv_size=4)
    seen = {}
    att.mha.register_forward_hook(lambda m, args, out: seen.update(q=args[0].shape, k=args[1].shape))
    out = att(torch.randn(1, CX, 32, 24), torch.randn(1, CX, 32, 24))
    assert out.shape == (1, CX, 32, 24)
    assert seen["q"] == (1, 32 * 24, CX) and seen["k"] == (1, 16, CX)


def test_bad_inputs_and_configs_are_clear_errors():
    with pytest.raises(ValidationError, match="at least one"):
        FusionConfig(use_cross=False, use_self_x=False, use_self_d=False)
    with pytest.raises(ValidationError):
        FusionConfig(mode="attention")
    with pytest.raises(ValidationError):
        FusionConfig(typo=True)
    with pytest.raises(ValueError, match="divisible"):
        CrossFusion(18, CD)
    x, d = _inputs()
    with pytest.raises(ValueError, match="resample them first"):
        CrossFusion(CX, CD)(x, d[..., :3])


def test_without_ddpm_no_branch_reads_the_ddpm_features():
    """The "distillation alone" control: no filter, projection, cross- or DDPM self-attention, and
    the output does not depend on D at all; the detector branch and the residual stay."""
    x, d = _inputs()
    fusion = CrossFusion(CX, CD, FusionConfig(use_ddpm=False))
    assert fusion.filter is None and fusion.proj_d is None and fusion.cross is None and fusion.self_d is None
    assert fusion.self_x is not None and fusion.out is not None
    _perturb(fusion)
    torch.testing.assert_close(fusion(x, d), fusion(x, torch.randn_like(d) * 5))
    assert not any("proj_d" in n or "filter" in n for n, _ in fusion.named_parameters())
    with pytest.raises(ValueError, match="use_ddpm"):
        FusionConfig(use_ddpm=False, mode="sum")
