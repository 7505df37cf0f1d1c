"""OFA (docs/methods/ofa.md): the loss against hand-worked numbers and its properties (§9), the branches on a matrix of
students at two input sizes, the distiller's bookkeeping, and one CLI run on synthetic data."""
import copy
import csv
import math
from functools import lru_cache

import pytest
import timm
from timm.models.mlp_mixer import MlpMixer
import torch
import torch.nn as nn
import torch.nn.functional as F

import models  # noqa: F401  (registers the CIFAR models)
from distillers.base import DistillerError
from distillers.ofa import OFA, PatchMerge, TokenBranch, halvings_to, merges_to, ofa_loss

from .helpers import distiller_args

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers
def build(student, teacher, size, **overrides):
    return OFA(student, teacher, nn.CrossEntropyLoss(), distiller_args(**overrides), (3, size, size))


def create(name, size=None, **kwargs):
    torch.manual_seed(0)
    if size is not None and any(k in name for k in ('deit', 'vit', 'swin', 'mixer', 'resmlp')):
        kwargs['img_size'] = size
    # the stage layouts (grids, prefix tokens, map or tokens) of the real models, at small widths and depths
    if name.startswith('swin'):
        kwargs.setdefault('depths', (1, 1, 1, 1))
        kwargs.setdefault('embed_dim', 48)
    if name == 'mixer_s16_224':  # its entry point pins embed_dim, so the class is built directly
        return MlpMixer(patch_size=16, num_blocks=8, embed_dim=128, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


@lru_cache(maxsize=None)
def small_teacher(size, num_classes=10):
    return create('test_vit', size, num_classes=num_classes).eval()


def images(size, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def branch_sum(losses):
    return sum(v for k, v in losses.items() if k.startswith('loss_ofa_s'))


# ---------------------------------------------------------------- the loss (§6, §9 O1-O5)
def test_eps_one_is_soft_cross_entropy_at_any_temperature():
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(4, 7, generator=g) * 3, torch.randn(4, 7, generator=g) * 3
    mask = F.one_hot(torch.tensor([0, 3, 6, 2]), 7)
    for t in (1.0, 2.5):
        p_t = torch.softmax(zt / t, -1)
        log_p = torch.log_softmax(z / t, -1)
        kl = (p_t * (p_t.log() - log_p)).sum(-1)
        entropy = -(p_t * p_t.log()).sum(-1)
        assert torch.allclose(ofa_loss(z, zt, mask, 1.0, t), (kl + entropy).mean(), atol=1e-6)


def test_hand_worked_values():
    # K = 3, z_t = (2, 1, 0), target 0, z = (0, 0, 0): p_t by hand, -log p = ln 3 for every class
    e = [math.exp(2), math.exp(1), 1.0]
    p_t = [v / sum(e) for v in e]
    assert p_t == pytest.approx([0.665241, 0.244728, 0.090031], abs=1e-6)
    w = [(1 + p_t[0]) ** 1.5 - 1, p_t[1] ** 1.5, p_t[2] ** 1.5]
    assert w == pytest.approx([1.148897, 0.121067, 0.027014], abs=1e-6)
    assert sum(w) == pytest.approx(1.296978, abs=1e-6)
    assert sum(w) * math.log(3) == pytest.approx(1.424876, abs=1e-6)

    zt = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 0, 0]])
    zero = torch.zeros(1, 3)
    cases = [(zero, 1.0, 1.0, 1.098612), (zero, 1.5, 1.0, 1.424876), (zero, 2.0, 1.0, 2.022573),
             (zero, 1.5, 2.0, 1.208173),
             (torch.tensor([[0.5, 1.0, -1.0]]), 1.0, 1.0, 1.067639),
             (torch.tensor([[0.5, 1.0, -1.0]]), 1.5, 1.0, 1.348243)]
    for z, eps, t, expected in cases:
        assert ofa_loss(z, zt, mask, eps, t).item() == pytest.approx(expected, abs=2e-6), (eps, t)


