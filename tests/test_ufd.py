"""UFD (docs/methods/ufd.md): the closed-form losses against a DCT oracle, their properties (§9), the cross-attention projector
(§3) and the distiller's wiring, gradients and frozen teacher."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from distillers.base import DistillerError
from distillers.cap import CrossAttentionProjector, default_num_heads
from distillers.final_map import head_norm_on_map
from distillers.frequency import decoupled_squared_errors, normalized_squared_error
from distillers.ufd import UFD, channel_decoupled_loss, spatial_decoupled_loss
from tests.helpers import distiller_args, read_summary, run_train

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- DCT oracle
def dct2_matrix(n):
    """Unnormalized DCT-II: row k is cos(pi * (i + 1/2) * k / n). The losses do not depend on the scaling."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / n)


class DCTOracle:
    """docs/methods/ufd.md §4.1 taken literally: transform, keep DC or AC coefficients, invert, normalize, sum-SE / B."""

    def __init__(self, channels, h, w, dtype=torch.float32):
        self.fwd = {n: dct2_matrix(n).to(dtype) for n in {channels, h, w}}
        self.inv = {n: torch.linalg.inv(dct2_matrix(n)).to(dtype) for n in {channels, h, w}}
        self.h, self.w, self.c = h, w, channels

    def spatial(self, p_map, t_map):
        dh, dw, ih, iw = self.fwd[self.h], self.fwd[self.w], self.inv[self.h], self.inv[self.w]
        keep_dc = torch.zeros(self.h, self.w, dtype=p_map.dtype)
        keep_dc[0, 0] = 1

        def parts(x):
            coef = dh @ x @ dw.T
            return ih @ (coef * keep_dc) @ iw.T, ih @ (coef * (1 - keep_dc)) @ iw.T
        (p_dc, p_ac), (t_dc, t_ac) = parts(p_map), parts(t_map)
        b = p_map.shape[0]
        term = lambda s, t: (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum() / b
        return term(p_dc, t_dc), term(p_ac, t_ac)

    def channel(self, q_tokens, t_map):
        b = q_tokens.shape[0]
        t_tokens = t_map.permute(0, 2, 3, 1).reshape(b, self.h * self.w, self.c)
        dc_, ic = self.fwd[self.c], self.inv[self.c]
        keep_dc = torch.zeros(self.c, dtype=q_tokens.dtype)
        keep_dc[0] = 1

        def parts(x):
            coef = x @ dc_.T
            return (coef * keep_dc) @ ic.T, (coef * (1 - keep_dc)) @ ic.T
        (q_dc, q_ac), (t_dc, t_ac) = parts(q_tokens), parts(t_tokens)
        term = lambda s, t: (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum() / b
        return term(q_dc, t_dc), term(q_ac, t_ac)


def tokens_to_map(tokens, h, w):
    b, n, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


@pytest.mark.parametrize('b,c,h,w', [(3, 10, 4, 4), (2, 7, 3, 5), (2, 33, 6, 2), (4, 16, 7, 7)])
def test_closed_form_equals_dct_oracle(b, c, h, w):
    g = torch.Generator().manual_seed(c * 100 + h * 10 + w)
    p_tokens = torch.randn(b, h * w, c, generator=g)
    q_tokens = torch.randn(b, h * w, c, generator=g)
    t_map = torch.randn(b, c, h, w, generator=g) + 0.3
    oracle = DCTOracle(c, h, w)
    want_sp = oracle.spatial(tokens_to_map(p_tokens, h, w), t_map)
    want_ch = oracle.channel(q_tokens, t_map)
    got_sp = spatial_decoupled_loss(tokens_to_map(p_tokens, h, w), t_map)
    got_ch = channel_decoupled_loss(tokens_to_map(q_tokens, h, w), t_map)
    for got, want in zip(got_sp + got_ch, want_sp + want_ch):
        assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_hand_written_backward_matches_autograd_through_the_dct_oracle():
    """The losses' backward is written by hand (coefficients times the maps, projected onto mean-free maps);
    autograd through the literal DCT formulation, in float64, must give the same gradients for both inputs."""
    g = torch.Generator().manual_seed(11)
    b, c, h, w = 3, 6, 4, 5
    s_map = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    t_map = torch.randn(b, c, h, w, generator=g, dtype=torch.float64) + 0.3
    weights = (0.7, -1.3, 0.4, 2.1)  # distinct, so that a term's gradient mixed into another's shows
    oracle = DCTOracle(c, h, w, dtype=torch.float64)

    def gradients(loss_of):
        s, t = s_map.clone().requires_grad_(), t_map.clone().requires_grad_()
        sum(a * term for a, term in zip(weights, loss_of(s, t))).backward()
        return s.grad, t.grad

    def with_oracle(s, t):
        return oracle.spatial(s, t) + oracle.channel(s.flatten(2).transpose(1, 2), t)

    def with_closed_form(s, t):
        return (decoupled_squared_errors(s.flatten(2), t.flatten(2), dim=1, mean_dim=2)
                + decoupled_squared_errors(s.flatten(2), t.flatten(2), dim=2, mean_dim=1))
    for got, want in zip(gradients(with_closed_form), gradients(with_oracle)):
        assert want.abs().max() > 0.01
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('dim,mean_dim', [(1, 2), (2, 1)])
def test_hand_written_backward_passes_gradcheck(dim, mean_dim):
    g = torch.Generator().manual_seed(12)
    s = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: decoupled_squared_errors(a, b, dim, mean_dim), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: normalized_squared_error(a, b, dim), (s, t))


def test_values_without_gradients_equal_those_with():
    """Under no_grad (or with no input requiring grad) the losses skip the gradient coefficients."""
    g = torch.Generator().manual_seed(13)
    s, t = torch.randn(2, 8, 3, 5, generator=g), torch.randn(2, 8, 3, 5, generator=g)
    with torch.no_grad():
        plain = spatial_decoupled_loss(s, t) + channel_decoupled_loss(s, t) + (normalized_squared_error(s, t, 1),)
    s.requires_grad_(True)
    tracked = spatial_decoupled_loss(s, t) + channel_decoupled_loss(s, t) + (normalized_squared_error(s, t, 1),)
    assert all(term.grad_fn is not None for term in tracked)
    assert [x.item() for x in plain] == [x.item() for x in tracked]


def test_random_inputs_give_two_per_normalized_vector():
    """§9: uncorrelated student and teacher, E||u - v||^2 = 2: about 2*HW, 2*HW, 2*C, 2*C unweighted."""
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 32, 256, 7, 7
    s, t = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    dc_sp, ac_sp = spatial_decoupled_loss(s, t)
    dc_ch, ac_ch = channel_decoupled_loss(s, t)
    assert dc_sp.item() == pytest.approx(2 * h * w, rel=0.05)
    assert ac_sp.item() == pytest.approx(2 * h * w, rel=0.02)
    assert dc_ch.item() == pytest.approx(2 * c, rel=0.05)
    assert ac_ch.item() == pytest.approx(2 * c, rel=0.02)
    # weighted with the defaults on a Swin-T -> R18 sized map (§9): 2.9, 6.4, 4.6, 10
    weights = (0.03, 0.065, 0.003, 0.0065)
    s, t = torch.randn(16, 768, 7, 7, generator=g), torch.randn(16, 768, 7, 7, generator=g)
    terms = spatial_decoupled_loss(s, t) + channel_decoupled_loss(s, t)
    for a, term, want in zip(weights, terms, (2.94, 6.37, 4.61, 9.98)):
        assert (a * term).item() == pytest.approx(want, rel=0.05)


def test_zero_when_equal_and_bounds():
    g = torch.Generator().manual_seed(1)
    b, c, h, w = 2, 12, 3, 5
    t = torch.randn(b, c, h, w, generator=g)
    # F3 (up to float32 rounding of 1 - cos, about 1e-7 per vector), and never below zero
    for term in spatial_decoupled_loss(t.clone(), t) + channel_decoupled_loss(t.clone(), t * 2.5):
        assert 0 <= term.item() < 1e-5
    # F2: the opposite map meets every normalized vector's negation, the upper bound 4 per vector
    dc_sp, ac_sp = spatial_decoupled_loss(-t, t)
    dc_ch, ac_ch = channel_decoupled_loss(-t, t)
    assert dc_sp.item() == pytest.approx(4 * h * w, rel=1e-5)
    assert ac_sp.item() == pytest.approx(4 * h * w, rel=1e-5)
    assert dc_ch.item() == pytest.approx(4 * c, rel=1e-5)
    assert ac_ch.item() == pytest.approx(4 * c, rel=1e-5)
    s = torch.randn(b, c, h, w, generator=g)
    dc_sp, ac_sp = spatial_decoupled_loss(s, t)
    dc_ch, ac_ch = channel_decoupled_loss(s, t)
    for term, bound in ((dc_sp, h * w), (ac_sp, h * w), (dc_ch, c), (ac_ch, c)):
        assert 0 < term.item() < 4 * bound


def test_invariances():
    """F4 (a)-(e)."""
    g = torch.Generator().manual_seed(2)
    b, c, h, w = 3, 9, 4, 6
    p, t = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    base_sp, base_ch = spatial_decoupled_loss(p, t), channel_decoupled_loss(p, t)

    def close(a, b_):
        assert a.item() == pytest.approx(b_.item(), rel=1e-5)
    # (a) positive per-sample scale of either input: all four terms
    scale = torch.tensor([0.1, 3.0, 17.0]).view(b, 1, 1, 1)
    for args in ((p * scale, t), (p, t * scale)):
        for got, want in zip(spatial_decoupled_loss(*args) + channel_decoupled_loss(*args), base_sp + base_ch):
            close(got, want)
    # (b) per-(sample, channel) constant: spatial AC
    shift = torch.randn(b, c, 1, 1, generator=g) * 3
    close(spatial_decoupled_loss(p + shift, t)[1], base_sp[1])
    close(spatial_decoupled_loss(p, t + shift)[1], base_sp[1])
    assert spatial_decoupled_loss(p + shift, t)[0].item() != pytest.approx(base_sp[0].item(), rel=1e-3)
    # (c) spatial permutation of the student alone: spatial DC
    perm = torch.randperm(h * w, generator=g)
    p_perm = p.flatten(2)[:, :, perm].reshape(b, c, h, w)
    close(spatial_decoupled_loss(p_perm, t)[0], base_sp[0])
    # (d) per-token constant across channels: channel AC
    shift = torch.randn(b, 1, h, w, generator=g) * 3
    close(channel_decoupled_loss(p + shift, t)[1], base_ch[1])
    close(channel_decoupled_loss(p, t + shift)[1], base_ch[1])
    # (e) channel permutation of the student alone: channel DC
    close(channel_decoupled_loss(p[:, torch.randperm(c, generator=g)], t)[0], base_ch[0])


def test_spatially_constant_student_gives_one_per_position():
    """F5: a zero AC vector against a unit one at each of H*W positions. Dyadic values keep the mean exact."""
    g = torch.Generator().manual_seed(3)
    b, c, h, w = 2, 8, 4, 8
    p = (torch.randint(-8, 9, (b, c, 1, 1), generator=g).float() / 4).expand(b, c, h, w)
    t = torch.randn(b, c, h, w, generator=g)
    assert spatial_decoupled_loss(p, t)[1].item() == pytest.approx(h * w, rel=1e-6)


@pytest.mark.parametrize('branch', ['spatial', 'channel'])
def test_rounding_level_ac_part_counts_as_zero_and_passes_no_gradient(branch):
    """A student whose AC part is zero up to float32 rounding (a map constant over space for the spatial branch,
    every channel the same map for the channel branch) scores exactly as an exact zero (1 per vector, F5) and gets
    no gradient from the AC term; normalizing the rounding residue instead gave gradients of 1e5-1e12."""
    g = torch.Generator().manual_seed(5)
    b, c, h, w = 3, 16, 3, 5
    t = torch.randn(b, c, h, w, generator=g)
    if branch == 'spatial':
        exact = (torch.randn(b, c, 1, 1, generator=g) * 5).expand(b, c, h, w)
        loss_fn, vectors = spatial_decoupled_loss, h * w
    else:
        exact = (torch.randn(b, 1, h, w, generator=g) * 5).expand(b, c, h, w)
        loss_fn, vectors = channel_decoupled_loss, c
    for s in (exact.clone(), exact * (1 + 1e-7 * torch.randn(b, c, h, w, generator=g))):
        s.requires_grad_(True)
        ac = loss_fn(s, t)[1]
        assert ac.item() == pytest.approx(vectors, rel=1e-6)
        ac.backward()
        assert torch.count_nonzero(s.grad) == 0
    # a small but real AC part is kept, with a moderate gradient
    s = (exact + 1e-3 * torch.randn(b, c, h, w, generator=g)).requires_grad_(True)
    ac = loss_fn(s, t)[1]
    ac.backward()
    assert ac.item() != pytest.approx(vectors, rel=1e-2) and 0 < s.grad.abs().max() < 1e4


def test_loss_math_never_waits_for_the_device():
    """No data-dependent shapes or host reads in the loss math (each one would stall the host on a GPU every
    step); fake tensors have no data, so such an op raises here."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        s = torch.randn(2, 8, 3, 5, requires_grad=True)
        t = torch.randn(2, 8, 3, 5)
        sum([*spatial_decoupled_loss(s, t), *channel_decoupled_loss(s, t)]).backward()
        assert s.grad.shape == s.shape


def test_gradients_are_finite_at_zero_vectors():
    """A 1x1 grid makes every spatial AC vector exactly zero (as at 32 px); the gradient must stay finite."""
    s = torch.randn(3, 8, 1, 1, requires_grad=True)
    t = torch.randn(3, 8, 1, 1)
    dc_sp, ac_sp = spatial_decoupled_loss(s, t)
    dc_ch, ac_ch = channel_decoupled_loss(s, t)
    assert ac_sp.item() == 0.0  # zero meets zero
    (dc_sp + ac_sp + dc_ch + ac_ch).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_losses_reject_mismatched_maps():
    with pytest.raises(ValueError):
        spatial_decoupled_loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 4))
    with pytest.raises(ValueError):
        channel_decoupled_loss(torch.randn(2, 4, 9), torch.randn(2, 4, 9))


# ---------------------------------------------------------------------------------------------- projector
def cap_parameter_formula(cs, ct, pos_hw, query_hw=None):
    """docs/methods/ufd.md §3: conv, BN, pos_embed, query 1x1, Lin_q, Lin_k + Lin_v, Lin_o, LN, MLP, query table."""
    n = (9 * cs * cs + cs) + 2 * cs + cs * pos_hw[0] * pos_hw[1] + (ct * ct + ct) + (ct * ct + ct) \
        + 2 * (cs * ct + ct) + (ct * ct + ct) + 2 * ct + (8 * ct * ct + 5 * ct)
    return n + (query_hw[0] * query_hw[1] * ct if query_hw else 0)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('student_hw,query_hw,upsample', [
    ((7, 7), (7, 7), False), ((7, 7), (14, 14), True), ((14, 14), (7, 7), False), ((3, 5), (4, 6), False),
    ((3, 5), (2, 3), True)])
def test_cap_shapes_and_parameter_count(student_hw, query_hw, upsample):
    cap = CrossAttentionProjector(6, 16, student_hw, query_hw, num_heads=4, softmax_scale=5, upsample=upsample)
    pos_hw = tuple(2 * v for v in student_hw) if upsample else student_hw
    assert cap.pos_hw == pos_hw and tuple(cap.pos_embed.shape) == (1, 6, *pos_hw)
    assert n_params(cap) == cap_parameter_formula(6, 16, pos_hw, query_hw)
    out = cap(torch.randn(3, 6, *student_hw))
    assert out.shape == (3, query_hw[0] * query_hw[1], 16)


def test_cap_parameter_count_of_the_spec_example():
    with torch.device('meta'):
        cap = CrossAttentionProjector(512, 768, (7, 7), (7, 7), num_heads=32)
    assert n_params(cap) == cap_parameter_formula(512, 768, (7, 7), (7, 7)) == 9_707_264  # "about 9.7M"


def test_cap_matches_the_spec_math():
    """docs/methods/ufd.md §3 written out with the module's own weights, including the extra softmax scale."""
    torch.manual_seed(4)
    cs, ct, heads, scale = 5, 12, 3, 5.0
    cap = CrossAttentionProjector(cs, ct, (3, 4), (2, 3), num_heads=heads, softmax_scale=scale, upsample=True)
    cap.eval()
    x = torch.randn(2, cs, 3, 4)
    conv, bn = cap.student_conv[0], cap.student_conv[1]
    y = F.relu(F.batch_norm(F.conv2d(x, conv.weight, conv.bias, padding=1), bn.running_mean, bn.running_var,
                            bn.weight, bn.bias, eps=bn.eps))
    y = F.interpolate(y, scale_factor=2, mode='bilinear', align_corners=False) + cap.pos_embed
    kv = y.flatten(2).transpose(1, 2)  # (2, 48, cs)
    q_map = cap.query.weight.t().reshape(ct, 2, 3)  # row r = cell (r // 3, r % 3)
    q_in = F.relu(torch.einsum('oc,chw->ohw', cap.query_conv[0].weight[:, :, 0, 0], q_map)
                  + cap.query_conv[0].bias[:, None, None]).flatten(1).t()  # (6, ct)
    q = q_in @ cap.q_proj.weight.t() + cap.q_proj.bias
    k = kv @ cap.k_proj.weight.t() + cap.k_proj.bias
    v = kv @ cap.v_proj.weight.t() + cap.v_proj.bias
    d = ct // heads
    outs = []
    for j in range(heads):
        sl = slice(j * d, (j + 1) * d)
        logits = (q[None, :, sl] @ k[:, :, sl].transpose(1, 2)) * d ** -0.5 * scale
        outs.append(logits.softmax(-1) @ v[:, :, sl])
    a = torch.cat(outs, dim=-1) @ cap.out_proj.weight.t() + cap.out_proj.bias
    a = F.layer_norm(a, (ct,), cap.norm.weight, cap.norm.bias, eps=1e-5)
    want = a + F.linear(F.relu(F.linear(a, cap.mlp[0].weight, cap.mlp[0].bias)), cap.mlp[2].weight, cap.mlp[2].bias)
    torch.testing.assert_close(cap(x), want, rtol=1e-5, atol=1e-5)


def test_cap_rows_follow_query_rows():
    """F6: output row r is the query-grid cell of table row r; nothing mixes query positions."""
    torch.manual_seed(5)
    cap = CrossAttentionProjector(4, 8, (3, 3), (2, 3), num_heads=2).eval()
    x = torch.randn(2, 4, 3, 3)
    before = cap(x)
    with torch.no_grad():
        cap.query.weight[4] += 1.0
    changed = (cap(x) - before).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, False, False, False, True, False]


