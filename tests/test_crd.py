"""CRD (docs/methods/others.md §7): the NCE loss against a reference of the original's reductions, the negatives'
draw, the memory banks and their normalizing constants, the sample-index loader, and train.py end to end: one
epoch, --resume bit-exact, and two processes (gloo) against one."""
import math
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from data.loader import create_train_loader, dataset_targets
from data.synthetic import SyntheticImageDataset
from distillers import DISTILLERS, DistillerError
from distillers.crd import CRD, crd_nce_loss, mix64, uniform_draws

from .helpers import REPO, SYNTHETIC_ARGS, distiller_args, python_env, read_summary, run_script, run_train


def reference_nce(scores, num_samples):
    """The original's NCE loss, rewritten from its formula with its tensor shapes (B, K + 1, 1)."""
    x = scores.float().unsqueeze(-1)
    m = x.shape[1] - 1
    noise = m * (1 / float(num_samples))  # m * P_n
    positive = x.select(1, 0)
    log_positive = torch.div(positive, positive.add(noise + 1e-7)).log()
    negative = x.narrow(1, 1, m)
    log_negative = torch.div(negative.clone().fill_(noise), negative.add(noise + 1e-7)).log()
    return -(log_positive.sum(0) + log_negative.view(-1, 1).sum(0))[0] / x.shape[0]


# ------------------------------------------------------------------------------------------------ NCE loss
def test_nce_hand_value():
    # B = 1, K = 1, N = 2: K/N = 0.5; log(1 / 1.5) + log(0.5 / 1.0), negated
    value = crd_nce_loss(torch.tensor([[1.0, 0.5]]), num_samples=2)
    assert value.item() == pytest.approx(-(math.log(1 / 1.5) + math.log(0.5)), rel=1e-6)


@pytest.mark.parametrize('batch,negatives,num_samples', [(4, 16, 100), (64, 4096, 50000), (3, 1, 7)])
def test_nce_matches_the_reference_reductions(batch, negatives, num_samples):
    gen = torch.Generator().manual_seed(batch)
    scores = torch.rand(batch, negatives + 1, generator=gen) * 2
    assert torch.equal(crd_nce_loss(scores, num_samples), reference_nce(scores, num_samples))
    grad = scores.clone().requires_grad_()
    reference = scores.clone().requires_grad_()
    crd_nce_loss(grad, num_samples).backward()
    reference_nce(reference, num_samples).backward()
    torch.testing.assert_close(grad.grad, reference.grad, rtol=1e-5, atol=0)


def test_nce_float32_for_low_precision_input():
    scores = torch.rand(4, 9, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = crd_nce_loss(scores, 50)
    assert low.dtype == torch.float32 and torch.equal(low, crd_nce_loss(scores.float(), 50))


def test_nce_prefers_a_high_positive():
    low = torch.tensor([[0.01] + [1.0] * 8])
    high = torch.tensor([[10.0] + [0.001] * 8])
    assert crd_nce_loss(high, 100) < crd_nce_loss(low, 100)


# ------------------------------------------------------------------------------------------------ negatives
def test_draws_are_uniform_and_a_pure_function_of_key_and_slot():
    keys = mix64(torch.arange(2000))
    draws = uniform_draws(keys, 500, torch.full((2000,), 7))
    assert draws.min() == 0 and draws.max() == 6
    freq = torch.bincount(draws.flatten(), minlength=7).float() / draws.numel()
    assert (freq - 1 / 7).abs().max() < 0.002  # 1M draws: 0.002 is more than 5 standard deviations
    assert torch.equal(uniform_draws(keys[5:9], 500, torch.full((4,), 7)), draws[5:9])
    # neighbouring keys and slots are not correlated
    a, b = draws[:, 0].float(), draws[:, 1].float()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.05


def tiny_crd(targets=None, init_seed=0, criterion=None, **overrides):
    torch.manual_seed(init_seed)
    student = timm.create_model('test_resnet', num_classes=10)
    teacher = timm.create_model('test_resnet', num_classes=10)
    args = distiller_args(**{'seed': 0, **overrides})
    distiller = CRD(student, teacher, criterion or torch.nn.CrossEntropyLoss(), args, (3, 32, 32))
    distiller.set_train_targets(torch.arange(40) % 4 if targets is None else targets)
    return distiller


def test_contrast_indices():
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1, 0, 0, 3, 3])
    distiller = tiny_crd(targets, crd_k=4000)
    index = torch.tensor([0, 4, 6, 10])
    contrast = distiller.contrast_indices(index, epoch=0)
    assert contrast.shape == (4, 4001) and torch.equal(contrast[:, 0], index)
    for row, i in zip(contrast, index):
        negatives = row[1:]
        others = (targets != targets[i]).nonzero().flatten()
        assert (targets[negatives] != targets[i]).all()
        # uniform over every sample of the other classes
        counts = torch.bincount(negatives, minlength=12)[others].float()
        assert counts.min() > 0 and (counts / 4000 - 1 / len(others)).abs().max() < 0.04
    # a function of (seed, epoch, sample): not of the batch it is drawn in
    assert torch.equal(distiller.contrast_indices(index[2:], epoch=0), contrast[2:])
    assert not torch.equal(distiller.contrast_indices(index, epoch=1), contrast)