def test_gradient_matches_closed_form():
    g = torch.Generator().manual_seed(3)
    b, k, t = 3, 5, 2.0
    zt = torch.randn(b, k, generator=g)
    mask = F.one_hot(torch.tensor([1, 4, 0]), k).float()
    for eps in (1.0, 1.5, 0.7):
        z = torch.randn(b, k, generator=g, requires_grad=True)
        ofa_loss(z, zt, mask, eps, t).backward()
        p = torch.softmax(z.detach() / t, -1)
        w = (torch.softmax(zt / t, -1) + mask) ** eps - mask
        expected = (w.sum(-1, keepdim=True) * p - w) / (t * b)
        assert torch.allclose(z.grad, expected, atol=1e-6), eps
        if eps == 1.0:
            assert torch.allclose(z.grad, (p - torch.softmax(zt / t, -1)) / (t * b), atol=1e-6)


def test_nonnegative_and_shift_invariant():
    g = torch.Generator().manual_seed(4)
    z, zt = torch.randn(6, 9, generator=g) * 4, torch.randn(6, 9, generator=g) * 4
    mask = F.one_hot(torch.randint(0, 9, (6,), generator=g), 9)
    shift = torch.randn(6, 1, generator=g) * 10
    for eps in (0.5, 1.0, 2.0):
        base = ofa_loss(z, zt, mask, eps, 1.5)
        assert base.item() >= 0
        assert torch.allclose(ofa_loss(z + shift, zt, mask, eps, 1.5), base, atol=1e-5)
        assert torch.allclose(ofa_loss(z, zt - shift, mask, eps, 1.5), base, atol=1e-5)


