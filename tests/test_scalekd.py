"""ScaleKD (docs/methods/scalekd.md): the two feature views, the projector chain through the frozen teacher's last stage
(TPP), gradient routing, the frozen teacher, and the properties of §9."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from distillers.base import DistillerError
from distillers.scalekd import ScaleKD, TeacherLastStage, dfm_frequency_loss, dfm_spatial_loss
from distillers.cap import CrossAttentionProjector
from distillers.ufd import spatial_decoupled_loss
from models.features import FeatureAdapter, FeatureRequest
from tests.helpers import distiller_args, read_summary, run_train
from tests.test_ufd import DCTOracle, cap_parameter_formula, logit_term, n_params

torch.set_num_threads(1)
INPUT = (3, 64, 64)


def small_swin(**kwargs):
    # 64 px, patch 4: stages at 16, 8, 4, 2 cells; stage 3 is 64 wide at 4x4, the final map 128 wide at 2x2
    return timm.create_model('swin_tiny_patch4_window7_224', num_classes=10, img_size=64, window_size=2,
                             embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), **kwargs)


def model(name, **kwargs):
    if name == 'swin':
        return small_swin(**kwargs)
    if name.startswith('test_vit'):
        kwargs.setdefault('img_size', 64)
    return timm.create_model(name, num_classes=10, **kwargs)


def build(student='test_resnet', teacher='swin', *argv, input_size=INPUT, teacher_kwargs=None):
    torch.manual_seed(0)
    return ScaleKD(model(student), model(teacher, **(teacher_kwargs or {})), nn.CrossEntropyLoss(),
                   distiller_args(*argv), input_size)


def batch(input_size=INPUT, b=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, *input_size, generator=g), torch.randint(0, 10, (b,), generator=g)


# ---------------------------------------------------------------------------------------------- loss math
def test_spatial_view_is_two_minus_two_cos():
    """S3."""
    g = torch.Generator().manual_seed(2)
    b, c, h, w = 3, 10, 3, 4
    s, t = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    want = (2 - 2 * F.cosine_similarity(s, t, dim=1)).sum() / b
    assert dfm_spatial_loss(s, t).item() == pytest.approx(want.item(), rel=1e-5)
    scale = torch.rand(b, 1, h, w, generator=g) + 0.1  # positive per-position scale
    assert dfm_spatial_loss(t * scale, t).item() == pytest.approx(0.0, abs=1e-5)
    assert dfm_spatial_loss(-t, t).item() == pytest.approx(4 * h * w, rel=1e-6)  # the per-sample maximum


@pytest.mark.parametrize('c,h,w', [(8, 4, 4), (6, 3, 5)])
def test_frequency_view_matches_dct_oracle_and_ignores_channel_means(c, h, w):
    """S4, and it is UFD's spatial AC term."""
    g = torch.Generator().manual_seed(c + h)
    s, t = torch.randn(2, c, h, w, generator=g), torch.randn(2, c, h, w, generator=g) + 0.5
    got = dfm_frequency_loss(s, t)
    _, want = DCTOracle(c, h, w, dtype=torch.float64).spatial(s.double(), t.double())
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert got.item() == pytest.approx(spatial_decoupled_loss(s, t)[1].item(), rel=1e-6)
    shift = torch.randn(2, c, 1, 1, generator=g) * 2
    assert dfm_frequency_loss(s + shift, t).item() == pytest.approx(got.item(), rel=1e-5)
    assert dfm_frequency_loss(s, t - shift).item() == pytest.approx(got.item(), rel=1e-5)
    assert dfm_spatial_loss(s + shift, t).item() != pytest.approx(dfm_spatial_loss(s, t).item(), rel=1e-3)