def test_contrast_indices_change_with_the_seed():
    index = torch.arange(8)
    a = tiny_crd(crd_k=64).contrast_indices(index, epoch=0)
    b = tiny_crd(crd_k=64, seed=1).contrast_indices(index, epoch=0)  # --seed 1
    assert not torch.equal(a, b)
    # --data-seed fixes them whatever --seed is (the bank initialization follows --seed)
    c = tiny_crd(crd_k=64, seed=1, data_seed=0)
    assert torch.equal(c.contrast_indices(index, epoch=0), a)
    assert not torch.equal(c.memory_student, tiny_crd(crd_k=64).memory_student)


# ------------------------------------------------------------------------------------------------ distiller
def test_registered_with_its_declaration():
    assert DISTILLERS['crd'] is CRD and CRD.needs_sample_indices and not CRD.two_view


def test_banks_constants_and_update():
    distiller = tiny_crd(crd_k=16, crd_feat_dim=8)
    bound = 1 / math.sqrt(8 / 3)
    assert distiller.memory_student.shape == distiller.memory_teacher.shape == (40, 8)
    assert distiller.memory_student.abs().max() <= bound and distiller.memory_student.abs().max() > 0.9 * bound
    assert (distiller.normalizers == -1).all()
    state = distiller.distiller_state_dict()
    assert {'memory_student', 'memory_teacher', 'normalizers'} <= set(state)
    assert not {'train_targets', 'class_order'} & set(state)  # derived from the dataset, not saved
    assert 'memory_student' in distiller._ddp_params_and_buffers_to_ignore

    distiller.train()
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    banks_before = distiller.memory_student.clone(), distiller.memory_teacher.clone()
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    index = torch.tensor([8, 13, 2, 39])
    _, losses = distiller(x, y, epoch=0, sample_index=index)
    assert set(losses) == {'loss_gt', 'loss_crd'} and torch.isfinite(losses['loss_crd'])
    # the constants are N x the mean exp-score of the first batch, then fixed
    with torch.no_grad():
        feats_s = distiller.student_forward(x, distiller.request).pre_logits
        feats_t = distiller.teacher_forward(x, distiller.request).pre_logits
    e_s = F.normalize(distiller.embed_student(feats_s), dim=1).detach()
    e_t = F.normalize(distiller.embed_teacher(feats_t), dim=1).detach()
    contrast = distiller.contrast_indices(index, 0)
    exp_s = torch.exp(torch.einsum('bkd,bd->bk', banks_before[1][contrast], e_s) / 0.07)
    exp_t = torch.exp(torch.einsum('bkd,bd->bk', banks_before[0][contrast], e_t) / 0.07)
    torch.testing.assert_close(distiller.normalizers, torch.stack([exp_s.mean(), exp_t.mean()]) * 40)
    expected = crd_nce_loss(exp_s / distiller.normalizers[0], 40) + crd_nce_loss(exp_t / distiller.normalizers[1], 40)
    torch.testing.assert_close(losses['loss_crd'], expected, rtol=1e-5, atol=0)
    # the rows of the batch move to normalize(0.5 * old + 0.5 * new); every other row stays
    for bank, old, embed in ((distiller.memory_student, banks_before[0], e_s),
                             (distiller.memory_teacher, banks_before[1], e_t)):
        torch.testing.assert_close(bank[index], F.normalize(0.5 * old[index] + 0.5 * embed, dim=1))
        rest = torch.ones(40, dtype=torch.bool)
        rest[index] = False
        assert torch.equal(bank[rest], old[rest])
    # gradients reach the student and both embeddings; the teacher is untouched
    sum(losses.values()).backward()
    for name, param in distiller.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert distiller.embed_teacher.weight.grad.abs().sum() > 0
    assert not distiller.teacher.training and all(p.grad is None for p in distiller.teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in distiller.teacher.state_dict().items())
    normalizers = distiller.normalizers.clone()
    distiller(x, y, epoch=0, sample_index=index)
    assert torch.equal(distiller.normalizers, normalizers)


