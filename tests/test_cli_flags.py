"""train.py's flags as a timm user knows them: every switch has its --no- form, --sched none, --epochs bounds,
Ctrl-C, --dist-bn under DDP, and the timm flags --layer-decay, --aug-repeats, --bn-momentum/--bn-eps,
--drop-block and --lr-cycle-*."""
import argparse
import os
import signal
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import yaml

import models  # noqa: F401
import train
import validate
from cli import Switch, UsageError
from data.loader import EpochSampler
from distillers import DISTILLERS
from tests.helpers import REPO, SYNTHETIC_ARGS, python_env, read_summary, train_in_process

TINY = [*SYNTHETIC_ARGS, '--synthetic-train-size', '32', '--synthetic-val-size', '16', '--batch-size', '8',
        '--epochs', '1', '--no-aug', '--log-interval', '50']


def parse(*argv, config=None, tmp_path=None):
    if config is not None:
        path = tmp_path / 'c.yaml'
        path.write_text(yaml.safe_dump(config))
        argv = ('-c', str(path), *argv)
    return train.parse_args(list(argv))[0]


# ------------------------------------------------------------------------------------------------ switches
def switches(parser):
    return [a for a in parser._actions if a.nargs == 0 and not isinstance(a, argparse._HelpAction)]


def off_form(action):
    if isinstance(action, Switch):
        return action.off_strings[0]
    return next(s for s in action.option_strings if s.startswith('--no-'))


def test_every_train_switch_has_both_forms_and_the_command_line_beats_yaml(tmp_path):
    found = switches(train.parser)
    assert len(found) >= 20
    for action in found:
        assert isinstance(action, argparse.BooleanOptionalAction), f'{action.option_strings} has no off form'
        on, off = action.option_strings[0], off_form(action)
        assert getattr(parse(off, config={action.dest: True}, tmp_path=tmp_path), action.dest) is False, off
        assert getattr(parse(on, config={action.dest: False}, tmp_path=tmp_path), action.dest) is True, on
        assert getattr(parse(config={action.dest: True}, tmp_path=tmp_path), action.dest) is True


def test_a_negative_switch_is_undone_by_its_positive_form(tmp_path):
    args = parse('--aug', '--resume-opt', config={'no_aug': True, 'no_resume_opt': True}, tmp_path=tmp_path)
    assert args.no_aug is False and args.no_resume_opt is False
    assert parse('--no-nan-check').nan_check is False and parse().nan_check is True
    assert parse('--no-sync-bn', config={'sync_bn': True}, tmp_path=tmp_path).sync_bn is False


def test_every_validate_switch_has_its_no_form():
    found = switches(validate.parser)
    assert {a.dest for a in found} >= {'use_ema', 'pretrained', 'amp', 'channels_last'}
    for action in found:
        assert isinstance(action, argparse.BooleanOptionalAction), f'{action.option_strings} has no off form'
        assert getattr(validate.parser.parse_args([action.option_strings[0], off_form(action)]), action.dest) is False


# ------------------------------------------------------------------------------------------------ schedule
def optimizer_for(args, model=None):
    args.world_size = 1
    model = model or nn.Linear(4, 2)
    return train.create_optimizer(model, args)


def test_sched_none_keeps_the_lr_constant():
    args = parse('--sched', 'none', '--lr', '0.05', '--warmup-epochs', '3', '--epochs', '4')
    optimizer = optimizer_for(args)
    scheduler, epochs = train.create_schedule(optimizer, args, updates_per_epoch=5)
    assert epochs == 4
    for epoch in range(4):
        scheduler.step(epoch)
        scheduler.step_update(num_updates=epoch * 5)
        assert optimizer.param_groups[0]['lr'] == 0.05
    scheduler.load_state_dict(scheduler.state_dict())


def test_sched_none_trains_end_to_end(tmp_path):
    code = train_in_process([*TINY, '--model', 'test_resnet', '--sched', 'none', '--lr', '0.02', '--epochs', '2',
                             '--sched-on-updates', '--output', str(tmp_path), '--experiment', 'none'])
    assert code == 0
    assert [float(r['lr']) for r in read_summary(tmp_path / 'none')] == [0.02, 0.02]