@pytest.mark.parametrize('h,w', [(2, 2), (7, 7), (3, 5)])
def test_frequency_view_of_a_spatially_constant_map_is_exact_and_passes_no_gradient(h, w):
    """A map constant over space (exactly, or up to rounding) has AC part 0: each position then scores
    ||0 - n_C(T_ac)||^2 = 1 (docs/methods/ufd.md F5), so the unweighted loss is H*W, and the student gets no gradient.
    Normalizing the rounding residue instead gave gradients of 1e5-1e12 (d n(v)/dv ~ 1/||v||), which froze AdamW
    in the small-scale results runs."""
    g = torch.Generator().manual_seed(h * w)
    b, c = 3, 32
    teacher = torch.randn(b, c, h, w, generator=g)
    column = torch.randn(b, c, 1, 1, generator=g) * 5
    for student in (column.expand(b, c, h, w).clone(),  # exactly constant
                    column * (1 + 1e-7 * torch.randn(b, c, h, w, generator=g))):  # constant up to rounding
        student.requires_grad_(True)
        loss = dfm_frequency_loss(student, teacher)
        assert loss.item() == pytest.approx(h * w, rel=1e-6)
        loss.backward()
        assert torch.count_nonzero(student.grad) == 0
    # a small but real AC part is kept: the loss is then the plain formula, with a finite gradient
    student = (column + 1e-3 * torch.randn(b, c, h, w, generator=g)).requires_grad_(True)
    loss = dfm_frequency_loss(student, teacher)
    plain = (2 - 2 * F.cosine_similarity(student - student.mean(dim=(2, 3), keepdim=True),
                                         teacher - teacher.mean(dim=(2, 3), keepdim=True), dim=1)).sum() / b
    assert loss.item() == pytest.approx(plain.item(), rel=1e-4)
    loss.backward()
    assert 0 < student.grad.abs().max() < 1e4


def test_start_of_training_scale():
    """S7: random projections at 7x7, cos ~ 0: 0.08 * 2 * 49 = 7.84 and 0.06 * 2 * 49 = 5.88."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(16, 384, 7, 7, generator=g), torch.randn(16, 384, 7, 7, generator=g)
    assert 0.08 * dfm_spatial_loss(s, t).item() == pytest.approx(7.84, rel=0.02)
    assert 0.06 * dfm_frequency_loss(s, t).item() == pytest.approx(5.88, rel=0.02)


# ---------------------------------------------------------------------------------------------- projector
def test_external_query_projector():
    """S1: with an external query, the output follows it and no table is allocated."""
    cap = CrossAttentionProjector(6, 16, (4, 4), (2, 3), num_heads=4, learned_query=False)
    assert cap.query is None
    assert n_params(cap) == cap_parameter_formula(6, 16, (4, 4))
    out = cap(torch.randn(2, 6, 4, 4), torch.randn(2, 6, 16))
    assert out.shape == (2, 6, 16)
    with pytest.raises(ValueError, match='external query'):
        cap(torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match='external query'):
        cap(torch.randn(2, 6, 4, 4), torch.randn(2, 4, 16))


def test_parameter_counts_of_the_published_pairs():
    """S2, docs/methods/scalekd.md §7: both CAPs of a stage; no table at stage 4."""
    with torch.device('meta'):
        s3 = CrossAttentionProjector(1024, 768, (14, 14), (14, 14), num_heads=16)
        s4 = CrossAttentionProjector(2048, 1536, (7, 7), (7, 7), num_heads=24, learned_query=False)
        deit_s4 = CrossAttentionProjector(768, 1536, (14, 14), (7, 7), num_heads=8, learned_query=False)
    assert 2 * n_params(s3) == 35_723_264  # Swin-L -> ResNet-50, stage 3
    assert round(2 * n_params(s4) / 1e4) == 14023  # 140.23 M
    assert round(2 * n_params(deit_s4) / 1e4) == 6758  # Swin-L -> DeiT-B, 14x14 -> 7x7: 67.58 M


# ---------------------------------------------------------------------------------------------- teacher stage
@pytest.mark.parametrize('teacher', ['swin', 'test_convnext', 'test_resnet', 'test_vit'])
def test_teacher_last_stage_reproduces_the_teachers_own_final_map(teacher):
    """Fed the teacher's own stage-3 map (and prefix tokens), the TPP path gives exactly its normalized final map."""
    torch.manual_seed(4)
    t = model(teacher).eval()
    adapter = FeatureAdapter(t, INPUT)
    stage = TeacherLastStage(t, adapter)
    x, _ = batch()
    with torch.no_grad():
        f = adapter(x, FeatureRequest(stages=(-2,), final=True, prefix_tokens=True))
        got = stage(f.stages[-2], f.prefix.get(-2))
        features = t.forward_features(x)
    assert tuple(stage.input_tap.grid) == tuple(f.stages[-2].shape[-2:])
    if teacher == 'swin':  # NHWC after the final norm
        want = features.permute(0, 3, 1, 2)
    elif teacher == 'test_convnext':  # the head's LayerNorm2d on the map
        ln = t.head.norm
        want = F.layer_norm(features.permute(0, 2, 3, 1), (features.shape[1],), ln.weight, ln.bias,
                            ln.eps).permute(0, 3, 1, 2)
    elif teacher == 'test_resnet':  # raw layer4
        want = features
    else:  # patch tokens after the final norm, class token dropped
        want = features[:, t.num_prefix_tokens:].transpose(1, 2).reshape(got.shape)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unsupported_teacher_family():
    with pytest.raises(DistillerError, match='Swin, ConvNeXt, ResNet, ViT'):
        build('test_resnet', 'test_efficientnet')
    d = build('test_resnet', 'test_efficientnet', '--scalekd-stages', '4')
    assert len(d.stage3) == 0 and all(cap.query is not None for cap in d.stage4.values())
    x, y = batch()
    _, losses = d(x, y)
    assert set(losses) == {'loss_gt', 'loss_kd', 'loss_s4', 'loss_s4_alt'}


