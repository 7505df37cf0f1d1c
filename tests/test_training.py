"""The training system: config layering, end-to-end runs, checkpoints, validate.py, teacher loading, DDP."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import models  # noqa: F401
import train
from models.checkpoint import CheckpointError, load_model_weights
from tests.helpers import REPO, SYNTHETIC_ARGS, python_env, read_summary, run_script, run_train

# ------------------------------------------------------------------------------------------------ config layering


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_cli_overrides_yaml_overrides_default(tmp_path):
    cfg = write_yaml(tmp_path / 'c.yaml', {'lr': 0.5, 'epochs': 7, 'model': 'resnet34', 'ofa_eps': 1.5})
    args, text = train.parse_args(['-c', cfg, '--lr', '0.25'])
    assert args.lr == 0.25  # CLI beats YAML
    assert args.epochs == 7  # YAML beats the default
    assert args.model == 'resnet34'
    assert args.weight_decay == 2e-5  # built-in default
    assert args.ofa_eps == [1.5]  # a scalar for a multi-value flag becomes a one-element list
    dumped = yaml.safe_load(text)
    assert dumped['lr'] == 0.25 and dumped['epochs'] == 7


def test_yaml_string_numbers_are_converted(tmp_path):
    # YAML 1.1 reads 5e-4 as a string; argparse's type conversion makes it a float
    cfg = write_yaml(tmp_path / 'c.yaml', 'weight_decay: 5e-4\nmin_lr: 1.0e-5\n')
    args, _ = train.parse_args(['-c', cfg])
    assert args.weight_decay == pytest.approx(5e-4) and args.min_lr == pytest.approx(1e-5)


@pytest.mark.parametrize('content, fragment', [
    ({'warmup_epoch': 3}, "unknown key 'warmup_epoch'"),
    ({'lr': 'fast'}, "key 'lr'"),
    ({'amp': 'yes'}, 'true or false'),
    ('- a\n- b\n', 'must hold a mapping'),
    ('lr: [1, 2\n', 'not valid YAML'),
    ({'epochs': 2.5}, 'an integer'),
    ({'amp_dtype': 'float8'}, 'choose one of'),
])
def test_bad_yaml_is_a_usage_error(tmp_path, content, fragment):
    cfg = write_yaml(tmp_path / 'c.yaml', content)
    with pytest.raises(train.UsageError, match=re.escape(fragment)):
        train.parse_args(['-c', cfg])


def test_unknown_key_suggests_the_closest():
    with pytest.raises(train.UsageError, match='did you mean warmup_epochs'):
        train.load_config_defaults(_tmp_yaml({'warmup_epoch': 1}), train.parser)


def test_unknown_flag_suggests_the_closest():
    with pytest.raises(train.UsageError, match=r'unknown flag --warmup-epoch; did you mean --warmup-epochs'):
        train.parse_args(['--warmup-epoch', '3'])


def _tmp_yaml(data, _counter=[0]):
    import tempfile
    fd, path = tempfile.mkstemp(suffix='.yaml')
    with os.fdopen(fd, 'w') as f:
        yaml.safe_dump(data, f)
    return path


def test_every_shipped_config_parses():
    configs = sorted((REPO / 'configs').rglob('*.yaml'))
    assert configs, 'no configs shipped'
    for cfg in configs:
        args, _ = train.parse_args(['-c', str(cfg)])
        assert args.model, cfg


# ------------------------------------------------------------------------------------------------ end to end

LEARN_ARGS = ['--model', 'test_resnet', '--synthetic-train-size', '640', '--synthetic-val-size', '200',
              '--epochs', '3', '--opt', 'adamw', '--lr', '3e-3', '--weight-decay', '0.01', '--warmup-epochs', '0',
              '--no-aug', '--smoothing', '0', '--log-interval', '5']


@pytest.fixture(scope='module')
def teacher_checkpoint(tmp_path_factory):
    """A trained test_resnet teacher (train.py's own checkpoint)."""
    out = tmp_path_factory.mktemp('teacher')
    _, run_dir = run_train(out, *LEARN_ARGS, '--distiller', 'vanilla', experiment='teacher')
    return run_dir / 'checkpoint' / 'model_best.pth.tar'


def tensorboard_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / 'tb'))
    acc.Reload()
    return set(acc.Tags()['scalars'])


@pytest.mark.e2e
def test_vanilla_learns_and_logs(teacher_checkpoint):
    run_dir = teacher_checkpoint.parent.parent
    rows = read_summary(run_dir)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    assert float(rows[-1]['eval_top1']) > 40.0  # chance is 10%
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    for name in ('args.yaml', 'log.txt', 'checkpoint/last.pth.tar', 'checkpoint/model_best.pth.tar'):
        assert (run_dir / name).exists(), name
    tags = tensorboard_tags(run_dir)
    assert {'train/loss_gt', 'train/lr', 'train/samples_per_sec', 'eval/top1', 'eval/top5'} <= tags