def test_cap_grid_checks():
    """F8: a forward at another grid is an error (no interpolation); a pos_hw that contradicts the grid too."""
    cap = CrossAttentionProjector(4, 8, (7, 7), (7, 7), num_heads=2)
    with pytest.raises(ValueError, match='student grid'):
        cap(torch.randn(1, 4, 14, 14))
    with pytest.raises(ValueError, match='pos_hw'):
        CrossAttentionProjector(4, 8, (7, 7), (14, 14), num_heads=2, upsample=False, pos_hw=(14, 14))
    assert CrossAttentionProjector(4, 8, (7, 7), (14, 14), num_heads=2, upsample=True, pos_hw=(14, 14)).pos_hw \
        == (14, 14)
    with pytest.raises(ValueError, match='num_heads'):
        CrossAttentionProjector(4, 8, (7, 7), (7, 7), num_heads=3)


def test_cap_gradients_reach_every_parameter():
    torch.manual_seed(6)
    cap = CrossAttentionProjector(4, 8, (3, 5), (4, 2), num_heads=2, upsample=True)
    x = torch.randn(3, 4, 3, 5, requires_grad=True)
    (cap(x) * torch.randn(3, 8, 8)).sum().backward()
    for name, p in cap.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_default_heads_rule():
    assert [default_num_heads(c) for c in (768, 1536, 384, 2048, 512, 64, 24, 100)] == [12, 24, 6, 32, 8, 1, 1, 2]


