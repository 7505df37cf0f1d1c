"""benchmark.py: it times train.py's own step with train.py's flags, and the numbers it reports rest on the right
measurements."""
import json
import math

import pytest
import torch
import torch.nn as nn

import benchmark
import train
from tests.helpers import run_script

TINY = ['--model', 'test_resnet', '--teacher', 'test_resnet', '--img-size', '32', '-b', '4', '--num-classes', '10',
        '--device', 'cpu', '--num-warm-iter', '1', '--num-bench-iter', '1', '--no-flops', '--no-memory']


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


# ---------------------------------------------------------------------------------------------- train.py's step
def test_flags_it_does_not_know_are_train_py_flags_with_train_py_defaults(tmp_path):
    args, targs = benchmark.parse_args(['--distiller', 'kd', 'fitnet', '--opt', 'adamw', '--no-nan-check'])
    assert args.distiller == ['kd', 'fitnet'] and args.rounds == args.num_bench_iter == 10
    assert (targs.opt, targs.nan_check) == ('adamw', False)
    defaults, _ = train.parse_args([])
    assert (targs.batch_size, targs.weight_decay, targs.momentum, targs.smoothing, targs.clip_grad) == \
        (defaults.batch_size, defaults.weight_decay, defaults.momentum, defaults.smoothing, defaults.clip_grad)
    config = tmp_path / 'c.yaml'
    config.write_text('opt: lamb\nbatch_size: 6\nkd_temperature: 4.0\n')
    _, targs = benchmark.parse_args(['-c', str(config), '-b', '8'])
    assert (targs.opt, targs.batch_size, targs.kd_temperature) == ('lamb', 8, 4.0)  # CLI over YAML, as train.py
    assert benchmark.parse_args(['--distiller', 'all'])[0].distiller == list(benchmark.DISTILLERS)


def test_every_variant_runs_train_py_train_step_with_train_py_optimizer(monkeypatch):
    calls = []
    real_step = train.train_step

    def recording(model, images, labels, epoch, optimizer, loss_scaler, amp_autocast, args, parameters, **kw):
        calls.append((type(model).__name__, type(optimizer).__name__, optimizer.param_groups[0]['lr'],
                      kw.get('step_flags') is not None, images.shape[0]))
        return real_step(model, images, labels, epoch, optimizer, loss_scaler, amp_autocast, args, parameters, **kw)
    monkeypatch.setattr(train, 'train_step', recording)
    args, targs = benchmark.parse_args(TINY + ['--distiller', 'kd', 'mlkd', '--opt', 'adamw', '--lr', '0.01'])
    rows, _ = benchmark.bench_train(args, targs)
    # warm-up + timed steps of the student, kd, mlkd and timm's task, each with train.py's optimizer from the flags
    models = [c[0] for c in calls]
    assert {'Vanilla', 'KD', 'MLKD', 'TimmTaskAdapter'} == set(models)
    assert all(c[1] == 'AdamW' and c[2] == 0.01 and c[3] for c in calls)  # --nan-check on: StepFlags passed
    # mlkd declares two views: its step gets 2B images, the others B
    assert {c[4] for c in calls if c[0] == 'MLKD'} == {8} and {c[4] for c in calls if c[0] != 'MLKD'} == {4}
    names = [r['variant'] for r in rows]
    assert 'teacher:logits[2 views]@inference_mode' in names and 'teacher:logits@inference_mode' in names


def test_distiller_batch_follows_the_declarations():
    class Declared(nn.Module):
        two_view, needs_sample_indices = True, True

        def set_train_targets(self, targets):
            self.targets = targets
    images, labels = torch.randn(3, 3, 8, 8), torch.tensor([2, 0, 1])
    d = Declared()
    batch_images, batch_labels, extras = benchmark.distiller_batch(d, images, labels, dataset_size=10)
    assert batch_images.shape == (6, 3, 8, 8) and torch.equal(batch_images[:3], images)
    assert torch.equal(batch_images[3:], images.flip(-1)) and batch_labels is labels
    assert torch.equal(extras['sample_index'], torch.arange(3))
    assert len(d.targets) == 10 and d.targets[:3] == [2, 0, 1] and all(0 <= t <= 2 for t in d.targets)
    d.two_view = d.needs_sample_indices = False
    plain = benchmark.distiller_batch(d, images, labels, dataset_size=10)
    assert plain[0] is images and plain[2] == {}


def test_a_non_finite_step_stops_the_benchmark_as_it_stops_training():
    """The timed step is train.py's: its NaN check raises NonFiniteLoss."""
    model = nn.Linear(4, 2)

    def forward(images, labels, epoch=0):
        return None, {'loss_gt': model(images).sum() * float('nan')}
    args, targs = benchmark.parse_args([])
    step = benchmark.train_step_fn(forward, model, (torch.randn(2, 4), torch.zeros(2), {}), targs,
                                   torch.device('cpu'))
    with pytest.raises(train.NonFiniteLoss, match='loss component loss_gt is not finite'):
        step()