@pytest.mark.e2e
def test_kd_learns_and_logs_every_component(tmp_path, teacher_checkpoint):
    proc, run_dir = run_train(tmp_path, *LEARN_ARGS, '--distiller', 'kd', '--teacher', 'test_resnet',
                              '--teacher-checkpoint', teacher_checkpoint, '--teacher-eval-first',
                              '--kd-temperature', '4')
    rows = read_summary(run_dir)
    assert float(rows[-1]['eval_top1']) > 40.0
    for col in ('train_loss', 'train_loss_gt', 'train_loss_kd'):
        assert all(float(r[col]) == float(r[col]) for r in rows), col  # present and not NaN
    # loss_gt carries 1 - alpha = 0.5 of the CE; the total is the sum of the components
    last = rows[-1]
    assert float(last['train_loss']) == pytest.approx(float(last['train_loss_gt']) + float(last['train_loss_kd']),
                                                      rel=1e-5)
    assert {'train/loss_gt', 'train/loss_kd'} <= tensorboard_tags(run_dir)
    teacher_line = [l for l in proc.stdout.splitlines() if l.startswith('Teacher top-1')]
    assert teacher_line and float(teacher_line[0].split()[-1]) > 40.0
    ckpt = torch.load(run_dir / 'checkpoint' / 'last.pth.tar', weights_only=True)
    assert not any(k.startswith('teacher') for k in ckpt['state_dict'])
    assert ckpt['teacher']['name'] == 'test_resnet' and len(ckpt['teacher']['sha256']) == 16


@pytest.mark.e2e
def test_args_yaml_reproduces_the_run(tmp_path):
    _, first = run_train(tmp_path, '--model', 'test_resnet', '--epochs', '1', '--no-aug', experiment='a')
    _, second = run_train(tmp_path, '-c', first / 'args.yaml', experiment='b', synthetic=False)
    a, b = read_summary(first), read_summary(second)
    assert a[0]['train_loss'] == b[0]['train_loss'] and a[0]['eval_top1'] == b[0]['eval_top1']


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.e2e
def test_checkpoint_validate_round_trip(tmp_path, teacher_checkpoint):
    run_dir = teacher_checkpoint.parent.parent
    ckpt = torch.load(teacher_checkpoint, weights_only=True)
    results = tmp_path / 'r.json'
    run_script('validate.py', '--checkpoint', teacher_checkpoint, '--workers', '0', '--results-file', results,
               '--results-format', 'json')
    row = json.loads(results.read_text())
    assert row['model'] == 'test_resnet' and row['img_size'] == 32 and row['images'] == 200
    assert row['top1'] == pytest.approx(ckpt['metric'], abs=1e-3)
    assert {'top1', 'top5', 'loss', 'param_count', 'samples_per_sec'} <= set(row)
    # a folder of checkpoints gives one row per file, csv by default
    results_csv = tmp_path / 'r.csv'
    run_script('validate.py', '--checkpoint', teacher_checkpoint.parent, '--workers', '0',
               '--results-file', results_csv)
    with open(results_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list(teacher_checkpoint.parent.glob('*.pth.tar')))
    # --split train reads the run's own 640 training images (its sizes and seed come from the checkpoint)
    import validate
    train_row, = validate.main(['--checkpoint', str(teacher_checkpoint), '--workers', '0', '--split', 'train'])
    assert train_row['images'] == 640 and train_row['top1'] >= 50


def test_synthetic_eval_splits_are_the_runs_splits():
    import argparse
    from data import DatasetError, create_datasets, create_eval_dataset
    args = argparse.Namespace(dataset='synthetic', input_size=(3, 32, 32), synthetic_classes=10,
                              synthetic_train_size=64, synthetic_val_size=24, synthetic_seed=3)
    train_set, val_set, _ = create_datasets(args)
    for split, size, expected in (('train', 64, train_set), ('val', 24, val_set), ('validation', 24, val_set)):
        got = create_eval_dataset('synthetic', None, split, 32, 10, size, 3)
        assert (got.images == expected.images).all() and list(got.targets) == list(expected.targets), split
    with pytest.raises(DatasetError, match="the synthetic dataset has the splits train and val, not 'test'"):
        create_eval_dataset('synthetic', None, 'test', 32, 10, 24, 3)


@pytest.mark.e2e
def test_student_checkpoint_loads_into_plain_timm(teacher_checkpoint):
    model = timm.create_model('test_resnet', num_classes=10, checkpoint_path=str(teacher_checkpoint))
    ckpt = torch.load(teacher_checkpoint, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt['state_dict'][k])