# ---------------------------------------------------------------------------------------------- distiller
def build(student='test_resnet', teacher='test_convnext', *argv, input_size=(3, 64, 64), teacher_kwargs=None,
          student_kwargs=None):
    torch.manual_seed(0)
    s = timm.create_model(student, num_classes=10, **(student_kwargs or {}))
    t = timm.create_model(teacher, num_classes=10, **(teacher_kwargs or {}))
    return UFD(s, t, nn.CrossEntropyLoss(), distiller_args(*argv), input_size)


def batch(input_size=(3, 64, 64), b=4):
    g = torch.Generator().manual_seed(7)
    return torch.randn(b, *input_size, generator=g), torch.randint(0, 10, (b,), generator=g)


def test_distiller_losses_are_the_pure_functions_on_the_normalized_teacher_map():
    d = build('test_resnet', 'test_convnext', '--ufd-heads', '4')
    x, y = batch()
    logits, losses = d(x, y)
    assert set(losses) == {'loss_gt', 'loss_kd', 'loss_ufd_dc_spatial', 'loss_ufd_ac_spatial',
                           'loss_ufd_dc_channel', 'loss_ufd_ac_channel'}
    # the ConvNeXt teacher's tap is head.norm (LayerNorm2d) on the last-stage map, written out here
    t_map = d.teacher.forward_features(x)
    ln = d.teacher.head.norm
    target = F.layer_norm(t_map.permute(0, 2, 3, 1), (t_map.shape[1],), ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)
    s_map = d.student.forward_features(x)
    h, w = target.shape[-2:]
    dc_sp, ac_sp = spatial_decoupled_loss(tokens_to_map(d.proj_spatial(s_map), h, w), target)
    dc_ch, ac_ch = channel_decoupled_loss(tokens_to_map(d.proj_channel(s_map), h, w), target)
    for key, a, term in (('loss_ufd_dc_spatial', 0.03, dc_sp), ('loss_ufd_ac_spatial', 0.065, ac_sp),
                         ('loss_ufd_dc_channel', 0.003, dc_ch), ('loss_ufd_ac_channel', 0.0065, ac_ch)):
        assert losses[key].item() == pytest.approx(a * term.item(), rel=1e-5), key
    # 0.5 * CE + 0.5 * KL(p_t || p_s) at T = 1
    t_logits = d.teacher(x)
    kl = (t_logits.softmax(-1) * (t_logits.log_softmax(-1) - logits.log_softmax(-1))).sum(-1).mean()
    assert losses['loss_kd'].item() == pytest.approx(0.5 * kl.item(), rel=1e-5)
    assert losses['loss_gt'].item() == pytest.approx(0.5 * F.cross_entropy(logits, y).item(), rel=1e-5)