@pytest.mark.parametrize('argv, message', [
    (['--distiller', 'nope'], "unknown distiller 'nope'"),
    (['--bogus-flag', '1'], 'unknown flag --bogus-flag'),
    (['--rounds', '0'], '--rounds and --num-bench-iter must be at least 1'),
])
def test_errors_are_one_sentence_and_exit_2(capsys, argv, message):
    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('benchmark.py: error: ') and message in err and 'Traceback' not in err


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
        assert rows[name]['samples_per_sec'] == pytest.approx(4000 / rows[name]['step_ms'], rel=1e-3)
    kd, fitnet = rows['kd'], rows['fitnet']
    assert kd['teacher_request'] == 'logits' and kd['teacher_calls'] == 1
    assert kd['teacher_grad_mode'] == 'inference_mode'
    assert kd['teacher_fwd_ms'] == kd['teacher_fwd_inference_mode_ms'] \
        == rows['teacher:logits@inference_mode']['step_ms']
    assert kd['teacher_fwd_no_grad_ms'] == rows['teacher:logits@no_grad']['step_ms']
    assert kd['overhead'] == pytest.approx(kd['step_ms'] / (rows['student']['step_ms'] + kd['teacher_fwd_ms']),
                                           abs=2e-3)
    assert kd['overhead_paired_min'] <= kd['overhead_paired_median'] <= kd['overhead_paired_max']
    assert kd['vs_timm'] == pytest.approx(kd['step_ms'] / rows['timm_kd']['step_ms'], abs=2e-3)
    assert kd['extra_params_m'] == 0 and kd['distiller_gflops_per_img'] == 0 and kd['overhead_net'] == kd['overhead']
    assert kd['student_gflops_per_img'] == kd['teacher_gflops_per_img'] > 0  # the same architecture
    # fitnet regresses stage maps: the teacher returns them, and its regressors are extra parameters
    assert fitnet['teacher_request'].startswith('logits+stages=') and fitnet['extra_params_m'] > 0
    own = fitnet['distiller_gflops_per_img'] / fitnet['student_gflops_per_img']
    assert fitnet['overhead_net'] == pytest.approx(fitnet['step_ms'] / (
        rows['student']['step_ms'] * (1 + own) + fitnet['teacher_fwd_ms']), rel=1e-2)
    assert fitnet['vs_timm'] is None
    # vanilla has no teacher: its overhead is over the student step alone
    assert rows['vanilla']['teacher_fwd_ms'] == 0 and rows['vanilla']['teacher_calls'] == 0
    assert rows['vitkd']['status'].startswith('unsupported:')


def test_cached_rows_time_kd_from_a_cache_and_the_cache_writer(monkeypatch):
    loaded = []
    real_load = benchmark.CachedTeacher.load_batch

    def recording(self, epoch, positions, device):
        loaded.append((epoch, positions.tolist()))
        return real_load(self, epoch, positions, device)
    monkeypatch.setattr(benchmark.CachedTeacher, 'load_batch', recording)
    args, targs = benchmark.parse_args(TINY + ['--distiller', 'vanilla', '--no-peer', '--cached', '--cache-topk', '3',
                                              '--num-bench-iter', '2'])
    rows, _ = benchmark.bench_train(args, targs)
    rows = {r['variant']: r for r in rows}
    kd, writer, alone = rows['kd@cache'], rows['cache_writer'], rows['teacher:logits@inference_mode[alone]']
    assert kd['kind'] == writer['kind'] == alone['kind'] == 'cached'
    # every kd@cache step (1 warm-up, 2 timed) read the batch's records through train.py's per-step call
    assert loaded == [(0, [0, 1, 2, 3])] * 3
    assert kd['overhead'] == pytest.approx(kd['step_ms'] / rows['student']['step_ms'], abs=2e-3)
    assert kd['overhead_paired_min'] <= kd['overhead_paired_median'] <= kd['overhead_paired_max']
    assert writer['teacher_fwd_ms'] == alone['step_ms'] > 0
    assert writer['writer_vs_teacher'] == pytest.approx(alone['step_ms'] / writer['step_ms'], abs=2e-3)
    assert all(math.isfinite(v) and v > 0 for v in (kd['overhead'], writer['writer_vs_teacher']))
    with pytest.raises(benchmark.UsageError, match='--cache-topk 11 is not between 1 and the 10 classes'):
        benchmark.bench_train(*benchmark.parse_args(TINY + ['--no-peer', '--cached', '--cache-topk', '11']))
