"""Logit standardization (docs/methods/logit2.md §1: properties S1-S8, golden values) with kd and dkd, and CTKD
(§3: properties C1-C11, golden values), including the learned temperature through DDP, the optimizer's weight decay
and --resume."""
import argparse
import math
import os
import socket

import pytest
import timm
import torch
import torch.nn as nn

import train
from distillers import CTKD, DISTILLERS, DKD, KD, DistillerError, add_distiller_args
from distillers.ctkd import (GlobalTemperature, InstanceTemperature, ctkd_kd_loss, ctkd_lambda, ctkd_temperature,
                             gradient_reversal)
from distillers.dkd import dkd_loss
from distillers.kd import kd_loss
from distillers.logit_standardization import add_logit_standardize_arg, standardize_logits

from .helpers import distiller_args, read_summary, run_train

NUM_CLASSES = 10


def golden_logits():
    """The golden inputs of docs/methods/logit2.md §1 and §3: torch.manual_seed(0), then z_s and z_t =
    torch.randn(4, 5) * 3."""
    torch.manual_seed(0)
    zs = torch.randn(4, 5) * 3
    zt = torch.randn(4, 5) * 3
    return zs, zt


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def pair(seed=0):
    torch.manual_seed(seed)
    return (timm.create_model('test_resnet', num_classes=NUM_CLASSES),
            timm.create_model('test_resnet', num_classes=NUM_CLASSES))


# ================================================================== LS: standardize_logits
def test_ls_golden_row():
    zs, _ = golden_logits()
    expected = torch.tensor([-0.9040100, -0.9407203, 0.3075560, 0.0538256, 1.4833488])
    torch.testing.assert_close(standardize_logits(zs)[0], expected, rtol=1e-5, atol=1e-6)


def test_ls_s1_rows_have_mean_0_and_unbiased_std_sigma_over_eps_plus_sigma():
    z = randn(6, 9, seed=1, scale=4.0)
    out = standardize_logits(z)
    assert out.mean(dim=-1).abs().max() < 1e-6
    sigma = z.std(dim=-1)
    torch.testing.assert_close(out.std(dim=-1), sigma / (1e-7 + sigma), rtol=1e-5, atol=0)
    # the standard deviation is the unbiased one: the population form gives sqrt((K - 1) / K)
    assert out.std(dim=-1, correction=0)[0].item() == pytest.approx(math.sqrt(8 / 9), rel=1e-5)
    small = torch.tensor([[0.0, 1e-7]])  # sigma ~ eps: the output std is sigma / (eps + sigma), not 1
    expected = (small.std() / (1e-7 + small.std())).item()
    assert standardize_logits(small).std().item() == pytest.approx(expected, rel=1e-4) and expected < 0.5