def logit_term(student_logits, teacher_logits, temperature):
    """0.5 * T^2 * KL(p_t || p_s) at temperature T, the logit term at its default weight, written out."""
    log_p_t, log_p_s = (z.div(temperature).log_softmax(-1) for z in (teacher_logits, student_logits))
    return 0.5 * temperature ** 2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean().item()


@pytest.mark.parametrize('argv, temperature', [((), 1.0), (('--kd-temperature', '4'), 4.0),
                                               (('--kd-temperature', '4', '--ufd-temperature', '2'), 2.0)])
def test_logit_term_temperature_is_the_own_flag_else_the_kd_temperature(argv, temperature):
    """--ufd-temperature when given; unset, --kd-temperature, the key the released ufd configs set."""
    d = build('test_resnet', 'test_convnext', '--ufd-heads', '4', *argv)
    x, y = batch()
    logits, losses = d(x, y)
    assert losses['loss_kd'].item() == pytest.approx(logit_term(logits, d.teacher(x), temperature), rel=1e-5)


def test_a_temperature_that_is_not_positive_is_refused_naming_its_flag():
    with pytest.raises(DistillerError, match='--ufd-temperature must be positive'):
        build('test_resnet', 'test_convnext', '--ufd-temperature', '0')
    with pytest.raises(DistillerError, match='--kd-temperature must be positive'):
        build('test_resnet', 'test_convnext', '--kd-temperature', '-1')


