"""FitNet, MGD, SRRL, ViTKD (+ NKD): hand-worked values of the pure losses, the properties of
docs/methods/feature.md (M1-M5, S1-S5, V1-V6) and docs/methods/others.md §6, projector shapes over a matrix of
student/teacher pairs at two input sizes, and one training epoch of each through train.py."""
import copy
import functools
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from distillers import DISTILLERS, DistillerError
from distillers.fitnet import fitnet_loss
from distillers.kernels.squared_error import squared_error_sum
from distillers.mgd import mgd_loss
from distillers.nkd import nkd_loss
from distillers.srrl import srrl_loss
from distillers.vitkd import random_token_mask, vitkd_generation_loss, vitkd_mimic_loss
from models.features import Features

from .helpers import REPO, distiller_args, read_summary, run_train

NUM_CLASSES = 10
# a small DeiT III (the ViTKD teachers' family): 8 blocks so that the four stages are distinct blocks
VIT_TEACHER = 'deit3_small_patch16_224'
VIT_TEACHER_KWARGS = dict(embed_dim=128, num_heads=2, depth=8)
TOKEN_MODELS = ('deit', 'swin', 'mixer', 'vit')

# stage widths (1..4) of each model, from the architectures' definitions; the last is also the final map's width
STAGE_CHANNELS = {
    'resnet18': (64, 128, 256, 512),
    'mobilenetv2_050': (16, 16, 48, 1280),
    'deit_tiny_patch16_224': (192, 192, 192, 192),
    'swin_tiny_patch4_window7_224': (96, 192, 384, 768),
    'convnext_atto': (40, 80, 160, 320),
    'mixer_s16_224': (512, 512, 512, 512),
    VIT_TEACHER: (128, 128, 128, 128),
}
TEACHERS = {'cnn': 'resnet18', 'vit': VIT_TEACHER}
LOSS_KEYS = {
    'fitnet': {'loss_gt', 'loss_fitnet'},
    'mgd': {'loss_gt', 'loss_mgd'},
    'srrl': {'loss_gt', 'loss_srrl'},
    'vitkd': {'loss_gt', 'loss_vitkd_mimic', 'loss_vitkd_gen'},
    'vitkd_nkd': {'loss_gt', 'loss_vitkd_mimic', 'loss_vitkd_gen', 'loss_nkd'},
}
# which methods can serve each (student, teacher) pair; the others must refuse with their reason.
# CNNs, Swin and ConvNeXt end at stride 32, plain token models at stride 16; the ViT head reads a class token.
BUILDS = {
    ('resnet18', 'cnn'): {'fitnet', 'mgd', 'srrl'},
    ('mobilenetv2_050', 'cnn'): {'fitnet', 'mgd', 'srrl'},
    ('deit_tiny_patch16_224', 'cnn'): {'fitnet', 'srrl'},
    ('swin_tiny_patch4_window7_224', 'cnn'): {'fitnet', 'mgd', 'srrl'},
    ('convnext_atto', 'cnn'): {'fitnet', 'mgd', 'srrl'},
    ('mixer_s16_224', 'cnn'): {'fitnet', 'srrl'},
    ('resnet18', 'vit'): {'fitnet'},
    ('mobilenetv2_050', 'vit'): {'fitnet'},
    ('deit_tiny_patch16_224', 'vit'): {'fitnet', 'mgd', 'vitkd'},
    ('swin_tiny_patch4_window7_224', 'vit'): {'fitnet'},
    ('convnext_atto', 'vit'): {'fitnet'},
    ('mixer_s16_224', 'vit'): {'fitnet', 'mgd', 'vitkd'},
}
# at 224 px the forward+backward pass runs for the ImageNet-like pairs (the rest of the matrix at 64 px keeps the
# file fast); every pair is built at both sizes
TRAINED_AT_224 = {('resnet18', 'cnn'), ('deit_tiny_patch16_224', 'vit')}
REFUSALS = {
    'mgd': 'student map is .* and the teacher map',
    'srrl': r'prefix \(class\) token',
    'vitkd': 'is hierarchical; block taps need a plain token model',
}


def create(name, size, **kwargs):
    if name.startswith(TOKEN_MODELS):
        kwargs['img_size'] = size
    if name == VIT_TEACHER:
        kwargs = {**VIT_TEACHER_KWARGS, **kwargs}
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