def test_a_step_with_a_non_finite_loss_leaves_the_contrastive_state():
    """train.py keeps no such step, and does not back the banks up (rollback_buffers): the step must not move them.
    A task loss that turns non-finite after the first step leaves the embeddings finite: only the total tells."""
    calls = []

    def criterion(logits, labels):
        calls.append(1)
        loss = F.cross_entropy(logits, labels)
        return loss * float('nan') if len(calls) in (1, 3) else loss

    distiller = tiny_crd(crd_k=16, criterion=criterion).train()
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    index = torch.tensor([8, 13, 2, 39])
    state = {k: v.clone() for k, v in distiller.distiller_state_dict().items()}
    _, losses = distiller(x, y, epoch=0, sample_index=index)  # the first step: the constants are not set either
    assert not torch.isfinite(losses['loss_gt']) and torch.isfinite(losses['loss_crd'])
    assert all(torch.equal(v, state[k]) for k, v in distiller.distiller_state_dict().items())
    distiller(x, y, epoch=0, sample_index=index)  # a finite step moves the rows of the batch and sets the constants
    moved = {k: v.clone() for k, v in distiller.distiller_state_dict().items()}
    assert (moved['normalizers'] > 0).all() and not torch.equal(moved['memory_student'], state['memory_student'])
    distiller(x, y, epoch=0, sample_index=index)
    assert all(torch.equal(v, moved[k]) for k, v in distiller.distiller_state_dict().items())
    # the NaN check backs up every other floating buffer (the BatchNorm statistics), and none of the contrastive state
    backed_up = {id(b) for b in distiller.rollback_buffers()}
    contrastive = {id(distiller.memory_student), id(distiller.memory_teacher), id(distiller.normalizers)}
    running = {id(m.running_mean) for m in distiller.student.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert running and running <= backed_up and not contrastive & backed_up
    every = {id(b) for b in distiller.buffers() if b.is_floating_point()}
    assert backed_up | contrastive == every
    assert {id(b) for b in super(CRD, distiller).rollback_buffers()} == every


def test_state_round_trip_continues_the_same_contrastive_state():
    a = tiny_crd(crd_k=16)
    a.train()
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    a(x, y, epoch=0, sample_index=torch.tensor([0, 1, 2, 3]))
    b = tiny_crd(crd_k=16, init_seed=1)
    b.student.load_state_dict(a.student.state_dict())
    b.teacher.load_state_dict(a.teacher.state_dict())  # the teacher comes from its own checkpoint, not this state
    b.load_distiller_state_dict(a.distiller_state_dict())
    b.train()
    index = torch.tensor([4, 5, 6, 7])
    _, la = a(x, y, epoch=1, sample_index=index)
    _, lb = b(x, y, epoch=1, sample_index=index)
    assert torch.equal(la['loss_crd'], lb['loss_crd'])
    assert torch.equal(a.memory_teacher, b.memory_teacher)


@pytest.mark.parametrize('overrides,fragment', [
    (dict(crd_k=0), '--crd-k'), (dict(crd_feat_dim=0), '--crd-feat-dim'), (dict(crd_momentum=1.0), '--crd-momentum'),
    (dict(crd_temperature=0.0), '--crd-temperature'), (dict(aug_repeats=3), '--aug-repeats'),
])
def test_bad_flags(overrides, fragment):
    with pytest.raises(DistillerError, match=fragment):
        tiny_crd(**overrides)


def test_mixup_is_allowed_with_a_warning(caplog):
    with caplog.at_level('WARNING'):
        tiny_crd(mixup=0.2)
    assert 'positive index' in caplog.text


def test_refusals():
    with pytest.raises(DistillerError, match='other classes'):
        tiny_crd(torch.zeros(10, dtype=torch.long))
    distiller = tiny_crd()
    other = tiny_crd(torch.arange(20) % 4)
    with pytest.raises(DistillerError, match='40'):
        other.load_distiller_state_dict(distiller.distiller_state_dict())
    with pytest.raises(ValueError, match='sample_index'):
        distiller(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_loader_carries_global_sample_indices():
    dataset = SyntheticImageDataset(num_classes=4, num_samples=24, img_size=16)
    assert dataset_targets(dataset) == list(dataset.targets)
    seen = []
    for rank in (0, 1):
        loader = create_train_loader(dataset, lambda img: torch.zeros(1), 4, seed=0, workers=0, rank=rank,
                                     world_size=2, with_index=True)
        for _, labels, index in loader:
            assert labels.tolist() == [dataset.targets[i] for i in index.tolist()]
            seen += index.tolist()
    assert sorted(seen) == list(range(24))  # each rank its own samples, by their index in the whole dataset


# ------------------------------------------------------------------------------------------------ recipes
def test_recipes_build():
    import train
    configs = sorted((REPO / 'configs').rglob('*_crd.yaml'))
    names = {p.name for p in configs}
    for pair in ('resnet32x4_resnet8x4', 'wrn_40_2_wrn_16_2', 'resnet56_resnet20', 'vgg13_cifar_vgg8_cifar',
                 'resnet34_resnet18'):
        assert f'{pair}_crd.yaml' in names, pair
    for path in configs:
        args, _ = train.parse_args(['-c', str(path)])
        assert (args.crd_k, args.crd_feat_dim, args.crd_temperature, args.crd_momentum) == (16384, 128, 0.07, 0.5)
        assert args.gt_loss_weight == 1.0 and args.kd_loss_weight == 0.8
        torch.manual_seed(0)
        distiller = CRD(timm.create_model('test_resnet', num_classes=10),
                        timm.create_model('test_resnet', num_classes=10), torch.nn.CrossEntropyLoss(), args,
                        (3, 32, 32))
        distiller.set_train_targets(torch.arange(64) % 10)
        _, losses = distiller.train()(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]),
                                      sample_index=torch.tensor([0, 1]))
        assert math.isfinite(losses['loss_crd'].item()), path.name


