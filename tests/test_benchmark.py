"""benchmark.py: its three modes run end to end on tiny settings, and the pieces its numbers rest on are right."""
import argparse
import contextlib
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

import benchmark
from tests.helpers import run_script


# ---------------------------------------------------------------------------------------------- DCT reference
def test_dct_matrix_is_orthonormal_dct_ii():
    n = 5
    d = benchmark.dct_matrix(n, 'cpu', torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    # hand-worked entries of the orthonormal DCT-II: row 0 is 1/sqrt(n); D[1, 0] = sqrt(2/n) cos(pi / (2n))
    assert torch.allclose(d[0], torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64))
    assert d[1, 0].item() == pytest.approx(math.sqrt(2 / n) * math.cos(math.pi / (2 * n)), rel=1e-12)
    assert d[2, 1].item() == pytest.approx(math.sqrt(2 / n) * math.cos(3 * 2 * math.pi / (2 * n)), rel=1e-12)


def test_dct_dc_part_is_the_mean_and_ac_the_rest():
    """Keeping only coefficient (0, 0) and inverting gives the spatial mean everywhere (ufd.md §4.2)."""
    x = torch.randn(2, 3, 4, 6)
    dct = benchmark.DctUfdLoss(3, 4, 6, 'cpu')
    dc, ac = dct._spatial_parts(x)
    assert torch.allclose(dc, x.mean(dim=(2, 3), keepdim=True).expand_as(x), atol=1e-6)
    assert torch.allclose(ac, x - x.mean(dim=(2, 3), keepdim=True), atol=1e-5)
    dc, ac = dct._channel_parts(x)
    tokens = x.flatten(2).transpose(1, 2)
    assert torch.allclose(dc, tokens.mean(dim=2, keepdim=True).expand_as(tokens), atol=1e-6)
    assert torch.allclose(ac, tokens - tokens.mean(dim=2, keepdim=True), atol=1e-5)


def test_dct_losses_by_hand():
    """One sample, C=2, a 1x2 map: every vector written out."""
    s = torch.tensor([[[[1., 3.]], [[0., 2.]]]])  # s at the two positions: (1, 0) and (3, 2)
    t = torch.tensor([[[[2., 2.]], [[1., -1.]]]])  # t: (2, 1) and (2, -1)
    dct = benchmark.DctUfdLoss(2, 1, 2, 'cpu')
    sp_dc, sp_ac = dct.spatial(s, t)
    # spatial means: s (2, 1), t (2, 0); DC counted at both positions
    u, v = F.normalize(torch.tensor([2., 1.]), dim=0), torch.tensor([1., 0.])
    assert sp_dc.item() == pytest.approx(2 * (u - v).pow(2).sum().item(), rel=1e-5)
    # AC: s - mean = (-1, -1), (1, 1); t - mean = (0, 1), (0, -1)
    r = 1 / math.sqrt(2)
    expected_ac = ((-r - 0) ** 2 + (-r - 1) ** 2) + ((r - 0) ** 2 + (r + 1) ** 2)
    assert sp_ac.item() == pytest.approx(expected_ac, rel=1e-5)
    ch_dc, ch_ac = dct.channel(s, t)
    # channel means per position: s (0.5, 2.5), t (1.5, 0.5); counted once per channel (C = 2)
    a, b = F.normalize(torch.tensor([0.5, 2.5]), dim=0), F.normalize(torch.tensor([1.5, 0.5]), dim=0)
    assert ch_dc.item() == pytest.approx(2 * (a - b).pow(2).sum().item(), rel=1e-5)
    # AC: channel 0 of s minus token means: (0.5, 0.5), channel 1: (-0.5, -0.5); t: (0.5, 1.5), (-0.5, -1.5)
    p, q = F.normalize(torch.tensor([0.5, 0.5]), dim=0), F.normalize(torch.tensor([0.5, 1.5]), dim=0)
    assert ch_ac.item() == pytest.approx(2 * (p - q).pow(2).sum().item(), rel=1e-5)