def test_scalekd_temperature_wins_over_the_kd_temperature():
    """The resolution is FinalMapDistiller's, tested with UFD in test_ufd.py; here, that ScaleKD's flag reaches it."""
    d = build('test_resnet', 'test_resnet', '--scalekd-stages', '4', '--kd-temperature', '3',
              '--scalekd-temperature', '2')
    logits, losses = d(*batch())
    assert losses['loss_kd'].item() == pytest.approx(logit_term(logits, d.teacher(batch()[0]), 2.0), rel=1e-5)


# ---------------------------------------------------------------------------------------------- distiller
def test_losses_follow_the_chain_through_the_teachers_layer4():
    """The whole chain written out for a ResNet teacher, whose last stage is `layer4` (no final norm)."""
    d = build('test_resnet', 'test_resnet')
    assert set(d.stage3) == set(d.stage4) == {'spatial', 'frequency'}
    assert all(cap.query is None for cap in d.stage4.values()) and all(cap.query is not None for cap in d.stage3.values())
    x, y = batch()
    logits, losses = d(x, y)
    assert set(losses) == {'loss_gt', 'loss_kd', 'loss_s3', 'loss_s3_alt', 'loss_s4', 'loss_s4_alt'}
    student, teacher = d.student, d.teacher
    target = teacher.forward_features(x)
    s3 = student.layer3(student.layer2(student.layer1(student.maxpool(student.act1(student.bn1(student.conv1(x)))))))
    s4 = student.layer4(s3)
    h3, w3 = s3.shape[-2:]  # the teacher is the same architecture, so its layer3 grid is the student's
    for view, fn, suffix, weight3, weight4 in (('spatial', dfm_spatial_loss, '', 0.08, 0.08),
                                               ('frequency', dfm_frequency_loss, '_alt', 0.06, 0.06)):
        u = d.stage3[view](s3)
        v_map = teacher.layer4(u.transpose(1, 2).reshape(u.shape[0], -1, h3, w3))
        query = v_map.flatten(2).transpose(1, 2)
        out = d.stage4[view](s4, query)
        w_map = out.transpose(1, 2).reshape(target.shape)
        assert losses[f'loss_s3{suffix}'].item() == pytest.approx(weight3 * fn(v_map, target).item(), rel=1e-5)
        assert losses[f'loss_s4{suffix}'].item() == pytest.approx(weight4 * fn(w_map, target).item(), rel=1e-5)
    assert losses['loss_gt'].item() == pytest.approx(0.5 * F.cross_entropy(logits, y).item(), rel=1e-5)