# ------------------------------------------------------------------------------------------------ end to end
CRD_ARGS = ['--model', 'test_resnet', '--teacher', 'test_resnet', '--distiller', 'crd', '--crd-k', '64',
            '--synthetic-train-size', '64', '--synthetic-val-size', '32', '--batch-size', '16', '--opt', 'adamw',
            '--lr', '1e-3', '--warmup-epochs', '0', '--scale', '0.5', '1.0', '--deterministic']


def final_state(run_dir):
    return torch.load(run_dir / 'checkpoint' / 'last.pth.tar', weights_only=True)


@pytest.mark.e2e
def test_resume_continues_the_same_contrastive_state(tmp_path):
    _, straight = run_train(tmp_path, *CRD_ARGS, '--epochs', '2', experiment='straight')
    rows = read_summary(straight)
    for key in ('loss', 'loss_gt', 'loss_crd'):
        assert all(math.isfinite(float(r[f'train_{key}'])) for r in rows), key
    run_train(tmp_path, *CRD_ARGS, '--epochs', '1', experiment='halves')
    proc, halves = run_train(tmp_path, *CRD_ARGS, '--epochs', '2', '--resume',
                             tmp_path / 'halves' / 'checkpoint' / 'last.pth.tar', experiment='halves')
    assert 'Resumed from' in proc.stdout
    a, b = final_state(straight), final_state(halves)
    assert {'memory_student', 'memory_teacher', 'normalizers', 'embed_student.weight'} <= set(a['distiller_state'])
    assert (a['distiller_state']['normalizers'] > 0).all()
    for key in ('state_dict', 'distiller_state'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert [r['train_loss_crd'] for r in rows] == [r['train_loss_crd'] for r in read_summary(halves)]


def tensorboard_losses(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / 'tb'))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars('train/loss_crd')}


@pytest.mark.e2e
@pytest.mark.ddp
def test_two_processes_keep_one_bank(tmp_path):
    """Two ranks of 8 see the same samples per step as one process of 16 (a LayerNorm student has no batch
    statistics): the same losses, and rank 0's banks hold both ranks' updates."""
    common = [*SYNTHETIC_ARGS, '--model', 'test_vit', '--teacher', 'test_vit', '--distiller', 'crd', '--crd-k', '32',
              '--epochs', '1', '--no-aug', '--smoothing', '0', '--synthetic-train-size', '64',
              '--synthetic-val-size', '32', '--warmup-epochs', '0', '--lr', '0.01', '--log-interval', '1']
    run_script('train.py', *common, '--batch-size', '16', '--output', tmp_path, '--experiment', 'one')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29541',
           str(REPO / 'train.py'), *common, '--batch-size', '8', '--output', str(tmp_path), '--experiment', 'two']
    multi = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = tensorboard_losses(tmp_path / 'one'), tensorboard_losses(tmp_path / 'two')
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    a, b = final_state(tmp_path / 'one'), final_state(tmp_path / 'two')
    for name in ('memory_student', 'memory_teacher', 'normalizers'):
        torch.testing.assert_close(b['distiller_state'][name], a['distiller_state'][name], rtol=1e-4, atol=1e-5)