def test_dct_formulation_matches_the_closed_form():
    from distillers.ufd import channel_decoupled_loss, spatial_decoupled_loss
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 8, 3, 5, generator=gen), torch.randn(3, 8, 3, 5, generator=gen)
    dct = benchmark.DctUfdLoss(8, 3, 5, 'cpu')
    for mine, closed in zip((*dct.spatial(s, t), *dct.channel(s, t)),
                            (*spatial_decoupled_loss(s, t), *channel_decoupled_loss(s, t))):
        assert mine.item() == pytest.approx(closed.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- measuring
def test_peak_memory_sees_a_large_temporary():
    meter = benchmark.PeakMemory(torch.device('cpu'))
    if not meter.available:
        pytest.skip('peak RSS cannot be reset on this system')
    size = 96 * 2 ** 20

    def allocate():
        x = torch.ones(size // 4)  # 96 MiB, touched
        return float(x[-1])
    peak = meter.measure(allocate)
    assert 0.9 * size < peak < 1.5 * size
    assert meter.measure(lambda: None) < 0.2 * size


def test_round_robin_times_every_variant_every_round():
    calls = []
    variants = [benchmark.Variant(name, 'x', lambda name=name: calls.append(name)) for name in 'abc']
    benchmark.time_round_robin(variants, warm=1, iters=4, rounds=2, device=torch.device('cpu'))
    assert [len(v.round_ms) for v in variants] == [2, 2, 2]
    assert calls[:3] == ['a', 'b', 'c']  # warm-up
    timed = calls[3:]
    assert len(timed) == 3 * 4
    assert timed[:6] == ['a', 'a', 'b', 'b', 'c', 'c'] and timed[6:] == ['b', 'b', 'c', 'c', 'a', 'a']


def test_results_rows_means_gains_and_failures():
    def run(top1, status='ok', wall=10.0):
        r = benchmark.TrainRun('k', '/nonexistent', [], 1)
        r.status, r.top1, r.best_top1, r.wall_s = status, top1, top1, wall
        return r
    teachers = {('t', ()): run(90.0)}
    table = {('vanilla', '- -> s', 's'): [run(50.0), run(54.0)], ('kd', 't -> s', 's'): [run(60.0), run(61.0)],
             ('ufd', 't -> s', 's'): [run(None, 'not implemented')], ('vanilla', '- -> v', 'v'): [run(70.0)],
             ('ufd', 't -> v', 'v'): [run(75.0)]}
    rows = benchmark.results_rows(teachers, table)
    assert [r['method'] for r in rows] == ['teacher', 'vanilla', 'kd', 'ufd', 'vanilla', 'ufd']
    assert rows[-1]['gain'] == 5.0 and rows[-2]['gain'] == 0.0  # over the vanilla run of the same student
    teacher, vanilla, kd, ufd = rows[:4]
    assert teacher['top1_mean'] == 90.0 and teacher['gain'] is None
    assert vanilla['top1_mean'] == 52.0 and vanilla['gain'] == 0.0
    assert vanilla['top1_std'] == pytest.approx(math.sqrt(8), abs=0.01)
    assert kd['gain'] == pytest.approx(60.5 - 52.0) and kd['top1_std'] == pytest.approx(math.sqrt(0.5), abs=0.01)
    assert ufd['top1_mean'] is None and ufd['gain'] is None and ufd['status'] == 'not implemented'
    assert rows[-1]['top1_std'] is None  # one seed: no spread


def test_finished_run_is_reused_only_with_the_same_command_and_config(tmp_path):
    config = tmp_path / 'c.yaml'
    config.write_text('epochs: 2\n')
    run = benchmark.TrainRun('k', tmp_path / 'run', ['-c', str(config), '--seed', '0'], 2)
    run.run_dir.mkdir()
    (run.run_dir / 'benchmark_run.json').write_text(json.dumps(
        {'fingerprint': run.fingerprint, 'status': 'ok', 'top1': 61.5, 'best_top1': 62.0, 'wall_s': 3.0}))
    assert run.finished() and run.top1 == 61.5 and run.status == 'ok'
    other_seed = benchmark.TrainRun('k', tmp_path / 'run', ['-c', str(config), '--seed', '1'], 2)
    assert not other_seed.finished()
    config.write_text('epochs: 3\n')
    edited = benchmark.TrainRun('k', tmp_path / 'run', ['-c', str(config), '--seed', '0'], 2)
    assert not edited.finished()


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_train_bench_two_distillers(tmp_path):
    out = tmp_path / 'bench.json'
    proc = run_script('benchmark.py', '--model', 'test_resnet', '--teacher', 'test_resnet', '--distiller', 'vanilla',
                      'kd', 'fitnet', 'vitkd', '--img-size', '32', '-b', '4', '--num-classes', '10',
                      '--num-warm-iter', '1', '--num-bench-iter', '2', '--rounds', '2', '--device', 'cpu',
                      '--results-file', out)
    assert 'overhead' in proc.stdout
    rows = {r['variant']: r for r in json.loads(out.read_text())}
    # the teacher forward as the distillers run it (inference_mode), and under no_grad for the comparison
    assert {'student', 'teacher:logits@inference_mode', 'teacher:logits@no_grad', 'timm_kd', 'kd', 'fitnet',
            'vitkd'} <= set(rows)
    for name in ('student', 'teacher:logits@inference_mode', 'teacher:logits@no_grad', 'timm_kd', 'kd', 'fitnet'):
        assert rows[name]['step_ms'] > 0 and rows[name]['samples_per_sec'] > 0, name
    kd, fitnet = rows['kd'], rows['fitnet']
    assert kd['teacher_request'] == 'logits' and kd['teacher_calls'] == 1
    assert kd['teacher_grad_mode'] == 'inference_mode'
    assert kd['teacher_fwd_ms'] == kd['teacher_fwd_inference_mode_ms'] \
        == rows['teacher:logits@inference_mode']['step_ms']
    assert kd['teacher_fwd_no_grad_ms'] == rows['teacher:logits@no_grad']['step_ms']
    assert kd['overhead'] == pytest.approx(kd['step_ms'] / (rows['student']['step_ms'] + kd['teacher_fwd_ms']),
                                           abs=2e-3)
    assert kd['vs_timm'] == pytest.approx(kd['step_ms'] / rows['timm_kd']['step_ms'], abs=2e-3)
    assert kd['extra_params_m'] == 0 and kd['distiller_gflops_per_img'] == 0 and kd['overhead_net'] == kd['overhead']
    assert kd['student_gflops_per_img'] == kd['teacher_gflops_per_img'] > 0  # the same architecture
    # fitnet regresses stage maps: the teacher returns them, and its regressors are extra parameters
    assert fitnet['teacher_request'].startswith('logits+stages=') and fitnet['extra_params_m'] > 0
    own = fitnet['distiller_gflops_per_img'] / fitnet['student_gflops_per_img']
    assert fitnet['overhead_net'] == pytest.approx(fitnet['step_ms'] / (
        rows['student']['step_ms'] * (1 + own) + fitnet['teacher_fwd_ms']), rel=1e-2)
    assert fitnet['vs_timm'] is None
    # the modules' measured cost: the own:fitnet row times them alone, and `net timed` adds that time instead
    assert kd['own_modules_ms'] == 0 and kd['overhead_net_timed'] == kd['overhead'] and 'own:kd' not in rows
    assert fitnet['own_modules_ms'] == rows['own:fitnet']['step_ms'] > 0
    assert fitnet['overhead_net_timed'] == pytest.approx(fitnet['step_ms'] / (
        rows['student']['step_ms'] + fitnet['teacher_fwd_ms'] + fitnet['own_modules_ms']), abs=2e-3)
    assert rows['vitkd']['status'].startswith('unsupported:')
    # the rest: vanilla's step is the student step exactly; kd adds its loss (softmaxes of two logit rows);
    # fitnet adds its squared errors over the regressed maps (a subtraction, its norm, the gradient's multiply)
    assert (rows['vanilla']['rest_ops'], rows['vanilla']['rest_bytes']) == (0, 0)
    assert kd['rest_ops'] > 0 and '_log_softmax' in kd['rest_top'] and 0 < kd['rest_bytes'] < 10_000
    assert fitnet['rest_ops'] > 0 and fitnet['rest_bytes'] > 0 and 'sub' in fitnet['rest_top']
    assert 'rest ops/MiB' in proc.stdout and 'The rest, the three operations with the most bytes' in proc.stdout


@pytest.mark.e2e
def test_ufd_loss_bench(tmp_path):
    out = tmp_path / 'ufd.csv'
    run_script('benchmark.py', '--bench', 'ufd-loss', '-b', '2', '--ufd-channels', '16', '--ufd-grids', '3', '4',
               '--num-warm-iter', '0', '--num-bench-iter', '1', '--rounds', '1', '--device', 'cpu',
               '--results-file', out)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r['grid'], r['mode']) for r in rows] == [('3x3', 'fwd'), ('3x3', 'fwd_bwd'), ('4x4', 'fwd'),
                                                     ('4x4', 'fwd_bwd')]
    for r in rows:
        assert float(r['max_rel_diff']) < 1e-4
        assert float(r['speedup']) == pytest.approx(float(r['dct_ms']) / float(r['closed_form_ms']), rel=0.02)
    for fwd, fwd_bwd in (rows[:2], rows[2:]):
        for key in ('closed_form_ops', 'dct_ops'):
            assert 0 < int(fwd[key]) < int(fwd_bwd[key])