def test_gradient_flows_through_the_frozen_teacher_into_the_projector():
    """S5: the stage-3 projector learns through the teacher's last stage; the teacher gets no .grad and no change."""
    d = build('test_resnet', 'swin')
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    opt = torch.optim.AdamW(d.parameters(), lr=1e-2, weight_decay=0.05)
    x, y = batch()
    _, losses = d(x, y)
    losses['loss_s3'].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.stage3['spatial'].parameters())
    assert all(p.grad is None for p in d.stage3['frequency'].parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(not p.requires_grad for p in d.teacher.parameters())
    opt.zero_grad()
    _, losses = d(x, y)
    sum(losses.values()).backward()
    for name, p in d.named_parameters():
        assert p.grad is not None, name
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in d.teacher.state_dict().items())
    assert all(p.grad is None for p in d.teacher.parameters())


def test_collapsed_stage4_frequency_projector_leaves_the_student_alone():
    """A stage-4 frequency CAP whose queries are all alike (here: q_proj zeroed, so every query attends to the
    student positions alike) outputs one vector at every position, as the saturated CAPs of the small-scale
    results runs did. loss_s4_alt is then weight * H*W per sample, and neither the student nor the projectors
    get gradient from it; before the rounding-level AC vectors were zeroed, the student's gradient was ~1e9."""
    d = build('test_resnet', 'test_resnet')
    cap = d.stage4['frequency']
    with torch.no_grad():
        cap.q_proj.weight.zero_()
        cap.q_proj.bias.zero_()
    x, y = batch()
    _, losses = d(x, y)
    h, w = d.teacher_grid
    assert losses['loss_s4_alt'].item() == pytest.approx(0.06 * h * w, rel=1e-6)
    losses['loss_s4_alt'].backward()
    grads = [p.grad for p in d.student.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(gr) == 0 for gr in grads)


@pytest.mark.parametrize('key,reached,untouched', [('loss_s4', 'spatial', 'frequency'),
                                                   ('loss_s4_alt', 'frequency', 'spatial')])
def test_stage4_terms_reach_their_own_stage3_chain(key, reached, untouched):
    """S6."""
    d = build('test_resnet', 'swin')
    x, y = batch()
    _, losses = d(x, y)
    losses[key].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.stage3[reached].parameters())
    assert all(p.grad is None for p in d.stage3[untouched].parameters())


def test_zero_stage3_weights_still_train_stage3_through_the_queries():
    """S5: with both stage-3 weights 0 the stage-3 projectors stay, as query makers, and get gradient."""
    d = build('test_resnet', 'swin', '--scalekd-spatial-weight', '0', '0.08', '--scalekd-freq-weight', '0', '0.06')
    x, y = batch()
    _, losses = d(x, y)
    assert set(losses) == {'loss_gt', 'loss_kd', 'loss_s4', 'loss_s4_alt'}
    (losses['loss_s4'] + losses['loss_s4_alt']).backward()
    for view in ('spatial', 'frequency'):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.stage3[view].parameters())
    # (timm zero-initializes each block's last BN, so look at the stage as a whole)
    assert sum(p.grad.abs().sum() for p in d.student.layer3.parameters()) > 0


def test_zero_weight_view_has_no_projector():
    """The Swin-S -> R50 recipe (stage-4 frequency weight 0, no KD): no dead parameters, no loss_kd."""
    d = build('test_resnet', 'swin', '--scalekd-freq-weight', '0.06', '0', '--kd-loss-weight', '0')
    assert set(d.stage3) == {'spatial', 'frequency'} and set(d.stage4) == {'spatial'}
    x, y = batch()
    logits, losses = d(x, y)
    assert set(losses) == {'loss_gt', 'loss_s3', 'loss_s3_alt', 'loss_s4'}
    assert losses['loss_gt'].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.parameters())