@functools.lru_cache(maxsize=None)
def cached(name, size, role):
    """One model per (name, size, role): a teacher gets frozen by the distiller, so it is never reused as a student."""
    return create(name, size)


def build(method, student, teacher, size, **overrides):
    return DISTILLERS[method](student, teacher, nn.CrossEntropyLoss(), distiller_args(**overrides), (3, size, size))


def images(batch, size, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def own_parameters(distiller):
    return [(n, p) for n, p in distiller.named_parameters() if not n.startswith('student.')]


def train_step(distiller, size, method):
    """Forward + backward + one SGD step; checks the loss terms, where gradient goes, and a bit-identical teacher."""
    teacher = distiller.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller.train()
    distiller.zero_grad(set_to_none=True)
    logits, losses = distiller(images(2, size), torch.tensor([1, 3]))
    assert logits.shape == (2, NUM_CLASSES)
    assert set(losses) == LOSS_KEYS[method]
    for name, value in losses.items():
        assert value.ndim == 0 and value.dtype == torch.float32 and torch.isfinite(value), name
    sum(losses.values()).backward()
    for name, p in own_parameters(distiller):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.1).step()
    assert teacher.training is False
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def check_projectors(method, distiller, student_name, teacher_name):
    cs, ct = STAGE_CHANNELS[student_name], STAGE_CHANNELS[teacher_name]
    if method == 'fitnet':
        for s in (1, 2, 3, 4):
            regressor = distiller.regressors[f'stage{s}']
            assert regressor.weight.shape == (ct[s - 1], cs[s - 1], 1, 1) and regressor.bias is None
    elif method == 'mgd':
        if cs[-1] == ct[-1]:
            assert isinstance(distiller.align, nn.Identity)
        else:
            assert distiller.align.weight.shape == (ct[-1], cs[-1], 1, 1)
        assert distiller.generation[0].weight.shape == distiller.generation[2].weight.shape == (ct[-1], ct[-1], 3, 3)
    elif method == 'srrl':
        assert distiller.connector[0].weight.shape == (ct[-1], cs[-1], 1, 1)
        assert distiller.connector[0].bias is None and distiller.connector[1].num_features == ct[-1]
    else:
        for align in (*distiller.align_low, distiller.align_high):
            assert align.weight.shape == (ct[-1], cs[-1]) and align.bias.shape == (ct[-1],)
        assert distiller.mask_token.shape == (1, 1, ct[-1])
        assert distiller.generation[0].weight.shape == (ct[-1], ct[-1], 3, 3)


# ================================================================== pure losses, hand-worked values
def test_fitnet_loss_values():
    student = torch.tensor([[1., 2.], [3., 4.]]).view(1, 1, 2, 2)
    # equal grids: mean of 1, 4, 9, 16
    assert fitnet_loss(student, torch.zeros(1, 1, 2, 2)).item() == pytest.approx(7.5)
    # unequal grids: the 2x2 map is pooled to 1x1 (2.5) whichever side it is on
    assert fitnet_loss(student, torch.full((1, 1, 1, 1), 2.)).item() == pytest.approx(0.25)
    assert fitnet_loss(torch.full((1, 1, 1, 1), 2.), student).item() == pytest.approx(0.25)


def test_mgd_loss_value():
    generated = torch.tensor([1., 2., 3., 4.]).view(2, 1, 1, 2)
    # (1 + 4 + 9 + 16) / B, B = 2; no division by C, H or W
    assert mgd_loss(generated, torch.zeros(2, 1, 1, 2)).item() == pytest.approx(15.0)


def test_squared_error_sum_value_and_gradients():
    student = torch.tensor([[1., 2.], [3., 4.]]).view(1, 1, 2, 2).requires_grad_()
    teacher = torch.tensor([[0., 1.], [1., 0.]]).view(1, 1, 2, 2).requires_grad_()
    value = squared_error_sum(student, teacher)
    assert value.item() == pytest.approx(1 + 1 + 4 + 16)
    (3 * value).backward()  # d/ds = 2 g (s - t), d/dt its negative
    assert student.grad.flatten().tolist() == [6., 6., 12., 24.]
    assert teacher.grad.flatten().tolist() == [-6., -6., -12., -24.]
    s64 = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    t64 = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(squared_error_sum, (s64, t64))
    with pytest.raises(ValueError, match=r'\(2, 3, 4, 5\) and \(2, 3, 4, 4\)'):
        squared_error_sum(s64, t64[..., :4])