@pytest.mark.parametrize('argv', [['--epochs', '0'], ['--epochs', '-1'], ['--sched', 'step', '--epochs', '0']])
def test_epochs_below_one_is_refused_at_parse_time(argv, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(sys, 'argv', ['train.py', *SYNTHETIC_ARGS, *argv, '--output', str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        train.run()
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    assert err.count('\n') == 1 and '--epochs' in err and argv[-1] in err and 'Traceback' not in err
    assert not os.listdir(tmp_path)


def test_warmup_prefix_configs_train_what_their_comments_say():
    configs = sorted((REPO / 'configs').rglob('*.yaml'))
    prefixed = [c for c in configs if yaml.safe_load(c.read_text()).get('warmup_prefix')]
    assert len(prefixed) == 7
    for config in prefixed:
        args = parse('-c', str(config), '--lr', '0.1', '--opt', 'sgd')
        _, epochs = train.create_schedule(optimizer_for(args), args, updates_per_epoch=3)
        assert epochs == 300, config.name


def test_a_run_lengthened_by_warmup_prefix_says_so(tmp_path):
    code = train_in_process([*TINY, '--model', 'test_resnet', '--warmup-prefix', '--warmup-epochs', '1', '--epochs', '1',
                             '--output', str(tmp_path), '--experiment', 'prefix'])
    assert code == 0
    log = (tmp_path / 'prefix' / 'log.txt').read_text()
    assert '2 epochs of' in log and 'WARNING: --warmup-prefix adds the 1 warm-up epochs to --epochs 1' in log
    assert len(read_summary(tmp_path / 'prefix')) == 2


def test_lr_cycle_flags_shape_the_cosine():
    args = parse('--sched', 'cosine', '--lr', '1.0', '--min-lr', '0', '--warmup-epochs', '0', '--epochs', '10',
                 '--lr-cycle-limit', '2', '--lr-cycle-mul', '2', '--lr-cycle-decay', '0.5')
    optimizer = optimizer_for(args)
    scheduler, epochs = train.create_schedule(optimizer, args, updates_per_epoch=1)
    assert epochs == 30  # a 10-epoch cycle, then one twice as long
    scheduler.step(10)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.5)  # the second cycle starts at half the peak
    scheduler.step(20)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.25)  # halfway down the 20-epoch cosine


def test_layer_decay_scales_the_student_layers_and_gives_the_distiller_the_full_lr():
    args = parse('--layer-decay', '0.5', '--opt', 'adamw', '--lr', '0.01', '--weight-decay', '0.05',
                 '--distiller', 'fitnet', '--warmup-epochs', '0', '--sched', 'constant')
    torch.manual_seed(0)
    student, teacher = timm.create_model('test_resnet', num_classes=10), timm.create_model('test_resnet',
                                                                                            num_classes=10)
    distiller = DISTILLERS['fitnet'](student, teacher, nn.CrossEntropyLoss(), args, (3, 32, 32))
    optimizer = optimizer_for(args, distiller)
    train.create_schedule(optimizer, args, updates_per_epoch=1)[0].step(0)
    lr_of = {id(p): g['lr'] for g in optimizer.param_groups for p in g['params']}
    wd_of = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    own = [(n, p) for n, p in distiller.named_parameters() if not n.startswith('student.')]
    assert own and all(lr_of[id(p)] == pytest.approx(0.01) for _, p in own)
    assert all(wd_of[id(p)] == (0.05 if p.ndim > 1 else 0.0) for _, p in own)
    assert lr_of[id(student.get_classifier().weight)] == pytest.approx(0.01)
    stem = lr_of[id(student.conv1[0].weight if isinstance(student.conv1, nn.Sequential) else student.conv1.weight)]
    assert stem < lr_of[id(student.layer4[0].conv1.weight)] < 0.01
    assert len(lr_of) == sum(p.requires_grad for p in distiller.parameters())
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.01)  # the lr the log and summary.csv report


def test_layer_decay_needs_a_schedule():
    args = parse('--layer-decay', '0.7', '--sched', 'none', '--lr', '0.1')
    with pytest.raises(UsageError, match='--sched constant'):
        train.create_schedule(optimizer_for(args), args, updates_per_epoch=1)


# ------------------------------------------------------------------------------------------------ model flags
def test_drop_block_and_batchnorm_flags_reach_the_student(tmp_path, monkeypatch):
    built = []

    def recording(name, *args, **kwargs):
        model = create(name, *args, **kwargs)
        built.append(model)
        return model
    create = train.create_model_at_size
    monkeypatch.setattr(train, 'create_model_at_size', recording)
    code = train_in_process([*TINY, '--model', 'test_resnet', '--drop-block', '0.2', '--bn-momentum', '0.01',
                             '--bn-eps', '1e-3', '--output', str(tmp_path), '--experiment', 'flags'])
    assert code == 0
    student = built[0]
    blocks = [m for m in student.modules() if type(m).__name__ == 'DropBlock2d']
    assert blocks and all(m.drop_prob == 0.2 for m in blocks)
    norms = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)


def test_batchnorm_flags_refuse_a_student_without_batchnorm():
    args = parse('--bn-momentum', '0.01', '--model', 'test_vit')
    with pytest.raises(UsageError, match='no BatchNorm'):
        train.set_batchnorm_params(timm.create_model('test_vit', img_size=32), args)