def test_float32_and_finite_for_extreme_half_precision_logits():
    z = torch.tensor([[30000.0, -30000.0, 0.0]]).bfloat16()
    zt = torch.tensor([[0.0, 5.0, -5.0]]).bfloat16()
    mask = torch.tensor([[0, 0, 1]])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = ofa_loss(z, zt, mask, 1.5, 1.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # the non-target mass sits on classes 1 and 2, where log p is about -30000
    assert loss.item() > 1e3


def test_grid_arithmetic():
    assert [halvings_to((g, g), (7, 7)) for g in (56, 28, 14, 7)] == [3, 2, 1, 0]
    assert [halvings_to((g, g), (7, 7)) for g in (50, 25, 13)] == [3, 2, 1]  # ceil halving, 200 px ResNet
    assert [merges_to((g, g), (7, 7)) for g in (56, 28, 14, 7, 32, 16)] == [3, 2, 1, 0, 2, 1]
    assert merges_to((10, 10), (5, 5)) == 1 and merges_to((9, 9), (5, 5)) == 0


# ---------------------------------------------------------------- branches (§3-§5, O8, O9)
MATRIX = ['resnet18', 'mobilenetv2_100', 'deit_tiny_patch16_224', 'swin_tiny_patch4_window7_224',
          'convnext_atto', 'mixer_s16_224']


@pytest.mark.parametrize('size', [224, 160])
@pytest.mark.parametrize('name', MATRIX)
def test_branches_build_run_and_reach_the_pooling_grid(name, size):
    num_classes = 10
    student = create(name, size, num_classes=num_classes)
    distiller = build(student, small_teacher(size), size).train()
    desc = distiller.student_adapter.description
    token = desc.layout == 'tokens'
    assert token == any(k in name for k in ('deit', 'swin', 'mixer'))
    # at 224 px every branch pools a 7x7 grid; at 160 px the 5x5 one of a stride-32 network
    side = size // 32
    seen = {}
    for s, branch in distiller.branches.items():
        if token:
            branch.blocks[0].register_forward_hook(
                lambda m, i, o, s=s: seen.__setitem__((s, 'tokens'), tuple(i[0].shape)))
            assert len(branch.blocks) == max(4 - int(s[-1]), 1)
        else:
            branch.body.register_forward_hook(lambda m, i, o, s=s: seen.__setitem__((s, 'map'), tuple(o.shape)))
        branch.head.register_forward_hook(lambda m, i, o, s=s: seen.__setitem__((s, 'head'), tuple(o.shape)))

    logits, losses = distiller(images(size), torch.tensor([1, 7]))
    assert logits.shape == (2, num_classes)
    assert list(losses) == ['loss_gt', 'loss_kd'] + [f'loss_ofa_s{s}' for s in (1, 2, 3, 4)]
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    prefix = desc.num_prefix_tokens
    width = max(desc.pre_logits_dim, small_teacher(size).num_features)
    for s in distiller.branches:
        assert seen[(s, 'head')] == (2, num_classes)
        if token:
            assert seen[(s, 'tokens')] == (2, prefix + side * side, desc.pre_logits_dim)
        else:
            assert seen[(s, 'map')] == (2, width, side, side)

    sum(losses.values()).backward()
    for n, p in distiller.branches.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
    # every stage's branch reaches the student's first layer
    first = next(p for p in distiller.student.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_deit_stage3_gives_fifty_tokens_into_one_block():
    distiller = build(create('deit_tiny_patch16_224', num_classes=10), small_teacher(224), 224)
    branch = distiller.branches['stage3']
    shapes = []
    branch.blocks[0].register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    distiller(images(224), torch.tensor([0, 1]))
    assert len(branch.blocks) == 1 and len(branch.merges) == 1
    assert shapes == [(2, 50, 192)]


def test_patch_merge_order_padding_and_activations():
    merge = PatchMerge(1, 4, activate=False)
    seen = []
    merge.norm.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    # one channel, 3x3 grid: the odd side is zero-padded to 4x4, then (even, even), (odd, even), (even, odd),
    # (odd, odd) as (row, col) are stacked along channels
    grid = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    out = merge(grid)
    assert out.shape == (1, 4, 2, 2)
    assert seen[0][0].tolist() == [[1, 4, 2, 5], [3, 6, 0, 0], [7, 0, 8, 0], [9, 0, 0, 0]]
    # GELU after every merge except the last of a chain of two or more
    for m, expected in [(1, [nn.GELU]), (2, [nn.GELU, nn.Identity]), (3, [nn.GELU, nn.GELU, nn.Identity])]:
        branch = TokenBranch(8, m, 16, 1, 10, 0, False)
        assert [type(merge.act) for merge in branch.merges] == expected
        assert branch.merges[0].reduction.in_features == 32 and branch.token_proj is None
    branch = TokenBranch(8, 0, 16, 1, 10, 0, False)
    assert branch.token_proj.in_features == 8 and branch.token_proj.out_features == 16


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'mixer_s16_224'])
def test_readout_is_class_token_or_mean(name):
    d = build(create(name, 64, num_classes=10), small_teacher(64), 64).eval()
    branch = d.branches['stage4']
    seen = {}
    branch.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__('tokens', o))
    branch.head.register_forward_hook(lambda m, i, o: seen.__setitem__('pooled', i[0]))
    d(images(64), torch.tensor([0, 1]))
    tokens = seen['tokens']
    expected = tokens[:, 0] if name.startswith('deit') else tokens.mean(dim=1)
    assert tokens.shape[1] == (1 if name.startswith('deit') else 0) + 4  # 4x4 patches merged once to 2x2
    assert torch.equal(seen['pooled'], expected)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_of_the_spec():
    # ResNet-18 <- DeiT-T, D* = 512: 0.782 / 0.768 / 0.716 / 0.776 M
    d = build(create('resnet18'), create('deit_tiny_patch16_224').eval(), 224)
    assert [round(count(b) / 1e6, 3) for b in d.branches.values()] == [0.782, 0.768, 0.716, 0.776]
    assert round(d.extra_parameters() / 1e6, 2) == 3.04
    # by hand: stage 1 = three SepConvs (64->128->256->512) + head; stage 4 = 1x1 conv with bias + head
    def sep(ci, co):
        return 9 * ci + ci * ci + 2 * ci + 9 * ci + ci * co + 2 * co
    head = 512 * 1000 + 1000
    assert count(d.branches['stage1']) == sep(64, 128) + sep(128, 256) + sep(256, 512) + head
    assert count(d.branches['stage4']) == 512 * 512 + 512 + head
    # DeiT-T <- ResNet-50, token branches at D_s = 192: 1.675 / 1.231 / 0.786 / 0.786 M; a token branch
    # never reads the teacher's width, so a small teacher stands in for ResNet-50 and ConvNeXt-T
    d = build(create('deit_tiny_patch16_224'), small_teacher(224, 1000), 224)
    assert [round(count(b) / 1e6, 3) for b in d.branches.values()] == [1.675, 1.231, 0.786, 0.786]
    block = 192 * 576 + (192 * 192 + 192) + (192 * 768 + 768) + (768 * 192 + 192) + 4 * 192
    merge = 2 * 768 + 768 * 192
    assert count(d.branches['stage1']) == 3 * block + merge + 192 * 1000 + 1000
    # ResMLP-12 <- ConvNeXt-T: 16.3 M
    d = build(create('resmlp_12_224'), small_teacher(224, 1000), 224)
    assert round(d.extra_parameters() / 1e6, 1) == 16.3