@pytest.mark.parametrize('teacher_dtype', [torch.float32, torch.bfloat16])
def test_squared_error_sum_of_bf16_maps_is_float32_math(teacher_dtype):
    """The student's bf16 map (channels_last, as under autocast) against a float32 or bf16 teacher map: the value is
    the float32 sum of the widened maps, the student's gradient is the float32 gradient rounded once to bf16, in
    the student's layout, and a teacher that needs no gradient gets none."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 8, 5, 5, generator=g).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    teacher = torch.randn(2, 8, 5, 5, generator=g).to(teacher_dtype)
    value = squared_error_sum(student, teacher)
    widened = student.detach().float().requires_grad_()
    reference = (widened - teacher.float()).pow(2).sum()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
    (0.5 * value).backward()
    (0.5 * reference).backward()
    assert student.grad.dtype == torch.bfloat16 and student.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(student.grad, widened.grad.to(torch.bfloat16))
    assert teacher.grad is None
    # fitnet's mean and mgd's sum / B rest on it
    assert fitnet_loss(student, teacher).item() == pytest.approx(reference.item() / student.numel(), rel=1e-6)
    assert mgd_loss(student, teacher).item() == pytest.approx(reference.item() / 2, rel=1e-6)


@pytest.mark.parametrize('shape, channels_last', [((8, 64, 56, 56), True), ((8, 64, 56, 56), False),
                                                   ((4, 196, 768), False), ((3_000_000,), False)])
def test_squared_error_sum_is_accurate_on_large_maps(shape, channels_last):
    """Float32 rounding, not accumulation error: one vector_norm over millions of elements drifts by 1e-4 on the
    CPU (1e-2 at FitNet's 100M)."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(*shape, generator=g).to(torch.bfloat16)
    teacher = torch.randn(*shape, generator=g)
    if channels_last:
        student = student.contiguous(memory_format=torch.channels_last)
    exact = (student.double() - teacher.double()).pow(2).sum().item()
    assert squared_error_sum(student, teacher).item() == pytest.approx(exact, rel=2e-6)


def test_srrl_loss_value_and_zero_at_equality():
    student_pooled = torch.tensor([[1., 2.]])
    teacher_pooled = torch.zeros(1, 2)
    through_teacher = torch.tensor([[1., 1., 1.]])
    teacher_logits = torch.tensor([[0., 0., 3.]])
    # L_FM = (1 + 4) / 2 = 2.5, L_SR = (1 + 1 + 4) / 3 = 2; 2 * 2.5 + 3 * 2 = 11
    value = srrl_loss(student_pooled, teacher_pooled, through_teacher, teacher_logits, 2.0, 3.0)
    assert value.item() == pytest.approx(11.0)
    # S1
    assert srrl_loss(teacher_pooled, teacher_pooled, teacher_logits, teacher_logits, 1.0, 5.0).item() == 0.0


def test_vitkd_loss_values():
    # mimicking: (B=2, L=2, N=1, D=1) of ones against zeros -> 4 / 2
    assert vitkd_mimic_loss(torch.ones(2, 2, 1, 1), torch.zeros(2, 2, 1, 1)).item() == pytest.approx(2.0)
    low = torch.randn(2, 2, 5, 3)
    assert vitkd_mimic_loss(low, low.clone()).item() == 0.0  # V2
    generated = torch.tensor([[[1., 1.], [2., 2.]]])  # (B=1, N=2, D=2)
    target = torch.zeros(1, 2, 2)
    assert vitkd_generation_loss(generated, target, torch.tensor([[1., 0.]])).item() == pytest.approx(2.0)
    assert vitkd_generation_loss(generated, target, torch.tensor([[0., 1.]])).item() == pytest.approx(8.0)
    assert vitkd_generation_loss(generated, target, torch.tensor([[1., 1.]])).item() == pytest.approx(10.0)


def test_vitkd_generation_ignores_teacher_at_kept_tokens():
    # V3
    generated, target = torch.randn(3, 16, 8), torch.randn(3, 16, 8)
    mask = random_token_mask(3, 16, 0.5)
    value = vitkd_generation_loss(generated, target, mask)
    kept_perturbed = target + (1 - mask).unsqueeze(-1) * torch.randn(3, 16, 8)
    assert torch.equal(vitkd_generation_loss(generated, kept_perturbed, mask), value)
    masked_perturbed = target + mask.unsqueeze(-1) * torch.randn(3, 16, 8)
    assert not torch.allclose(vitkd_generation_loss(generated, masked_perturbed, mask), value)


# ================================================================== the pair matrix
@pytest.mark.parametrize('size', [224, 64])
@pytest.mark.parametrize('teacher_kind', ['cnn', 'vit'])
@pytest.mark.parametrize('student_name', ['resnet18', 'mobilenetv2_050', 'deit_tiny_patch16_224',
                                          'swin_tiny_patch4_window7_224', 'convnext_atto', 'mixer_s16_224'])
@pytest.mark.parametrize('method', ['fitnet', 'mgd', 'srrl', 'vitkd'])
def test_pair_matrix(method, student_name, teacher_kind, size):
    teacher_name = TEACHERS[teacher_kind]
    student = cached(student_name, size, 'student')
    teacher = cached(teacher_name, size, 'teacher')
    if method not in BUILDS[(student_name, teacher_kind)]:
        with pytest.raises(DistillerError, match=REFUSALS[method]):
            build(method, student, teacher, size)
        return
    distiller = build(method, student, teacher, size)
    check_projectors(method, distiller, student_name, teacher_name)
    if size != 224 or (student_name, teacher_kind) in TRAINED_AT_224:
        train_step(distiller, size, method)


# ================================================================== FitNet (docs/methods/others.md §6)
def test_fitnet_stage_flag_and_regressor_init():
    student, teacher = cached('resnet18', 64, 'student'), cached('resnet18', 64, 'teacher')
    distiller = build('fitnet', student, teacher, 64, fitnet_stage=[2, 4])
    assert sorted(distiller.regressors) == ['stage2', 'stage4']
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (512 * 1 * 1))
    assert distiller.regressors['stage4'].weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    train_step(distiller, 64, 'fitnet')
    with pytest.raises(DistillerError, match='stage 5 does not exist'):
        build('fitnet', student, teacher, 64, fitnet_stage=[5])