@pytest.mark.e2e
def test_loader_bench_times_train_py_loader_on_generated_jpegs(tmp_path):
    out = tmp_path / 'loader.json'
    proc = run_script('benchmark.py', '--bench', 'loader', '-b', '4', '--img-size', '32', '--loader-batches', '2',
                      '--loader-workers', '0', '1', '--device', 'cpu', '--train-args', '--hflip 0 --seed 3',
                      '--results-file', out)
    assert 'img/s' in proc.stdout and 'generated JPEG folder' in proc.stdout
    rows = json.loads(out.read_text())
    assert [(r['workers'], r['pin_memory'], r['persistent_workers']) for r in rows] == [(0, False, False),
                                                                                      (1, False, True)]
    for r in rows:
        assert r['img_size'] == 32 and r['batch_size'] == 4 and r['timed_batches'] == 4  # 2 per epoch, 2 epochs
        assert r['first_batch_s_epoch1'] > 0 and r['first_batch_s_epoch2'] > 0
        # img/s and ms/batch are the same timing: their product is the batch size
        assert r['img_per_sec'] * r['batch_ms'] / 1000 == pytest.approx(4, rel=0.02)


@pytest.mark.e2e
def test_loader_bench_takes_train_py_flags_from_train_args(tmp_path):
    """The same flag in --train-args wins over the benchmark's, as on train.py's command line; a dataset larger
    than the timed batches is read from a mid-epoch start, so each epoch ends at its last timed batch."""
    out = tmp_path / 'loader.json'
    run_script('benchmark.py', '--bench', 'loader', '--dataset', 'synthetic', '-b', '4', '--img-size', '32',
               '--loader-batches', '2', '--loader-workers', '1', '--device', 'cpu',
               '--train-args=-b 3 --img-size 24 --synthetic-train-size 60', '--results-file', out)
    row, = json.loads(out.read_text())
    assert (row['batch_size'], row['img_size'], row['timed_batches'], row['source']) == (3, 24, 4, 'synthetic')