def test_initialization():
    d = build(create('resnet18', num_classes=10), small_teacher(64), 64)
    conv = d.branches['stage1'].body[2][5]  # last pointwise conv, 256 -> 512, fan_out = 512
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    for m in d.branches.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
        if isinstance(m, nn.Linear):
            assert not m.bias.any() and m.weight.abs().max() <= 2
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)


# ---------------------------------------------------------------- the distiller (§7, O5-O7, O10)
@lru_cache(maxsize=None)
def resnet_distiller(**overrides):
    return build(create('resnet18', num_classes=10), small_teacher(64), 64, **overrides)


def test_every_term_uses_its_eps_and_the_weights():
    eps = [1.0, 1.5, 2.0, 2.5, 0.8]
    d = build(create('resnet18', num_classes=10), small_teacher(64), 64, ofa_eps=eps, ofa_loss_weight=0.5,
              ofa_temperature=2.0, kd_loss_weight=0.3, gt_loss_weight=0.7).eval()
    x, y = images(64), torch.tensor([2, 5])
    logits, losses = d(x, y)
    t_logits = small_teacher(64)(x)
    mask = F.one_hot(y, 10)
    features = d.student_forward(x, d.request)
    assert torch.allclose(losses['loss_gt'], 0.7 * F.cross_entropy(logits, y))
    assert torch.allclose(losses['loss_kd'], 0.3 * ofa_loss(logits, t_logits, mask, 0.8, 2.0))
    for s, e in zip((1, 2, 3, 4), eps):
        branch_logits = d.branches[f'stage{s}'](features.stages[s])
        # one weight on each term, so on their sum: not divided by the number of stages
        assert torch.allclose(losses[f'loss_ofa_s{s}'], 0.5 * ofa_loss(branch_logits, t_logits, mask, e, 2.0))


def test_identical_branches_at_two_stages_count_twice():
    # DeiT with its last two blocks made identities: stages 3 and 4 (after blocks 10 and 12) see the same
    # tokens; with stage 4's branch a copy of stage 3's, the two terms are equal and both counted
    student = create('deit_tiny_patch16_224', 64, num_classes=10)
    with torch.no_grad():
        for block in student.blocks[10:]:
            for p in block.parameters():
                p.zero_()
    d = build(student, small_teacher(64), 64, ofa_stage=[3, 4]).eval()
    d.branches['stage4'].load_state_dict(d.branches['stage3'].state_dict())
    single = build(student, small_teacher(64), 64, ofa_stage=[3]).eval()
    single.branches.load_state_dict(
        {k: v for k, v in d.branches.state_dict().items() if k.startswith('stage3.')})
    x, y = images(64), torch.tensor([3, 4])
    _, both = d(x, y)
    _, one = single(x, y)
    assert torch.allclose(both['loss_ofa_s3'], both['loss_ofa_s4'], atol=1e-6)
    assert torch.allclose(branch_sum(both), 2 * one['loss_ofa_s3'], atol=1e-5)