def test_fitnet_pools_the_larger_grid():
    # ViT teacher (4x4 at 64 px) -> ResNet-18: stage 1 (16x16) is regressed, then pooled to 4x4
    student, teacher = cached('resnet18', 64, 'student'), cached(VIT_TEACHER, 64, 'teacher')
    distiller = build('fitnet', student, teacher, 64, fitnet_stage=[1], fitnet_loss_weight=3.0).eval()
    x = images(2, 64)
    _, losses = distiller(x, torch.tensor([0, 1]))
    with torch.no_grad():
        regressed = distiller.regressors['stage1'](student.layer1(student.maxpool(student.act1(student.bn1(
            student.conv1(x))))))
        teacher_tokens = teacher.blocks[1](teacher.blocks[0](teacher._pos_embed(teacher.patch_embed(x))))
        teacher_map = teacher_tokens[:, 1:].transpose(1, 2).reshape(2, 128, 4, 4)
        pooled = regressed.view(2, 128, 4, 4, 4, 4).mean(dim=(3, 5))
    assert losses['loss_fitnet'].item() == pytest.approx(3.0 * F.mse_loss(pooled, teacher_map).item(), rel=1e-4)


# ================================================================== MGD (docs/methods/feature.md §1)
def test_mgd_mask_drops_about_lambda_of_whole_channels():
    student, teacher = cached('resnet18', 64, 'student'), cached('resnet18', 64, 'teacher')
    distiller = build('mgd', student, teacher, 64)
    mask = distiller.draw_mask(64, torch.device('cpu'))
    assert mask.shape == (64, 512, 1, 1)  # M1: one value per sample and channel, broadcast over H and W
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask == 0).float().mean().item() == pytest.approx(0.15, abs=0.01)
    assert not torch.equal(mask, distiller.draw_mask(64, torch.device('cpu')))
    distiller.lam = 0.5
    assert (distiller.draw_mask(64, torch.device('cpu')) == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    # the generator sees the student map with whole channels zeroed at every position, the rest untouched
    seen = {}
    distiller.generation[0].register_forward_pre_hook(lambda module, inputs: seen.setdefault('x', inputs[0]))
    injected = torch.ones(2, 512, 1, 1)
    injected[0, :7] = 0
    injected[1, 100:300] = 0
    distiller.eval()
    x = images(2, 64)
    distiller(x, torch.tensor([0, 1]), mask=injected)
    with torch.no_grad():
        student_map = student.forward_features(x)
    assert seen['x'].shape == student_map.shape == (2, 512, 2, 2)
    assert torch.allclose(seen['x'], student_map * injected, rtol=0, atol=1e-6)
    assert seen['x'][0, :7].abs().sum() == 0 and seen['x'][1, 100:300].abs().sum() == 0


def test_mgd_align_only_when_widths_differ():
    # M2, and the generator's size 2 * (9 C^2 + C)
    teacher = cached('resnet18', 64, 'teacher')
    same = build('mgd', cached('resnet18', 64, 'student'), teacher, 64)
    assert isinstance(same.align, nn.Identity)
    assert sum(p.numel() for p in same.generation.parameters()) == 2 * (9 * 512 ** 2 + 512)
    wider = build('mgd', cached('mobilenetv2_050', 64, 'student'), teacher, 64)
    assert wider.align.weight.shape == (512, 1280, 1, 1) and wider.align.bias.shape == (512,)


def test_mgd_linear_in_alpha_and_invariant_to_duplicating_the_batch():
    # M3
    student, teacher = cached('resnet18', 64, 'student'), cached('resnet18', 64, 'teacher')
    distiller = build('mgd', student, teacher, 64).eval()
    x, y = images(2, 64), torch.tensor([0, 1])
    mask = distiller.draw_mask(2, torch.device('cpu'))
    base = distiller(x, y, mask=mask)[1]['loss_mgd']
    distiller.alpha *= 3
    assert distiller(x, y, mask=mask)[1]['loss_mgd'].item() == pytest.approx(3 * base.item(), rel=1e-5)
    distiller.alpha /= 3
    doubled = distiller(torch.cat([x, x]), torch.cat([y, y]), mask=torch.cat([mask, mask]))[1]['loss_mgd']
    assert doubled.item() == pytest.approx(base.item(), rel=1e-5)


def test_mgd_refuses_a_grid_mismatch():
    # M4: DeiT-T at 224 gives 14x14, ResNet-18 7x7
    with pytest.raises(DistillerError, match=r'student map is \(14, 14\) and the teacher map \(7, 7\)'):
        build('mgd', cached('deit_tiny_patch16_224', 224, 'student'), cached('resnet18', 224, 'teacher'), 224)


def test_mgd_teacher_features_carry_no_gradient():
    # M5 (align and generator gradients: train_step)
    student, teacher = cached('mobilenetv2_050', 64, 'student'), cached('resnet18', 64, 'teacher')
    distiller = build('mgd', student, teacher, 64)
    assert not distiller.teacher_forward(images(2, 64), distiller.request).final.requires_grad
    train_step(distiller, 64, 'mgd')


# ================================================================== SRRL (docs/methods/feature.md §2)
def test_srrl_gradient_reaches_connector_through_the_frozen_head():
    # S3, S4: with alpha = 0 only the path through the teacher's classifier is left
    student, teacher = cached('mobilenetv2_050', 64, 'student'), cached('resnet18', 64, 'teacher')
    distiller = build('srrl', student, teacher, 64, srrl_alpha=0.0, srrl_beta=1.0)
    fc_before = teacher.fc.weight.clone()
    distiller.zero_grad(set_to_none=True)
    x, y = images(2, 64), torch.tensor([0, 1])
    _, losses = distiller(x, y)
    losses['loss_srrl'].backward()
    assert distiller.connector[0].weight.grad.abs().sum() > 0
    assert student.conv_stem.weight.grad.abs().sum() > 0
    assert teacher.fc.weight.grad is None and teacher.fc.bias.grad is None
    torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(teacher.fc.weight, fc_before)
    # S4 and the value: the student through the teacher's pooling and FC, one row per sample
    distiller.eval()
    _, losses = distiller(x, y)
    with torch.no_grad():
        connected = distiller.connector(student.forward_features(x))
        through_teacher = teacher.fc(connected.mean(dim=(2, 3)))
        teacher_logits = teacher(x)
    assert through_teacher.shape == (2, NUM_CLASSES)
    expected = ((through_teacher - teacher_logits) ** 2).mean()
    assert losses['loss_srrl'].item() == pytest.approx(expected.item(), rel=1e-5)
    # the feature term alone: per-channel squared error of the pooled maps, mean over channels and batch
    distiller.alpha, distiller.beta = 2.0, 0.0
    with torch.no_grad():
        teacher_pooled = teacher.forward_features(x).mean(dim=(2, 3))
    expected = 2.0 * ((connected.mean(dim=(2, 3)) - teacher_pooled) ** 2).mean()
    assert distiller(x, y)[1]['loss_srrl'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_srrl_feature_term_ignores_spatial_order():
    # S2: a spatially permuted teacher map gives the same loss
    student, teacher = cached('resnet18', 64, 'student'), cached('resnet18', 64, 'teacher')
    distiller = build('srrl', student, teacher, 64).eval()
    x, y = images(2, 64), torch.tensor([0, 1])
    reference = distiller(x, y)[1]['loss_srrl']
    original = distiller.teacher_forward

    def permuted_forward(batch, request):
        out = original(batch, request)
        b, c, h, w = out.final.shape
        shuffled = out.final.flatten(2)[:, :, torch.randperm(h * w)].view(b, c, h, w)
        return Features(logits=out.logits, final=shuffled)

    distiller.teacher_forward = permuted_forward
    assert distiller(x, y)[1]['loss_srrl'].item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize('teacher_name,layout', [('mixer_s16_224', 'NLC'), ('swin_tiny_patch4_window7_224', 'NHWC')])
def test_srrl_pooling_token_teachers_and_unequal_grids(teacher_name, layout):
    # S5: ResNet-18 at 64 px ends on 2x2, the Mixer teacher on 4x4; Swin's head takes NHWC maps
    distiller = build('srrl', cached('resnet18', 64, 'student'), cached(teacher_name, 64, 'teacher'), 64)
    assert distiller.head_layout == layout
    assert distiller.connector[0].weight.shape == (STAGE_CHANNELS[teacher_name][-1], 512, 1, 1)
    train_step(distiller, 64, 'srrl')


def test_srrl_connector_init():
    # std = sqrt(2 / (k * k * C_t)) with k = 1: the teacher's width (512), not the student's (1280)
    distiller = build('srrl', cached('mobilenetv2_050', 64, 'student'), cached('resnet18', 64, 'teacher'), 64)
    conv, bn = distiller.connector[0], distiller.connector[1]
    assert conv.weight.shape == (512, 1280, 1, 1)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    assert torch.equal(bn.weight, torch.ones(512)) and torch.equal(bn.bias, torch.zeros(512))


# ================================================================== ViTKD (docs/methods/feature.md §3)
def test_vitkd_masks_exactly_n_minus_floor_tokens_per_sample():
    # V1: 98 of 196 at lambda = 0.5; 4 of 16 at 0.25
    mask = random_token_mask(6, 196, 0.5)
    assert torch.equal(mask.sum(dim=1), torch.full((6,), 98.))
    assert len({tuple(row.tolist()) for row in mask}) == 6
    assert not torch.equal(mask, random_token_mask(6, 196, 0.5))
    assert torch.equal(random_token_mask(3, 16, 0.25).sum(dim=1), torch.full((3,), 4.))
    assert torch.equal(random_token_mask(3, 10, 0.25).sum(dim=1), torch.full((3,), 3.))  # keeps floor(7.5) = 7
    distiller = build('vitkd', cached('deit_tiny_patch16_224', 64, 'student'), cached(VIT_TEACHER, 64, 'teacher'), 64)
    assert torch.equal(distiller.draw_mask(3, torch.device('cpu')).sum(dim=1), torch.full((3,), 8.))


def test_vitkd_zero_when_features_match_and_generator_is_zero():
    # V4: D_s = D_t (no aligners), the teacher a copy of the student, G zeroed, teacher's high tokens zero
    student = create('deit_tiny_patch16_224', 64, depth=3)
    teacher = copy.deepcopy(student)
    nn.init.zeros_(teacher.norm.weight)
    nn.init.zeros_(teacher.norm.bias)
    distiller = build('vitkd', student, teacher, 64).eval()
    assert all(isinstance(m, nn.Identity) for m in (*distiller.align_low, distiller.align_high))
    for p in distiller.generation.parameters():
        nn.init.zeros_(p)
    _, losses = distiller(images(2, 64), torch.tensor([0, 1]))
    assert losses['loss_vitkd_mimic'].item() == 0.0
    assert losses['loss_vitkd_gen'].item() == 0.0


def test_vitkd_token_order_survives_the_generator_reshape():
    # V5: G = identity and nothing masked gives back the aligned tokens exactly
    distiller = build('vitkd', cached('deit_tiny_patch16_224', 64, 'student'), cached(VIT_TEACHER, 64, 'teacher'), 64)
    distiller.generation = nn.Identity()
    tokens = torch.randn(2, 16, 192)
    with torch.no_grad():
        assert torch.equal(distiller.generate(tokens, torch.zeros(2, 16)), distiller.align_high(tokens))
        distiller.mask_token.copy_(torch.arange(128.).view(1, 1, 128))
        everything = distiller.generate(tokens, torch.ones(2, 16))
    assert torch.equal(everything, distiller.mask_token.detach().expand(2, 16, 128))


def test_vitkd_mask_token_gets_gradient_only_when_tokens_are_masked():
    # V6 (no teacher gradient: train_step)
    distiller = build('vitkd', cached('deit_tiny_patch16_224', 64, 'student'), cached(VIT_TEACHER, 64, 'teacher'), 64)
    x, y = images(2, 64), torch.tensor([0, 1])
    for mask, has_gradient in ((torch.zeros(2, 16), False), (distiller.draw_mask(2, torch.device('cpu')), True)):
        distiller.zero_grad(set_to_none=True)
        _, losses = distiller(x, y, mask=mask)
        losses['loss_vitkd_gen'].backward()
        assert (distiller.mask_token.grad.abs().sum().item() > 0) == has_gradient
    train_step(distiller, 64, 'vitkd')


def _patch_tokens_after(model, x, num_blocks):
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for block in model.blocks[:num_blocks]:
        tokens = block(tokens)
    return tokens[:, model.num_prefix_tokens:]


def test_vitkd_values_from_the_models_own_blocks():
    # the taps (blocks 0 and 1, normed last block, prefix dropped), the weights alpha and beta / lambda, and the
    # masked-only generation target, recomputed from the models' modules
    student, teacher = cached('deit_tiny_patch16_224', 64, 'student'), cached(VIT_TEACHER, 64, 'teacher')
    distiller = build('vitkd', student, teacher, 64, vitkd_alpha=2.0, vitkd_beta=3.0, vitkd_lambda=0.25).eval()
    x = images(2, 64)
    mask = distiller.draw_mask(2, torch.device('cpu'))
    assert torch.equal(mask.sum(dim=1), torch.full((2,), 4.))
    _, losses = distiller(x, torch.tensor([0, 1]), mask=mask)
    with torch.no_grad():
        low_s = [_patch_tokens_after(student, x, n) for n in (1, 2)]
        low_t = [_patch_tokens_after(teacher, x, n) for n in (1, 2)]
        mimic = sum(((align(s) - t) ** 2).sum() for align, s, t in zip(distiller.align_low, low_s, low_t)) / 2
        high_s = student.forward_features(x)[:, 1:]
        high_t = teacher.forward_features(x)[:, 1:]
        filled = torch.where(mask.bool().unsqueeze(-1), distiller.mask_token, distiller.align_high(high_s))
        generated = distiller.generation(filled.transpose(1, 2).reshape(2, 128, 4, 4)).flatten(2).transpose(1, 2)
        generation = (((generated - high_t) ** 2).sum(dim=-1) * mask).sum() / 2
    assert losses['loss_vitkd_mimic'].item() == pytest.approx(2.0 * mimic.item(), rel=1e-4)
    assert losses['loss_vitkd_gen'].item() == pytest.approx(3.0 / 0.25 * generation.item(), rel=1e-4)


def test_vitkd_nkd_adds_the_nkd_term():
    student, teacher = cached('mixer_s16_224', 64, 'student'), cached(VIT_TEACHER, 64, 'teacher')
    distiller = build('vitkd_nkd', student, teacher, 64, nkd_gamma=1.0, nkd_temperature=1.0, kd_loss_weight=2.0)
    distiller.eval()
    x = images(2, 64)
    hard = torch.tensor([2, 7])
    soft = F.one_hot(hard, NUM_CLASSES).float() * 0.7 + 0.03
    logits, losses = distiller(x, hard)
    expected = 2.0 * nkd_loss(logits, teacher(x), hard, 1.0, 1.0)
    assert losses['loss_nkd'].item() == pytest.approx(expected.item(), rel=1e-5)
    # soft labels: the target is their argmax
    assert distiller(x, soft)[1]['loss_nkd'].item() == pytest.approx(expected.item(), rel=1e-5)
    train_step(distiller, 64, 'vitkd_nkd')


def test_vitkd_refuses_hierarchical_models_and_unequal_patch_grids():
    with pytest.raises(DistillerError, match='vitkd: teacher ResNet is hierarchical; block taps need a plain token'):
        build('vitkd', cached('deit_tiny_patch16_224', 64, 'student'), cached('resnet18', 64, 'teacher'), 64)
    patch8 = create('deit_tiny_patch16_224', 64, patch_size=8, depth=2)
    with pytest.raises(DistillerError, match=r'student has a \(8, 8\) patch grid and the teacher a \(4, 4\)'):
        build('vitkd', patch8, cached(VIT_TEACHER, 64, 'teacher'), 64)
    with pytest.raises(DistillerError, match='vitkd-lambda'):
        build('vitkd', cached('deit_tiny_patch16_224', 64, 'student'), cached(VIT_TEACHER, 64, 'teacher'), 64,
              vitkd_lambda=0.0)


# ================================================================== end to end (train.py)
needs_train = pytest.mark.skipif(not (REPO / 'train.py').exists(), reason='train.py is not in the tree yet')

# (distiller, model, extra flags, its loss columns, distiller_state entries and their shapes)
E2E_CASES = [
    ('fitnet', 'test_resnet', ('--fitnet-stage', '1', '4'), ('loss_fitnet',),
     {'regressors.stage1.weight': (32, 32, 1, 1), 'regressors.stage4.weight': (96, 96, 1, 1)}),
    ('mgd', 'test_resnet', ('--mgd-alpha', '1e-3'), ('loss_mgd',),
     {'generation.0.weight': (96, 96, 3, 3), 'generation.2.bias': (96,)}),
    ('srrl', 'test_resnet', ('--srrl-beta', '1'), ('loss_srrl',),
     {'connector.0.weight': (96, 96, 1, 1), 'connector.1.running_var': (96,)}),
    ('vitkd', 'test_vit', (), ('loss_vitkd_mimic', 'loss_vitkd_gen'),
     {'mask_token': (1, 1, 64), 'generation.0.weight': (64, 64, 3, 3)}),
    ('vitkd_nkd', 'test_vit', ('--nkd-gamma', '1.0'), ('loss_vitkd_mimic', 'loss_vitkd_gen', 'loss_nkd'),
     {'mask_token': (1, 1, 64), 'generation.2.weight': (64, 64, 3, 3)}),
]


@pytest.mark.e2e
@needs_train
@pytest.mark.parametrize('method,model,extra,loss_keys,state_shapes', E2E_CASES, ids=[c[0] for c in E2E_CASES])
def test_train_one_epoch(tmp_path, method, model, extra, loss_keys, state_shapes):
    kwargs = {'img_size': 32} if model == 'test_vit' else {}
    torch.manual_seed(0)
    teacher_path = tmp_path / f'{model}.pth'
    torch.save(timm.create_model(model, num_classes=NUM_CLASSES, **kwargs).state_dict(), teacher_path)
    _, run_dir = run_train(tmp_path, '--model', model, '--teacher', model, '--teacher-checkpoint', teacher_path,
                           '--distiller', method, '--epochs', '1', '--num-classes', str(NUM_CLASSES), *extra)
    rows = read_summary(run_dir)
    assert len(rows) == 1
    for key in ('loss_gt', *loss_keys):
        assert math.isfinite(float(rows[0][f'train_{key}'])), key
    checkpoint = torch.load(Path(run_dir) / 'checkpoint' / 'last.pth.tar', map_location='cpu', weights_only=False)
    state = checkpoint['distiller_state']
    for key, shape in state_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(('student.', 'teacher.')) for k in state)
    assert not set(state) & set(checkpoint['state_dict'])