@pytest.mark.e2e
@pytest.mark.parametrize('train_args, message', [
    ('--bogus-flag 1', 'unknown flag --bogus-flag'),
    ('--synthetic-train-size 6', 'has 6 training images, fewer than two batches of 4; lower --batch-size'),
    ('--aa bogus', "the training augmentation cannot be built (--aa 'bogus'"),
    ('--hflip "0.5', 'cannot be split into arguments'),
    ('--model no_such_net', "unknown model 'no_such_net'"),
])
def test_loader_bench_errors_are_one_clear_sentence(tmp_path, train_args, message):
    proc = run_script('benchmark.py', '--bench', 'loader', '--dataset', 'synthetic', '-b', '4', '--img-size', '32',
                      '--loader-workers', '0', '--device', 'cpu', '--train-args', train_args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and 'Traceback' not in proc.stderr


def test_generated_jpeg_folder_is_an_imagenet_style_dataset(tmp_path):
    from PIL import Image
    from data import create_datasets
    from data.synthetic import write_jpeg_folder
    write_jpeg_folder(tmp_path, 6, 3, num_classes=3, size=(50, 40))
    assert sorted(p.name for p in (tmp_path / 'train').iterdir()) == ['class0', 'class1', 'class2']
    files = sorted((tmp_path / 'train').rglob('*.jpg'))
    assert len(files) == 6 and len(list((tmp_path / 'val').rglob('*.jpg'))) == 3
    with Image.open(files[0]) as img:
        assert img.format == 'JPEG' and img.size == (50, 40) and img.mode == 'RGB'
    args = argparse.Namespace(dataset='', data_dir=str(tmp_path), train_split='train', val_split='val')
    train, val, classes = create_datasets(args)
    assert (len(train), len(val), classes) == (6, 3, 3)


def test_own_work_includes_teacher_modules_run_with_autograd():
    """ScaleKD passes projected student features through the teacher's last stage with autograd on: the method's
    own work, replayed in its own: row. The teacher's own forward (inference mode) is not; UFD has no such pass."""
    from tests.test_scalekd import batch, build as build_scalekd
    from tests.test_ufd import build as build_ufd
    images, labels = batch()
    scalekd = build_scalekd()
    calls = benchmark.capture_own_module_calls(scalekd, images, labels, contextlib.nullcontext)
    teacher_modules = set(scalekd.teacher.modules())
    through_teacher = [module for module, _, _ in calls if module in teacher_modules]
    assert through_teacher
    assert scalekd.teacher.layers[-1] in through_teacher  # Swin: the last stage, as TeacherLastStage runs it
    assert scalekd.teacher.patch_embed not in through_teacher
    assert len(calls) > len(through_teacher)  # and the projectors
    ufd = build_ufd(student='test_resnet', teacher='test_resnet')
    calls = benchmark.capture_own_module_calls(ufd, images, labels, contextlib.nullcontext)
    assert calls and not any(module in set(ufd.teacher.modules()) for module, _, _ in calls)
    # the task loss is the student's work (timed in the student step), not the method's
    assert ufd.criterion not in {module for module, _, _ in calls}
    # the replay runs forward and backward through them alone
    benchmark.own_modules_step_fn(scalekd, benchmark.capture_own_module_calls(
        scalekd, images, labels, contextlib.nullcontext), contextlib.nullcontext)()


def test_own_row_updates_exactly_the_methods_parameters_and_leaves_them_unchanged():
    """The own: row ends with the optimizer's update of the method's own parameters: the distill optimizer's
    groups (settings kept) without the student's, at learning rate 0, since those parameters are shared with the
    distill row."""
    from tests.test_ufd import batch, build as build_ufd, ufd_args
    from distillers.kd import KD
    images, labels = batch()
    ufd = build_ufd('test_resnet', 'test_resnet')
    args = benchmark.build_parser().parse_args(['--opt', 'adamw'])
    optimizer = benchmark.make_optimizer(ufd, args)
    own = benchmark.own_parameter_optimizer(optimizer, ufd, args)
    student = {id(p) for p in ufd.student.parameters()}
    own_params = [p for group in own.param_groups for p in group['params']]
    assert {id(p) for p in own_params} == {id(p) for p in ufd.parameters() if p.requires_grad} - student
    assert type(own) is type(optimizer) and all(group['lr'] == 0 for group in own.param_groups)
    # weight decay as in the distill step: projector weights decayed, biases, norms and query tokens not
    decay = {id(p): group['weight_decay'] for group in optimizer.param_groups for p in group['params']}
    assert all(group['weight_decay'] == decay[id(p)] for group in own.param_groups for p in group['params'])
    assert {group['weight_decay'] for group in own.param_groups} == {0.0, 2e-5}
    before = [p.detach().clone() for p in own_params]
    calls = benchmark.capture_own_module_calls(ufd, images, labels, contextlib.nullcontext)
    benchmark.own_modules_step_fn(ufd, calls, contextlib.nullcontext, own)()
    assert len(own.state) == len(own_params)  # the update ran on every own parameter (AdamW's moments exist)
    assert all(torch.equal(b, p) for b, p in zip(before, own_params))
    assert all(p.grad is None for p in own_params)
    kd = KD(ufd.student, ufd.teacher, torch.nn.CrossEntropyLoss(), ufd_args(), (3, 64, 64))
    assert benchmark.own_parameter_optimizer(benchmark.make_optimizer(kd, args), kd, args) is None


@pytest.mark.parametrize('opt', ['adamc', 'sgdc', 'madgrad'])
def test_own_row_optimizer_never_moves_the_shared_parameters(opt, caplog):
    """Optimizers that refuse a learning rate of 0 at construction (timm's corrected-decay ones) are built at --lr
    and set to 0; one whose lr-0 step still moves parameters (MADGRAD: lr + eps) gets no update row, with a
    warning, and the trial step is undone."""
    from tests.test_ufd import batch, build as build_ufd
    images, labels = batch()
    ufd = build_ufd('test_resnet', 'test_resnet')
    args = benchmark.build_parser().parse_args(['--opt', opt])
    before = {n: p.detach().clone() for n, p in ufd.named_parameters()}
    own = benchmark.own_parameter_optimizer(benchmark.make_optimizer(ufd, args), ufd, args)
    if opt == 'madgrad':
        assert own is None and 'changes parameters at learning rate 0' in caplog.text
    else:
        assert own is not None and all(group['lr'] == 0 for group in own.param_groups)
        calls = benchmark.capture_own_module_calls(ufd, images, labels, contextlib.nullcontext)
        step = benchmark.own_modules_step_fn(ufd, calls, contextlib.nullcontext, own)
        step()
        step()
        assert own.state
    assert all(torch.equal(before[n], p) and p.grad is None for n, p in ufd.named_parameters())


def test_op_ledger_counts_bytes_of_arguments_and_results():
    a, b = torch.randn(10, 100), torch.randn(10, 100, dtype=torch.float64)

    def work():
        c = a + b  # float32 + float64 -> float64: 4000 + 8000 read, 8000 written
        d = torch.empty_like(c)  # an allocation: counted as an operation, no bytes
        torch.mul(c, 2, out=d)  # 8000 read, 8000 written (`out` is an argument and the result, counted once)
        d.add_(1)  # in place: d read and written, 16000
        return d.view(-1).sum()  # the view is free; the sum reads 8000 and writes one float64

    ledger = benchmark.op_ledger(work)
    assert dict(ledger.ops) == {'add': 1, 'empty_like': 1, 'mul': 1, 'add_': 1, 'sum': 1} and ledger.count == 5
    assert dict(ledger.bytes) == {'add': 20000, 'mul': 16000, 'add_': 16000, 'sum': 8008}
    # in place by the schema, not by the name: a list updated in place is read and written; `__lshift__` is not
    params, shifts, by = [torch.zeros(10), torch.zeros(5)], torch.arange(1000), torch.ones(1000, dtype=torch.long)
    assert dict(benchmark.op_ledger(lambda: torch._foreach_add_(params, 1.0)).bytes) == {'_foreach_add_': 120}
    assert dict(benchmark.op_ledger(lambda: shifts << by).bytes) == {'__lshift__': 24000}
    # calls that touch no tensor launch nothing
    assert benchmark.op_ledger(lambda: torch.promote_types(torch.bfloat16, torch.float32)).count == 0
    rest = benchmark.ledger_rest(ledger, [benchmark.op_ledger(lambda: a + b)])
    assert rest[:2] == (4, 40008) and rest[2] == 'add_ +1 (+0.0 MiB), mul +1 (+0.0 MiB), sum +1 (+0.0 MiB)'


def test_op_counter_counts_operations_not_views():
    x = torch.randn(4, 6, requires_grad=True)
    assert benchmark.count_ops(lambda: (x * 2).view(24).sum()) == 2  # mul, sum; the view is free
    # the backward's operations count too
    assert benchmark.count_ops(lambda: (x * 2).view(24).sum().backward()) > 2


@pytest.mark.e2e
def test_results_quick_two_methods(tmp_path):
    out = tmp_path / 'table.csv'
    proc = run_script('benchmark.py', '--bench', 'results', '--quick', '--methods', 'kd', 'uskd', '--pairs', 'cnn',
                      '--cnn-pair', 'test_resnet', 'test_resnet', '--epochs', '1',
                      '--teacher-epochs', '1', '--jobs', '2', '--output', tmp_path / 'runs', '--results-file', out,
                      '--train-args', '--synthetic-train-size 64 --synthetic-val-size 32 --img-size 32 '
                      '--batch-size 16 --synthetic-classes 4', timeout=900)
    with open(out) as f:
        rows = {r['method']: r for r in csv.DictReader(f)}
    assert set(rows) == {'teacher', 'vanilla', 'kd', 'uskd'}
    assert rows['teacher']['pair'] == 'test_resnet (teacher)'
    for name, row in rows.items():
        assert row['status'] == 'ok', (name, row['status'])
        assert 0 <= float(row['top1_mean']) <= 100 and float(row['wall_s']) > 0
        assert row['runs'] == '1' and row['top1_std'] == ''  # one seed: no spread
    vanilla = float(rows['vanilla']['top1_mean'])
    for name in ('kd', 'uskd'):
        assert float(rows[name]['gain']) == pytest.approx(float(rows[name]['top1_mean']) - vanilla, abs=0.011)
    assert rows['kd']['pair'] == 'test_resnet -> test_resnet' and rows['uskd']['pair'] == '- -> test_resnet'
    table = (tmp_path / 'runs' / 'results.md').read_text()
    assert '| method | teacher -> student | top-1 (mean ± std) |' in table
    assert 'benchmark.py --bench results --quick' in table and table in proc.stdout