def test_zero_branch_weight_gives_zero_terms_and_no_branch_gradient():
    d = build(create('resnet18', num_classes=10), small_teacher(64), 64, ofa_loss_weight=0.0).train()
    _, losses = d(images(64), torch.tensor([1, 2]))
    assert all(losses[f'loss_ofa_s{s}'].item() == 0 for s in (1, 2, 3, 4))
    sum(losses.values()).backward()
    for n, p in d.branches.named_parameters():
        assert p.grad is None or not p.grad.any(), n


def test_labels_hard_onehot_and_mixup():
    d = resnet_distiller().eval()
    x = images(64)
    hard = torch.tensor([3, 8])
    _, from_int = d(x, hard)
    _, from_onehot = d(x, F.one_hot(hard, 10).float())
    for k in from_int:
        assert torch.allclose(from_int[k], from_onehot[k]), k
    mixed = 0.7 * F.one_hot(hard, 10).float() + 0.3 * F.one_hot(torch.tensor([5, 0]), 10).float()
    _, from_mix = d(x, mixed)
    for k in from_int:
        if k != 'loss_gt':  # the task term sees the soft labels as given
            assert torch.allclose(from_int[k], from_mix[k]), k
    assert not torch.allclose(from_int['loss_gt'], from_mix['loss_gt'])


def test_start_of_training_scale():
    num_classes = 100
    d = build(create('resnet18', num_classes=num_classes), small_teacher(64, num_classes), 64).train()
    _, losses = d(images(64, batch=4), torch.tensor([0, 1, 2, 3]))
    for s in (1, 2, 3, 4):
        assert losses[f'loss_ofa_s{s}'].item() == pytest.approx(math.log(num_classes), rel=0.03)
    assert branch_sum(losses).item() == pytest.approx(4 * math.log(num_classes), rel=0.03)  # 18.4


def test_student_output_unchanged_and_teacher_frozen_by_a_step():
    student = create('resnet18', num_classes=10)
    teacher = create('test_vit', 64, num_classes=10)
    x, y = images(64), torch.tensor([1, 2])
    plain = student.eval()(x)
    teacher_before = copy.deepcopy(teacher.state_dict())
    d = build(student, teacher, 64)
    d.eval()
    logits, _ = d(x, y)
    assert torch.equal(logits, plain)

    d.train()
    assert not teacher.training
    optimizer = torch.optim.SGD(d.parameters(), lr=0.5, momentum=0.9)
    assert not any(p is q for p in d.parameters() for q in teacher.parameters())
    _, losses = d(x, y)
    sum(losses.values()).backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)
    assert not torch.equal(student.eval()(x), plain)  # while the student did move


def test_projector_state_round_trip():
    d = build(create('resnet18', num_classes=10), small_teacher(64), 64)
    state = d.distiller_state_dict()
    assert state and all(k.startswith('branches.stage') for k in state)
    assert any(k.endswith('running_mean') for k in state)
    fresh = build(create('resnet18', num_classes=10), small_teacher(64), 64)
    with torch.no_grad():
        for v in fresh.branches.state_dict().values():
            v.add_(1)
    assert not any(torch.equal(state[k], v) for k, v in fresh.distiller_state_dict().items())
    fresh.load_distiller_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in fresh.distiller_state_dict().items())