def test_teacher_mode():
    """S8: eval teacher targets are repeatable; --teacher-train-mode with drop-path makes them vary."""
    x, _ = batch()
    d = build('test_resnet', 'swin', teacher_kwargs={'drop_path_rate': 0.5})
    d.train()
    assert not d.teacher.training
    torch.testing.assert_close(d.teacher_forward(x).logits, d.teacher_forward(x).logits, rtol=0, atol=0)
    d = build('test_resnet', 'swin', '--teacher-train-mode', teacher_kwargs={'drop_path_rate': 0.5})
    d.train()
    assert d.teacher.training
    assert not torch.equal(d.teacher_forward(x).logits, d.teacher_forward(x).logits)


def test_plain_token_student_and_convnext_student():
    d = build('test_vit', 'swin')  # 6 blocks: stage 3 ends the third quarter, block index 3
    assert d.student_block3 == 3 and d.stage3['spatial'].student_hw == (4, 4)
    assert isinstance(d.stage3['spatial'].student_conv[1], nn.BatchNorm2d)
    d = build('test_convnext', 'test_vit')
    assert isinstance(d.stage3['spatial'].student_conv[1], LayerNorm2d)
    x, y = batch()
    _, losses = d(x, y)
    assert all(torch.isfinite(v) for v in losses.values())


def test_non_square_input():
    d = build('test_resnet', 'test_convnext', input_size=(3, 64, 96))
    assert d.teacher_grid == (2, 3) and d.stage3['spatial'].query_hw == (4, 6)
    x, y = batch((3, 64, 96))
    _, losses = d(x, y)
    assert all(torch.isfinite(v) for v in losses.values())


def test_flags():
    d = build('test_resnet', 'swin', '--scalekd-spatial-weight', '0.1', '0.2', '--scalekd-softmax-scale', '3',
              '--scalekd-heads', '4', '8')
    assert d.weights == {3: {'spatial': 0.1, 'frequency': 0.06}, 4: {'spatial': 0.2, 'frequency': 0.06}}
    assert d.stage3['frequency'].num_heads == 4 and d.stage4['spatial'].num_heads == 8
    assert d.stage3['frequency'].attn_scale == pytest.approx((64 / 4) ** -0.5 * 3)
    assert d.gt_loss_weight == 0.5 and d.kd_loss_weight == 0.5
    with pytest.raises(DistillerError, match='stages'):
        build('test_resnet', 'swin', '--scalekd-stages', '2', '4')
    with pytest.raises(DistillerError, match='spatial-weight'):
        build('test_resnet', 'swin', '--scalekd-spatial-weight', '0.1', '0.2', '0.3')
    with pytest.raises(DistillerError, match='heads'):
        build('test_resnet', 'swin', '--scalekd-heads', '3')
    with pytest.raises(DistillerError, match='zero'):
        build('test_resnet', 'swin', '--scalekd-spatial-weight', '0', '--scalekd-freq-weight', '0')


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_train_scalekd_one_epoch(tmp_path):
    proc, run = run_train(tmp_path, '--model', 'test_resnet', '--teacher', 'test_resnet',
                          '--distiller', 'scalekd', '--epochs', '1', '--scalekd-heads', '4')
    rows = read_summary(run)
    assert len(rows) == 1
    for key in ('loss_s3', 'loss_s3_alt', 'loss_s4', 'loss_s4_alt', 'loss_kd', 'loss_gt'):
        assert math.isfinite(float(rows[0][f'train_{key}']))
    ckpt = torch.load(run / 'checkpoint' / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert any(k.startswith('stage3.spatial.') for k in ckpt['distiller_state'])


@pytest.mark.parametrize('teacher', ['resnet20', 'wrn_16_2', 'vgg8_cifar'])
def test_teacher_last_stage_of_the_cifar_models(teacher):
    """The CIFAR ResNets, WRNs and VGGs of models/cifar.py: their last stage, fed their own map before it, gives their
    final map (for a WRN after its final BN + ReLU)."""
    import models  # noqa: F401  (registers the CIFAR models)
    torch.manual_seed(4)
    t = timm.create_model(teacher, num_classes=10).eval()
    adapter = FeatureAdapter(t, (3, 32, 32))
    stage = TeacherLastStage(t, adapter)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = stage(adapter(x, FeatureRequest(stages=(-2,))).stages[-2])
        want = t.forward_features(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