def test_no_kd_variant_and_weights_flag():
    d = build('test_resnet', 'test_convnext', '--kd-loss-weight', '0', '--ufd-alpha', '1', '2', '3', '4')
    x, y = batch()
    logits, losses = d(x, y)
    assert 'loss_kd' not in losses
    assert losses['loss_gt'].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert d.weights == [1.0, 2.0, 3.0, 4.0]


def test_gradients_reach_projectors_and_student_not_teacher():
    d = build('test_resnet', 'test_convnext', '--ufd-heads', '4')
    x, y = batch()
    _, losses = d(x, y)
    sum(losses.values()).backward()
    for name, p in d.named_parameters():
        assert p.grad is not None, name
        if not name.startswith('student.'):
            assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in d.teacher.parameters())


@pytest.mark.parametrize('branch,other', [('spatial', 'channel'), ('channel', 'spatial')])
def test_gradient_routing(branch, other):
    """F7: each projector gets gradient from its own two terms only."""
    d = build('test_resnet', 'test_convnext', '--ufd-heads', '4')
    x, y = batch()
    _, losses = d(x, y)
    (losses[f'loss_ufd_dc_{branch}'] + losses[f'loss_ufd_ac_{branch}']).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(d, f'proj_{branch}').parameters())
    assert all(p.grad is None for p in getattr(d, f'proj_{other}').parameters())