def test_autocast_losses_are_float32():
    d = resnet_distiller().train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, losses = d(images(64), torch.tensor([1, 2]))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_vit_student_no_weight_decay_and_class_token_readout():
    d = build(create('deit_tiny_patch16_224', 64, num_classes=10), small_teacher(64), 64)
    assert {'student.pos_embed', 'student.cls_token'} <= d.no_weight_decay()
    assert all(b.class_token and b.num_prefix_tokens == 1 for b in d.branches.values())
    mixer = build(create('mixer_s16_224', 64, num_classes=10), small_teacher(64), 64)
    assert all(not b.class_token and b.num_prefix_tokens == 0 for b in mixer.branches.values())


# ---------------------------------------------------------------- flags and errors
def test_eps_forms():
    d = resnet_distiller(ofa_eps=1.5)  # a YAML scalar
    assert d.stage_eps == (1.5,) * 4 and d.logit_eps == 1.5
    d = build(create('resnet18', num_classes=10), small_teacher(64), 64, ofa_stage=4, ofa_eps=[1.2, 1.7])
    assert d.stages == (4,) and d.stage_eps == (1.2,) and d.logit_eps == 1.7
    assert list(d.branches) == ['stage4']
    with pytest.raises(DistillerError, match=r'has 3 values.*give 1, or 5'):
        resnet_distiller(ofa_eps=(1.0, 1.5, 2.0))
    with pytest.raises(DistillerError, match='positive'):
        resnet_distiller(ofa_eps=0.0)


def test_missing_stage_is_named():
    # the CIFAR ResNets have three stages (32, 16, 8 at 32 px)
    three_stage = create('resnet20', num_classes=10)
    with pytest.raises(DistillerError, match=r'stage\(s\) \[4\].*has stages 1 2 3'):
        build(three_stage, small_teacher(32), 32, ofa_stage=[1, 2, 3, 4])
    assert build(three_stage, small_teacher(32), 32).stages == (1, 2, 3)  # the default: the student's stages
    d = build(three_stage, small_teacher(32), 32, ofa_stage=[1, 2, 3], ofa_eps=[1, 1, 1, 1.5])
    assert list(d.branches) == ['stage1', 'stage2', 'stage3']
    # down to the 8x8 grid of the last stage: two SepConvs, one, then the 1x1 conv
    assert [len(d.branches[f'stage{s}'].body) for s in (1, 2)] == [2, 1]
    assert isinstance(d.branches['stage3'].body, nn.Conv2d)
    with pytest.raises(DistillerError, match='twice'):
        resnet_distiller(ofa_stage=(2, 2))


def test_token_width_not_divisible_by_heads_is_refused():
    student = create('deit_tiny_patch16_224', 32, num_classes=10, embed_dim=18, num_heads=3, depth=8)
    with pytest.raises(DistillerError, match='4-head attention'):
        build(student, small_teacher(32), 32)


def test_class_count_mismatch_is_refused():
    with pytest.raises(DistillerError, match='same --num-classes'):
        build(create('resnet18', num_classes=10), small_teacher(64, 100), 64)


# ---------------------------------------------------------------- CLI
@pytest.mark.e2e
def test_train_cli_logs_every_term_and_saves_branches(tmp_path):
    from tests.helpers import run_train

    teacher_path = tmp_path / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(timm.create_model('test_vit', num_classes=10, img_size=32).state_dict(), teacher_path)
    _, run = run_train(tmp_path, '--model', 'test_resnet', '--teacher', 'test_vit', '--distiller', 'ofa',
                       '--teacher-checkpoint', teacher_path, '--epochs', '1', '--ofa-eps', '1.5')
    with open(run / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for key in ['train_loss_gt', 'train_loss_kd'] + [f'train_loss_ofa_s{s}' for s in (1, 2, 3, 4)]:
        assert key in rows[0], key
        assert math.isfinite(float(rows[0][key])) and float(rows[0][key]) > 0, key
    checkpoint = torch.load(run / 'checkpoint' / 'last.pth.tar', map_location='cpu', weights_only=False)
    state = checkpoint['distiller_state']
    assert {k.split('.')[1] for k in state} == {'stage1', 'stage2', 'stage3', 'stage4'}
    assert not any(k.startswith('student.') for k in state)