def test_aug_repeats_repeats_each_sample_with_its_own_augmentation():
    sampler = EpochSampler(12, 4, seed=3, repeats=3)
    items = list(sampler)
    assert len(items) == 12 and len(sampler) == 12
    indices = [i for i, _ in items]
    assert all(len({*indices[k:k + 3]}) == 1 for k in range(0, 12, 3))  # each index three times in a row
    assert len({seed for _, seed in items}) == 12  # every copy draws its own augmentation
    ranks = [[i for i, _ in EpochSampler(12, 2, seed=3, repeats=3, rank=r, world_size=3)] for r in range(3)]
    assert ranks[0] == ranks[1] == ranks[2]  # the copies of a sample go to different processes
    plain = EpochSampler(12, 4, seed=3)
    assert sorted(i for i, _ in plain) == list(range(12))


def test_aug_repeats_reaches_the_train_loader(tmp_path, monkeypatch):
    loaders = []
    create = train.create_train_loader

    def recording(*args, **kwargs):
        loaders.append(create(*args, **kwargs))
        return loaders[-1]
    monkeypatch.setattr(train, 'create_train_loader', recording)
    code = train_in_process([*TINY, '--model', 'test_resnet', '--aug-repeats', '2', '--output', str(tmp_path),
                             '--experiment', 'ra'])
    assert code == 0 and loaders[0].sampler.repeats == 2


# ------------------------------------------------------------------------------------------------ Ctrl-C
def test_a_second_ctrl_c_stops_at_once():
    flag = train.PreemptionFlag()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_before_training_exits_130_in_one_line_and_removes_the_new_folder(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / 'out' / 'early'

    def interrupted_main(new_folder):
        new_folder.create(run_dir)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'main', interrupted_main)
    monkeypatch.setattr(sys, 'argv', ['train.py'])
    with pytest.raises(SystemExit) as exit_info:
        train.run()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ['train.py: interrupted']
    assert not (tmp_path / 'out').exists()


@pytest.mark.e2e
def test_ctrl_c_writes_a_recovery_checkpoint_and_exits_cleanly(tmp_path):
    # a loader worker too: Ctrl-C in a terminal reaches the whole process group
    cmd = [sys.executable, str(REPO / 'train.py'), *SYNTHETIC_ARGS, '--model', 'test_resnet', '--epochs', '2',
           '--synthetic-train-size', '256', '--batch-size', '4', '--workers', '1', '--log-interval', '2',
           '--output', str(tmp_path), '--experiment', 'ctrl_c']
    proc = subprocess.Popen(cmd, cwd=REPO, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    stdout = ''
    for line in proc.stdout:  # the first log line of training: the run is mid-epoch
        stdout += line
        if line.startswith('Train: 0'):
            break
    assert proc.poll() is None, 'the run ended before it could be interrupted'
    os.killpg(proc.pid, signal.SIGINT)
    rest, stderr = proc.communicate(timeout=120)
    stdout += rest
    assert proc.returncode == 0, stderr[-2000:]
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
    assert 'Stopped by signal SIGINT at epoch 0' in stdout
    ckpt = torch.load(tmp_path / 'ctrl_c' / 'checkpoint' / 'recovery.pth.tar', weights_only=True)
    assert ckpt['epoch'] == 0 and ckpt['batch_idx'] > 0


# ------------------------------------------------------------------------------------------------ --dist-bn
@pytest.mark.e2e
@pytest.mark.ddp
def test_ddp_eval_metrics_are_those_of_the_saved_checkpoint(tmp_path):
    """Each process trains BatchNorm on its own batches; with --dist-bn reduce (the default) the evaluation that
    summary.csv records is the one validate.py gives on the checkpoint, for the student and its EMA."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29543',
           str(REPO / 'train.py'), *SYNTHETIC_ARGS, '--model', 'test_resnet', '--epochs', '1', '--batch-size', '8',
           '--synthetic-train-size', '64', '--synthetic-val-size', '48', '--warmup-epochs', '0', '--lr', '0.05',
           '--model-ema', '--model-ema-decay', '0.5', '--output', str(tmp_path), '--experiment', 'ddp']
    proc = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = read_summary(tmp_path / 'ddp')[-1]
    ckpt = tmp_path / 'ddp' / 'checkpoint' / 'last.pth.tar'
    for suffix, extra in (('', []), ('_ema', ['--use-ema'])):
        measured = validate.main(['--checkpoint', str(ckpt), '--workers', '0', *extra])[0]
        assert measured['top1'] == round(float(row[f'eval_top1{suffix}']), 3)
        assert measured['top5'] == round(float(row[f'eval_top5{suffix}']), 3)
        assert measured['loss'] == pytest.approx(float(row[f'eval_loss{suffix}']), abs=1e-5)