def test_ls_s2_row_scale_and_shift_free_and_odd():
    z = randn(5, 7, seed=2, scale=3.0)
    scale, shift = randn(5, 1, seed=3).abs() + 0.5, randn(5, 1, seed=4, scale=10.0)
    torch.testing.assert_close(standardize_logits(z * scale + shift), standardize_logits(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(standardize_logits(-z), -standardize_logits(z))


def test_ls_s3_constant_rows_and_one_class():
    out = standardize_logits(torch.tensor([[2.5, 2.5, 2.5, 2.5], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]))
    assert torch.isfinite(out).all() and torch.equal(out[:2], torch.zeros(2, 4))
    with pytest.raises(ValueError, match='at least 2 classes'):
        standardize_logits(torch.ones(3, 1))


def test_ls_s7_bf16_autocast_is_float32_math():
    z = randn(4, 10, seed=5, scale=3.0).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = standardize_logits(z)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, standardize_logits(z.float()), rtol=0, atol=0)


# ================================================================== LS inside kd and dkd
def test_ls_golden_kd_and_dkd():
    zs, zt = golden_logits()
    hs, ht = standardize_logits(zs), standardize_logits(zt)
    for tau, expected in ((1.0, 0.6507735), (2.0, 0.7147054), (4.0, 0.7345317)):
        assert kd_loss(hs, ht, tau).item() == pytest.approx(expected, rel=1e-5), tau
    assert kd_loss(zs, zt, 2.0).item() == pytest.approx(4.7535119, rel=1e-5)
    y = torch.tensor([0, 2, 4, 1])
    assert dkd_loss(hs, ht, y, 1.0, 8.0, 2.0).item() == pytest.approx(4.6982903, rel=1e-5)


def test_ls_s4_kd_zero_at_equality_and_row_scale_free():
    zs, zt = randn(5, 8, seed=6, scale=3.0), randn(5, 8, seed=7, scale=3.0)

    def kd_ls(a, b):
        return kd_loss(standardize_logits(a), standardize_logits(b), 2.0).item()

    assert kd_ls(zt, zt) == pytest.approx(0.0, abs=1e-6)
    base = kd_ls(zs, zt)
    scale, shift = randn(5, 1, seed=8).abs() + 0.5, randn(5, 1, seed=9, scale=5.0)
    assert kd_ls(zs * scale + shift, zt) == pytest.approx(base, rel=1e-5)
    assert kd_ls(zs, zt * scale + shift) == pytest.approx(base, rel=1e-5)
    assert kd_loss(zs * scale, zt, 2.0).item() != pytest.approx(kd_loss(zs, zt, 2.0).item(), rel=1e-3)  # plain KD


def test_ls_s5_student_gradient_is_orthogonal_to_ones_and_to_the_logits():
    zs, zt = randn(5, 8, seed=10, scale=3.0).requires_grad_(), randn(5, 8, seed=11, scale=3.0)
    kd_loss(standardize_logits(zs), standardize_logits(zt), 2.0).backward()
    g = zs.grad
    assert g.abs().sum() > 0
    assert (g.sum(dim=-1).abs() <= 1e-6 * g.norm(dim=-1)).all()
    assert ((g * zs.detach()).sum(dim=-1).abs() <= 1e-4 * g.norm(dim=-1) * zs.detach().norm(dim=-1)).all()


def build(cls, student, teacher, **overrides):
    return cls(student, teacher, nn.CrossEntropyLoss(), distiller_args(**overrides), (3, 32, 32))


def test_ls_s6_distillers_with_and_without_the_flag():
    student, teacher = pair()
    x, y = randn(4, 3, 32, 32, seed=12), torch.tensor([1, 0, 7, 3])
    student.eval(), teacher.eval()
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
    hs, ht = standardize_logits(zs), standardize_logits(zt)
    cases = [
        (KD, dict(kd_temperature=2.0), 'loss_kd', lambda a, b: 0.5 * kd_loss(a, b, 2.0)),
        (DKD, dict(dkd_beta=8.0, dkd_temperature=2.0), 'loss_nckd',
         lambda a, b: dkd_loss(a, b, y, 0.0, 8.0, 2.0)),
    ]
    for cls, flags, key, reference in cases:
        plain = build(cls, student, teacher, **flags).eval()
        standardized = build(cls, student, teacher, logit_standardize=True, **flags).eval()
        with torch.no_grad():
            _, off = plain(x, y)
            _, on = standardized(x, y)
        assert torch.equal(off[key], reference(zs, zt)), cls.name  # bit-identical with the flag off
        torch.testing.assert_close(on[key], reference(hs, ht), rtol=1e-6, atol=0)
        assert torch.equal(on['loss_gt'], off['loss_gt'])  # the task loss keeps the raw logits
    # ctkd's plain form is ctkd_kd_loss on the raw logits
    ctkd = build(CTKD, student, teacher).eval()
    with torch.no_grad():
        _, losses = ctkd(x, y)
    assert torch.equal(losses['loss_kd'], 0.9 * ctkd_kd_loss(zs, zt, ctkd_temperature(torch.ones(1))))
    for name in ('vanilla', 'dist', 'nkd'):
        with pytest.raises(DistillerError, match=f"distiller '{name}' has no logit-standardized form"):
            build(DISTILLERS[name], student, teacher, logit_standardize=True)


def test_ls_s8_alpha_above_one_needs_an_explicit_ce_weight():
    student, teacher = pair()
    with pytest.raises(DistillerError, match='--kd-loss-weight 9 is above 1.*--gt-loss-weight'):
        build(KD, student, teacher, kd_loss_weight=9.0, logit_standardize=True)
    kd = build(KD, student, teacher, kd_loss_weight=9.0, gt_loss_weight=0.1, logit_standardize=True)
    assert (kd.kd_loss_weight, kd.gt_loss_weight) == (9.0, 0.1)
    with pytest.raises(DistillerError, match='--kd-loss-weight 9 is above 1'):
        build(CTKD, student, teacher, kd_loss_weight=9.0)


def test_ls_flag_is_declared_once_and_can_be_switched_off():
    parser = argparse.ArgumentParser()
    add_distiller_args(parser)
    add_logit_standardize_arg(parser)  # again: no duplicate-flag conflict
    assert parser.parse_args(['--logit-standardize']).logit_standardize is True
    assert parser.parse_args(['--no-logit-standardize']).logit_standardize is False
    assert parser.parse_args([]).logit_standardize is False
    args, _ = train.parse_args(['--distiller', 'kd', '--logit-standardize', '--no-logit-standardize'])
    assert args.logit_standardize is False


# ================================================================== CTKD: pure functions
def test_ctkd_c1_temperature_range():
    tau = ctkd_temperature(torch.linspace(-8, 8, 33))  # float32 rounds the ends of a wider range onto the bounds
    assert (tau > 1.0).all() and (tau < 21.0).all() and (tau.diff() > 0).all()
    assert ctkd_temperature(torch.tensor(1.0)).item() == pytest.approx(15.6211720, rel=1e-7)
    assert ctkd_temperature(torch.tensor(0.0), 2.0, 22.0).item() == pytest.approx(13.0)
    low = ctkd_temperature(torch.tensor([1.0], dtype=torch.bfloat16))
    assert low.dtype == torch.float32 and low.item() == pytest.approx(15.6211720, rel=1e-7)  # 1 is exact in bf16


@pytest.mark.parametrize('lambda_', [0.0, 0.3, 1.0])
def test_ctkd_c2_gradient_reversal(lambda_):
    x = randn(5, seed=13).requires_grad_()
    out = gradient_reversal(x, lambda_)
    assert torch.equal(out, x)
    (out.sin() * 3).sum().backward()
    torch.testing.assert_close(x.grad, -lambda_ * 3 * x.detach().cos())
    if lambda_ == 0.0:
        assert torch.equal(x.grad, torch.zeros(5))


def test_ctkd_c3_lambda_curriculum():
    loops10 = [0.0244717, 0.0954915, 0.2061074, 0.3454915, 0.5, 0.6545085, 0.7938926, 0.9045085, 0.9755283, 1, 1, 1]
    assert [ctkd_lambda(e) for e in range(12)] == pytest.approx(loops10, abs=1e-7)
    loops5 = [0.0954915, 0.3454915, 0.6545085, 0.9045085, 1, 1, 1]
    assert [ctkd_lambda(e, num_loops=5) for e in range(7)] == pytest.approx(loops5, abs=1e-7)
    values = [ctkd_lambda(e, 7, 2.0, 0.5) for e in range(20)]
    assert all(b >= a for a, b in zip(values, values[1:])) and values[6:] == [2.0] * 14 and values[5] < 2.0
    assert isinstance(ctkd_lambda(0), float)


def test_ctkd_c4_fixed_temperature_is_kd():
    zs, zt = randn(6, 10, seed=14, scale=3.0), randn(6, 10, seed=15, scale=3.0)
    expected = kd_loss(zs, zt, 3.5)
    for tau in (torch.tensor(3.5), torch.tensor([3.5]), torch.full((6,), 3.5)):
        torch.testing.assert_close(ctkd_kd_loss(zs, zt, tau), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match='one value or one per sample'):
        ctkd_kd_loss(zs, zt, torch.ones(5))


def test_ctkd_c5_zero_at_equality():
    z = randn(4, 7, seed=16, scale=3.0)
    tau = torch.tensor([4.0], requires_grad=True)
    loss = ctkd_kd_loss(z, z, tau)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and abs(tau.grad.item()) < 1e-6
    with_eps = ctkd_kd_loss(z, z, torch.tensor([4.0]), teacher_eps=1e-7).item()
    assert with_eps != 0.0 and abs(with_eps) < 1e-4


def test_ctkd_c6_the_temperature_moves_to_increase_the_loss():
    zs, zt = golden_logits()
    module = GlobalTemperature()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    before = ctkd_kd_loss(zs, zt, ctkd_temperature(module(zt, zs, 1.0))).item()
    ctkd_kd_loss(zs, zt, ctkd_temperature(module(zt, zs, 1.0))).backward()
    optimizer.step()
    after = ctkd_kd_loss(zs, zt, ctkd_temperature(module(zt, zs, 1.0))).item()
    assert module.raw.item() != 1.0 and after > before


def test_ctkd_c7_c8_per_sample_form_permutation_and_shift():
    zs, zt = randn(5, 6, seed=17, scale=3.0), randn(5, 6, seed=18, scale=3.0)
    tau = torch.tensor([1.5, 2.0, 4.0, 7.0, 12.0])
    value = ctkd_kd_loss(zs, zt, tau)
    singles = torch.stack([ctkd_kd_loss(zs[b:b + 1], zt[b:b + 1], tau[b:b + 1]) for b in range(5)])
    torch.testing.assert_close(value, singles.mean())
    order = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(ctkd_kd_loss(zs[order], zt[order], tau[order]), value)
    shifted = ctkd_kd_loss(zs + randn(5, 1, seed=19, scale=5.0), zt - randn(5, 1, seed=20, scale=5.0), tau)
    torch.testing.assert_close(shifted, value, rtol=1e-5, atol=1e-6)


def tau_gradient_tolerance(zs, zt, tau, teacher_eps=0.0):
    """1e-5 of (2|L| + sum|z_s dL/dz_s| + sum|z_t dL/dz_t|) / tau, per sample: the size of the terms that cancel in
    dL/dtau, which float32 cannot resolve more finely (docs/methods/logit2.md §3's tolerance for this gradient)."""
    zs, zt = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    tau = torch.as_tensor(tau, dtype=torch.float32).reshape(-1)
    per_sample = [ctkd_kd_loss(zs[b:b + 1], zt[b:b + 1], tau[b % tau.numel():][:1], teacher_eps)
                  for b in range(zs.shape[0])]
    loss = torch.stack(per_sample).mean()
    gs, gt = torch.autograd.grad(loss, (zs, zt))
    size = (2 * torch.stack(per_sample).abs() / zs.shape[0] + (zs * gs).abs().sum(1) + (zt * gt).abs().sum(1))
    size = size / tau
    return 1e-5 * (size.sum() if tau.numel() == 1 else size)


@pytest.mark.parametrize('standardize,lambda_,loss,x_grad', [
    (False, 1.0, 5.4171166, 9.2484375e-3),
    (False, 0.0244717, 5.4171166, 2.2632499e-4),
    (True, 1.0, 0.7430295, -4.9945482e-4),
])
def test_ctkd_c11_golden_global(standardize, lambda_, loss, x_grad):
    zs, zt = golden_logits()
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    module = GlobalTemperature()
    tau = ctkd_temperature(module(zt, zs, lambda_))
    assert tau.shape == (1,) and tau.item() == pytest.approx(15.6211720, rel=1e-6)
    value = ctkd_kd_loss(zs, zt, tau)
    value.backward()
    assert value.item() == pytest.approx(loss, rel=1e-5)
    # x gradient = -lambda * dL/dtau * dtau/dx, with dtau/dx = 20 sigmoid'(1)
    dtau_dx = 20 * torch.sigmoid(torch.tensor(1.0)).item() * (1 - torch.sigmoid(torch.tensor(1.0)).item())
    tolerance = lambda_ * dtau_dx * tau_gradient_tolerance(zs, zt, tau.detach()).item()
    assert abs(module.raw.grad.item() - x_grad) <= tolerance


def test_ctkd_c11_golden_instance():
    zs, zt = golden_logits()
    tau = torch.tensor([2.0, 4.0, 6.0, 8.0], requires_grad=True)
    value = ctkd_kd_loss(zs, zt, tau, teacher_eps=1e-7)
    value.backward()
    assert value.item() == pytest.approx(5.4450493, rel=1e-5)
    expected = torch.tensor([0.0169938, 0.0152807, 0.0192768, 0.0029853])
    tolerance = tau_gradient_tolerance(zs, zt, tau.detach(), teacher_eps=1e-7)
    assert ((tau.grad - expected).abs() <= tolerance + 5e-8).all()  # + the golden values' last printed digit


def test_ctkd_c11_instance_module_gives_one_reversed_temperature_per_sample():
    torch.manual_seed(0)
    module = InstanceTemperature(num_classes=5, hidden=8)
    zs, zt = golden_logits()
    zs.requires_grad_()
    raw = module(zt, zs, 0.5)
    assert raw.shape == (4,)
    raw.sum().backward()
    assert zs.grad is None  # the module reads detached logits
    last = module.mlp[2]
    # d(sum raw)/d(bias of the last layer) = 4 without the reversal; reversed at lambda 0.5: -2
    assert last.bias.grad.item() == pytest.approx(-2.0)


def test_ls_and_ctkd_loss_math_never_waits_for_the_device():
    """No data-dependent shapes or host reads (fake tensors have no data, so such an op raises here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        zs, zt = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        raw = torch.ones(1, 1, requires_grad=True)
        tau = ctkd_temperature(gradient_reversal(raw, 0.5).reshape(1))
        loss = ctkd_kd_loss(standardize_logits(zs), standardize_logits(zt), tau)
        loss = loss + ctkd_kd_loss(zs, zt, torch.rand(4) + 1, teacher_eps=1e-7)
        loss.backward()
        assert loss.shape == () and zs.grad.shape == zs.shape and raw.grad.shape == raw.shape


# ================================================================== CTKD: the distiller
def test_ctkd_flags_and_defaults():
    args = distiller_args()
    assert (args.ctkd_mode, args.ctkd_t_start, args.ctkd_t_range, args.ctkd_loops, args.ctkd_lambda_max,
            args.ctkd_lambda_min, args.ctkd_instance_hidden) == ('global', 1.0, 20.0, 10, 1.0, 0.0, 256)
    ctkd = build(CTKD, *pair())
    assert (ctkd.kd_loss_weight, ctkd.gt_loss_weight) == (0.9, pytest.approx(0.1))
    assert CTKD.teacher_logits_only and ctkd.temperature_module.raw.shape == (1, 1)
    assert math.isnan(ctkd.current_temperature)
    for flags, message in ((dict(ctkd_t_range=0.0), '--ctkd-t-range must be positive, got 0'),
                           (dict(ctkd_t_start=-1.0), '--ctkd-t-start must be a positive temperature, got -1'),
                           (dict(ctkd_loops=0), '--ctkd-loops must be at least 1 epoch, got 0')):
        with pytest.raises(DistillerError, match=message):
            build(CTKD, *pair(), **flags)


@pytest.mark.parametrize('mode,standardize', [('global', False), ('global', True), ('instance', False)])
def test_ctkd_distiller_step(mode, standardize):
    student, teacher = pair()
    ctkd = build(CTKD, student, teacher, ctkd_mode=mode, logit_standardize=standardize, ctkd_instance_hidden=16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ctkd.train()
    x, y = randn(4, 3, 32, 32, seed=21), torch.tensor([0, 3, 5, 9])
    logits, losses = ctkd(x, y, epoch=3)
    assert set(losses) == {'loss_gt', 'loss_kd'}
    assert all(v.ndim == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    tau = ctkd._last_temperature
    assert tau.shape == ((1,) if mode == 'global' else (4,))
    assert 1.0 < ctkd.current_temperature < 21.0
    # the distiller's term is alpha * ctkd_kd_loss at its own temperature
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
        if standardize:
            zs, zt = standardize_logits(zs), standardize_logits(zt)
        expected = 0.9 * ctkd_kd_loss(zs, zt, tau, 1e-7 if mode == 'instance' else 0.0)
    torch.testing.assert_close(losses['loss_kd'].detach(), expected, rtol=1e-6, atol=0)
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    for key, param in ctkd.temperature_module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, key
    if mode == 'global':  # reversed and scaled by lambda(3) and alpha
        raw = torch.ones(1, requires_grad=True)
        probe = ctkd_kd_loss(zs, zt, ctkd_temperature(raw))
        (d_raw,) = torch.autograd.grad(probe, raw)
        expected_grad = -ctkd_lambda(3) * 0.9 * d_raw
        torch.testing.assert_close(ctkd.temperature_module.raw.grad.reshape(1), expected_grad, rtol=1e-3, atol=1e-7)
    assert all(p.grad is None for p in teacher.parameters())
    torch.optim.SGD([p for p in ctkd.parameters() if p.requires_grad], lr=0.1).step()
    assert not teacher.training and all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert set(ctkd.distiller_state_dict()) == ({'temperature_module.raw'} if mode == 'global' else {
        'temperature_module.mlp.0.weight', 'temperature_module.mlp.0.bias', 'temperature_module.mlp.2.weight',
        'temperature_module.mlp.2.bias'})


def test_ctkd_c9_the_temperature_is_weight_decayed_by_the_trainers_optimizer():
    args, _ = train.parse_args(['--distiller', 'ctkd', '--opt', 'momentum', '--lr', '0.05', '--weight-decay', '5e-4'])
    ctkd = CTKD(*pair(), nn.CrossEntropyLoss(), args, (3, 32, 32))
    optimizer = train.create_optimizer(ctkd, args)  # without --weight-decay-all: timm's exemptions apply
    raw = ctkd.temperature_module.raw
    group, = [g for g in optimizer.param_groups if any(p is raw for p in g['params'])]
    assert group['weight_decay'] == pytest.approx(5e-4)


def _ddp_worker(rank, port, results):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        ctkd = build(CTKD, *pair())
        model = nn.parallel.DistributedDataParallel(ctkd)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        x = randn(4, 3, 32, 32, seed=100 + rank)  # different data on each rank
        _, losses = model(x, torch.tensor([0, 1, 2, 3]), epoch=9)
        sum(losses.values()).backward()
        optimizer.step()
        raws = [torch.zeros(1, 1) for _ in range(2)]
        dist.all_gather(raws, ctkd.temperature_module.raw.detach().clone())
        results[rank] = [r.item() for r in raws]
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ctkd_c10_one_temperature_on_every_rank():
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    # fork: the workers inherit the imported modules instead of importing them again
    mp.start_processes(_ddp_worker, args=(port, results), nprocs=2, join=True, start_method='fork')
    first, second = results[0]
    assert first == second != 1.0 and results[1] == results[0]


# ================================================================== end to end (train.py)
@pytest.mark.e2e
def test_ctkd_instance_and_kd_with_ls_train_one_epoch(tmp_path, untrained_teacher_checkpoint):
    common = ['--model', 'test_resnet', '--teacher', 'test_resnet', '--teacher-checkpoint',
              untrained_teacher_checkpoint, '--epochs', '1', '--logit-standardize']
    _, run_dir = run_train(tmp_path, *common, '--distiller', 'ctkd', '--ctkd-mode', 'instance',
                           '--ctkd-instance-hidden', '16', experiment='ctkd')
    row, = read_summary(run_dir)
    assert all(math.isfinite(float(row[f'train_{k}'])) for k in ('loss', 'loss_gt', 'loss_kd'))
    state = torch.load(run_dir / 'checkpoint' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert state['distiller_state']['temperature_module.mlp.0.weight'].shape == (16, 2 * NUM_CLASSES)
    _, run_dir = run_train(tmp_path, *common, '--distiller', 'kd', '--kd-loss-weight', '9', '--gt-loss-weight',
                           '0.1', '--kd-temperature', '2', experiment='kd')
    row, = read_summary(run_dir)
    assert all(math.isfinite(float(row[f'train_{k}'])) for k in ('loss', 'loss_gt', 'loss_kd'))


@pytest.mark.e2e
def test_ctkd_temperature_is_restored_by_resume(tmp_path, untrained_teacher_checkpoint):
    # two curriculum epochs, so that the resumed epoch runs at another lambda than the first
    common = ['--model', 'test_resnet', '--teacher', 'test_resnet', '--teacher-checkpoint',
              untrained_teacher_checkpoint, '--distiller', 'ctkd', '--ctkd-loops', '2', '--batch-size', '16',
              '--synthetic-train-size', '64', '--synthetic-val-size', '32', '--lr', '0.05', '--warmup-epochs', '0',
              '--deterministic']
    run_train(tmp_path, *common, '--epochs', '2', experiment='straight')
    run_train(tmp_path, *common, '--epochs', '1', experiment='halves')
    halves = tmp_path / 'halves' / 'checkpoint' / 'last.pth.tar'
    after_one = torch.load(halves, map_location='cpu', weights_only=True)['distiller_state']['temperature_module.raw']
    proc, _ = run_train(tmp_path, *common, '--epochs', '2', '--resume', halves, experiment='halves')
    assert 'Resumed from' in proc.stdout
    a, b = (torch.load(tmp_path / run / 'checkpoint' / 'last.pth.tar', map_location='cpu', weights_only=True)
            for run in ('straight', 'halves'))
    raw = a['distiller_state']['temperature_module.raw']
    assert raw.item() != 1.0 and not torch.equal(raw, after_one)  # it trained in both epochs
    assert torch.equal(raw, b['distiller_state']['temperature_module.raw'])
    for name, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][name]), name