def test_teacher_stays_frozen_and_in_eval_mode():
    d = build('test_resnet', 'test_resnet')
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    opt = torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    d.train()
    assert not d.teacher.training
    for _ in range(2):
        x, y = batch()
        _, losses = d(x, y)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    after = d.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert not any(k.startswith('teacher') for k in d.state_dict())


@pytest.mark.parametrize('mode,pos_hw', [('auto', (4, 4)), ('off', (2, 2)), ('on', (4, 4))])
def test_upsample_mode(mode, pos_hw):
    """test_resnet at 64 px has a 2x2 last stage, the ViT teacher a 4x4 one: auto upsamples."""
    d = build('test_resnet', 'test_vit', '--ufd-upsample', mode, teacher_kwargs={'img_size': 64})
    assert d.proj_spatial.pos_hw == pos_hw and d.proj_channel.pos_hw == pos_hw
    assert d.proj_spatial.query_hw == (4, 4)
    x, y = batch()
    _, losses = d(x, y)
    assert all(torch.isfinite(v) for v in losses.values())


def test_non_square_input_and_softmax_scale_broadcast():
    d = build('test_resnet', 'test_convnext', '--ufd-softmax-scale', '3', '--ufd-heads', '2',
              input_size=(3, 64, 96))
    assert d.teacher_grid == (2, 3) and d.proj_channel.query_hw == (2, 3)
    assert d.proj_spatial.attn_scale == d.proj_channel.attn_scale == pytest.approx(32 ** -0.5 * 3)
    x, y = batch((3, 64, 96))
    _, losses = d(x, y)
    # untrained projections against the teacher: each term near 2 * a * (H*W or C); loose, only the scale
    assert 0 < losses['loss_ufd_ac_spatial'].item() < 4 * 0.065 * 6