@pytest.mark.parametrize('prefix', ['', 'module.', '_orig_mod.', 'model.', 'student.', 'module._orig_mod.'])
@pytest.mark.parametrize('layout', ['bare', 'state_dict', 'model'])
def test_teacher_checkpoint_prefixes(tmp_path, prefix, layout):
    torch.manual_seed(0)
    source = timm.create_model('test_resnet', num_classes=10)
    state = {prefix + k: v for k, v in source.state_dict().items()}
    obj = state if layout == 'bare' else {layout: state, 'epoch': 3}
    path = tmp_path / 'teacher.pth'
    torch.save(obj, path)
    target = timm.create_model('test_resnet', num_classes=10)
    load_model_weights(target, str(path), who='teacher')
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k])


def test_teacher_checkpoint_that_does_not_fit(tmp_path):
    path = tmp_path / 'teacher.pth'
    torch.save(timm.create_model('test_resnet', num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError, match=r'has 10 classes, but the teacher is built for 7'):
        load_model_weights(timm.create_model('test_resnet', num_classes=7), str(path), who='teacher')
    with pytest.raises(CheckpointError, match=r'missing keys .*unexpected keys'):
        load_model_weights(timm.create_model('test_vit', num_classes=10), str(path), who='teacher')


def test_teacher_ema_entry(tmp_path):
    source = timm.create_model('test_resnet', num_classes=10)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / 't.pth'
    torch.save({'state_dict': source.state_dict(), 'state_dict_ema': ema}, path)
    target = timm.create_model('test_resnet', num_classes=10)
    load_model_weights(target, str(path), use_ema=True)
    assert torch.equal(target.state_dict()['fc.weight'], ema['fc.weight'])
    torch.save({'state_dict': source.state_dict()}, path)
    with pytest.raises(CheckpointError, match='no EMA weights'):
        load_model_weights(target, str(path), use_ema=True)


# ------------------------------------------------------------------------------------------------ teacher forward
def test_teacher_forward_fast_path():
    """The teacher runs under inference_mode, yet what it returns can enter autograd (fp32 and bf16 autocast), equals
    the no_grad result, and its input re-normalization is the exact affine map, moved to the device once."""
    from argparse import Namespace
    from distillers.base import Distiller
    from models.features import FeatureRequest
    torch.manual_seed(0)
    student = timm.create_model('test_resnet', num_classes=10)
    teacher = timm.create_model('test_resnet', num_classes=10)
    distiller = Distiller(student, teacher, torch.nn.CrossEntropyLoss(), Namespace(), (3, 32, 32))
    distiller.set_teacher_normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0.485, 0.456, 0.406),
                                        (0.229, 0.224, 0.225))
    images = torch.randn(2, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    expected_input = (images * 0.25 + 0.5 - mean) / std
    assert torch.allclose(distiller.teacher_input(images), expected_input, atol=1e-6)
    cached = distiller._teacher_norm_on_device
    distiller.teacher_input(images)
    assert distiller._teacher_norm_on_device is cached  # not rebuilt per step

    request = FeatureRequest(stages=(-1,))
    weight = torch.ones(1, requires_grad=True)
    for autocast in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            fast = distiller.teacher_forward(images, request)
            distiller.teacher_inference_mode = False
            slow = distiller.teacher_forward(images, request)
            distiller.teacher_inference_mode = True
        for out, ref in ((fast.logits, slow.logits), (fast.stages[-1], slow.stages[-1])):
            assert out.dtype == torch.float32 and not out.is_inference()
            assert torch.equal(out, ref)
            (out * weight).sum().backward()  # would raise for an inference tensor saved for backward
    assert weight.grad is not None
    assert torch.allclose(distiller.teacher_forward(images).logits, teacher(expected_input), atol=1e-5)

    # --teacher-train-mode: BN statistics still update under inference_mode
    distiller.teacher_train_mode = True
    before = teacher.bn1.num_batches_tracked.item()
    distiller.teacher_forward(images)
    assert teacher.training and teacher.bn1.num_batches_tracked.item() == before + 1


# ------------------------------------------------------------------------------------------------ distributed


def step_losses(run_dir):
    """{tag: {step: value}} of the per-step train losses in a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / 'tb'))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()['scalars']
            if tag.startswith('train/loss')}


@pytest.mark.e2e
@pytest.mark.ddp
def test_torchrun_two_processes_match_one(tmp_path):
    common = [*SYNTHETIC_ARGS, '--model', 'test_vit', '--teacher', 'test_vit', '--distiller', 'kd',
              '--epochs', '1', '--no-aug', '--smoothing', '0', '--synthetic-train-size', '64',
              '--synthetic-val-size', '32', '--warmup-epochs', '0', '--lr', '0.01']
    run_script('train.py', *common, '--batch-size', '16', '--output', tmp_path, '--experiment', 'one')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517',
           str(REPO / 'train.py'), *common, '--batch-size', '8', '--output', str(tmp_path), '--experiment', 'two']
    multi = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert 'Processes: 2 (cpu)' in multi.stdout and 'global batch 16' in multi.stdout
    one, two = step_losses(tmp_path / 'one'), step_losses(tmp_path / 'two')
    assert one.keys() == two.keys() == {'train/loss', 'train/loss_gt', 'train/loss_kd'}
    assert one['train/loss_gt'].keys() == {1, 2, 3, 4}
    for tag in one:  # the same losses, step by step, before and after optimizer updates
        for step in (1, 2, 3, 4):
            assert two[tag][step] == pytest.approx(one[tag][step], rel=1e-5), (tag, step)
    # rank 0 alone writes
    assert (tmp_path / 'two' / 'summary.csv').exists()


def test_a_config_does_not_leak_into_the_next_parse(tmp_path):
    cfg = write_yaml(tmp_path / 'c.yaml', {'epochs': 7})
    assert train.parse_args(['-c', cfg])[0].epochs == 7
    assert train.parse_args([])[0].epochs == 300


@pytest.mark.e2e
def test_image_folder_dataset_trains_and_validates(tmp_path):
    from PIL import Image
    root = tmp_path / 'folder'
    colors = {'red': (200, 30, 30), 'green': (30, 200, 30), 'blue': (30, 30, 200)}
    for split in ('train', 'val'):
        for name, color in colors.items():
            (root / split / name).mkdir(parents=True)
            for i in range(8):
                jitter = tuple(max(0, min(255, c + 10 * (i - 4))) for c in color)
                Image.new('RGB', (40, 36), jitter).save(root / split / name / f'{i}.png')
    _, run_dir = run_train(tmp_path, '--dataset', '', '--data-dir', root, '--model', 'test_resnet', '--epochs', '4',
                           '--batch-size', '8', '--img-size', '32', '--opt', 'adamw', '--lr', '3e-3',
                           '--warmup-epochs', '0', '--no-aug', '--smoothing', '0', synthetic=False)
    rows = read_summary(run_dir)
    assert float(rows[-1]['eval_top1']) > 60.0  # three flat colours: chance is 33%
    results = tmp_path / 'r.json'
    run_script('validate.py', root, '--checkpoint', run_dir / 'checkpoint' / 'last.pth.tar', '--workers', '0',
               '--results-file', results, '--results-format', 'json')
    row = json.loads(results.read_text())
    assert row['images'] == 24 and row['top1'] == pytest.approx(float(rows[-1]['eval_top1']), abs=1e-3)


@pytest.mark.e2e
def test_amp_bf16_channels_last_grad_accum_ema(tmp_path):
    _, run_dir = run_train(tmp_path, '--model', 'test_resnet', '--teacher', 'test_resnet', '--distiller', 'kd',
                           '--epochs', '1', '--amp', '--amp-dtype', 'bfloat16', '--channels-last',
                           '--grad-accum-steps', '2', '--model-ema', '--model-ema-decay', '0.5', '--mixup', '0.2',
                           '--cutmix', '1.0', '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25')
    row = read_summary(run_dir)[0]
    for col in ('train_loss_gt', 'train_loss_kd', 'eval_top1', 'eval_top1_ema'):
        assert float(row[col]) == float(row[col]), col
    ckpt = torch.load(run_dir / 'checkpoint' / 'last.pth.tar', weights_only=True)
    assert ckpt['step'] == 2  # 128 images / 32 per batch = 4 batches = 2 updates
    assert ckpt['state_dict_ema'] is not None
    assert not torch.equal(ckpt['state_dict_ema']['fc.weight'], ckpt['state_dict']['fc.weight'])


@pytest.mark.e2e
def test_eval_interval_and_speedtest(tmp_path):
    _, run_dir = run_train(tmp_path, '--model', 'test_resnet', '--epochs', '4', '--eval-interval', '2',
                           '--eval-interval-end', '1.0', '--checkpoint-hist', '1', experiment='interval')
    rows = read_summary(run_dir)
    assert [bool(r['eval_top1']) for r in rows] == [True, False, True, True]  # epochs 0, 2 and the last
    assert sorted(p.name for p in (run_dir / 'checkpoint').glob('checkpoint-*')) == [
        f'checkpoint-{max((0, 2, 3), key=lambda e: (float(rows[e]["eval_top1"]), -e))}.pth.tar']
    _, run_dir = run_train(tmp_path, '--model', 'test_resnet', '--epochs', '2', '--speedtest', experiment='speed')
    rows = read_summary(run_dir)
    assert len(rows) == 2 and 'eval_top1' not in rows[0]
    assert sorted(p.name for p in (run_dir / 'checkpoint').iterdir()) == ['last.pth.tar']