def test_head_norm_rule():
    x = torch.randn(2, 64, 3, 5)
    vit_avg = timm.create_model('test_vit', num_classes=10, global_pool='avg')  # fc_norm after pooling
    ln = vit_avg.fc_norm
    want = F.layer_norm(x.permute(0, 2, 3, 1), (64,), ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(head_norm_on_map(vit_avg)(x), want)
    vit_token = timm.create_model('test_vit', num_classes=10)  # forward_features already normalized
    assert head_norm_on_map(vit_token)(x) is x


def test_pairs_that_cannot_work_are_refused():
    with pytest.raises(DistillerError, match='heads'):
        build('test_resnet', 'test_convnext', '--ufd-heads', '5')
    with pytest.raises(DistillerError, match='final feature map'):
        UFD(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), timm.create_model('test_resnet'),
            nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))


def test_cap_pos_embed_decay_follows_the_student():
    d = build('test_vit', 'test_convnext', student_kwargs={'img_size': 64})
    assert {'proj_spatial.pos_embed', 'proj_channel.pos_embed', 'student.pos_embed'} <= d.no_weight_decay()
    assert not any('pos_embed' in n for n in build().no_weight_decay())


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_train_ufd_one_epoch(tmp_path):
    proc, run = run_train(tmp_path, '--model', 'test_resnet', '--teacher', 'test_resnet', '--distiller', 'ufd',
                          '--epochs', '1', '--ufd-heads', '4')
    rows = read_summary(run)
    assert len(rows) == 1
    for term in ('dc_spatial', 'ac_spatial', 'dc_channel', 'ac_channel'):
        assert math.isfinite(float(rows[0][f'train_loss_ufd_{term}']))
    assert math.isfinite(float(rows[0]['train_loss_kd']))
    ckpt = torch.load(run / 'checkpoint' / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert any(k.startswith('proj_spatial.') for k in ckpt['distiller_state'])
    assert not any(k.startswith('teacher') for k in ckpt['state_dict'])
