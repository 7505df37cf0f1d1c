"""Reliability: exact resume (SIGKILL and SIGTERM), corrupt checkpoints, no overwrite, non-finite losses,
one-sentence errors for bad input that write nothing, and a dead DDP rank not hanging the others."""
import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import yaml
from PIL import Image

from tests.helpers import REPO, SYNTHETIC_ARGS, python_env, read_summary, run_script, run_train

pytestmark = pytest.mark.e2e

# random augmentation on purpose: resume must restore every RNG, not only the weights
RESUME_ARGS = ['--model', 'test_resnet', '--teacher', 'test_resnet', '--distiller', 'kd', '--epochs', '3',
               '--batch-size', '8', '--synthetic-train-size', '96', '--synthetic-val-size', '32',
               '--scale', '0.5', '1.0', '--model-ema', '--model-ema-decay', '0.9', '--opt', 'adamw',
               '--lr', '1e-3', '--warmup-epochs', '1', '--sched-on-updates', '--log-interval', '4',
               '--mixup', '0.2', '--deterministic']


def train_cmd(out, experiment, *extra):
    return [sys.executable, str(REPO / 'train.py'), *SYNTHETIC_ARGS, *RESUME_ARGS, '--output', str(out),
            '--experiment', experiment, *extra]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('resume')
    proc = subprocess.run(train_cmd(out, 'full'), cwd=REPO, env=python_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / 'full'


def final_state(run_dir):
    return torch.load(run_dir / 'checkpoint' / 'last.pth.tar', weights_only=True)


def assert_same_run(a_dir, b_dir):
    a, b = final_state(a_dir), final_state(b_dir)
    assert a['epoch'] == b['epoch'] == 2 and a['step'] == b['step']
    for key in ('state_dict', 'state_dict_ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    for name, value in a['optimizer']['state'].items():
        for k, v in value.items():
            assert torch.equal(v, b['optimizer']['state'][name][k]), ('optimizer', name, k)
    ra, rb = read_summary(a_dir), read_summary(b_dir)
    assert [r['eval_top1'] for r in ra] == [r['eval_top1'] for r in rb]
    assert [r['train_loss'] for r in ra] == [r['train_loss'] for r in rb]


def interrupt_mid_epoch(out, experiment, sig):
    """Start a run, send `sig` once a mid-epoch recovery checkpoint of epoch 1 exists; return the process."""
    proc = subprocess.Popen(train_cmd(out, experiment, '--recovery-interval', '1'), cwd=REPO, env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt_dir = out / experiment / 'checkpoint'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (ckpt_dir / 'last.pth.tar').exists() and (ckpt_dir / 'recovery.pth.tar').exists():
            break
        time.sleep(0.02)
    assert proc.poll() is None, 'the run ended before it could be interrupted'
    proc.send_signal(sig)
    return proc


def test_sigkill_then_resume_auto_is_bit_identical(tmp_path, uninterrupted):
    proc = interrupt_mid_epoch(tmp_path, 'killed', signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(train_cmd(tmp_path, 'killed', '--resume', 'auto'), cwd=REPO, env=python_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resumed from' in resumed.stdout
    assert_same_run(uninterrupted, tmp_path / 'killed')


def test_sigterm_writes_recovery_exits_zero_and_resumes(tmp_path, uninterrupted):
    proc = interrupt_mid_epoch(tmp_path, 'preempted', signal.SIGTERM)
    start = time.time()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert time.time() - start < 30
    assert 'Stopped by signal' in stdout
    ckpt = torch.load(tmp_path / 'preempted' / 'checkpoint' / 'recovery.pth.tar', weights_only=True)
    assert ckpt['batch_idx'] > 0 and len(ckpt['rng']) == 1
    resumed = subprocess.run(train_cmd(tmp_path, 'preempted', '--resume', 'auto'), cwd=REPO, env=python_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, tmp_path / 'preempted')


def test_corrupt_checkpoint_is_detected_and_auto_skips_it(tmp_path, uninterrupted):
    run_dir = tmp_path / 'copy'
    shutil.copytree(uninterrupted, run_dir)
    last = run_dir / 'checkpoint' / 'last.pth.tar'
    data = last.read_bytes()
    last.write_bytes(data[:len(data) // 2])
    proc = subprocess.run(train_cmd(tmp_path, 'copy', '--resume', str(last)), cwd=REPO, env=python_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert 'is truncated or corrupt' in proc.stderr and 'Traceback' not in proc.stderr
    # auto takes the newest good one: the top-k copy of the last epoch
    proc = subprocess.run(train_cmd(tmp_path, 'copy', '--resume', 'auto', '--epochs', '4'), cwd=REPO,
                          env=python_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'skipping' in proc.stdout + proc.stderr and 'checkpoint-2.pth.tar' in proc.stdout
    assert [int(r['epoch']) for r in read_summary(run_dir)] == [0, 1, 2, 3]


def test_existing_run_folder_is_never_overwritten(tmp_path, uninterrupted):
    before = {p: p.stat().st_mtime_ns for p in uninterrupted.rglob('*')}
    proc = subprocess.run(train_cmd(uninterrupted.parent, 'full'), cwd=REPO, env=python_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert 'already exists' in proc.stderr and '--resume auto' in proc.stderr and '--overwrite' in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in uninterrupted.rglob('*')} == before


def test_overwrite_starts_from_an_empty_folder(tmp_path, uninterrupted):
    run_dir = tmp_path / 'full'
    shutil.copytree(uninterrupted, run_dir)
    proc = subprocess.run(train_cmd(tmp_path, 'full', '--overwrite', '--epochs', '1'), cwd=REPO, env=python_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / 'checkpoint').iterdir()) == [
        'checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert [int(r['epoch']) for r in read_summary(run_dir)] == [0]


def test_non_finite_loss_stops_with_last_good_state(tmp_path):
    proc, run_dir = run_train(tmp_path, '--model', 'test_resnet', '--epochs', '2', '--opt', 'sgd', '--lr', '1e12',
                              '--warmup-epochs', '0', '--no-aug', check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert 'loss component loss_gt is not finite at epoch 0, batch' in proc.stdout
    ckpt = torch.load(run_dir / 'checkpoint' / 'recovery.pth.tar', weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ bad input

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('inputs')
    torch.manual_seed(0)
    teacher = timm.create_model('test_resnet', num_classes=10)
    torch.save(teacher.state_dict(), root / 'teacher.pth')
    torch.save(timm.create_model('test_resnet', num_classes=100).state_dict(), root / 'teacher100.pth')
    (root / 'corrupt.pth').write_bytes(b'not a checkpoint at all')
    (root / 'bad.yaml').write_text('lr: [1, 2\n')
    (root / 'list.yaml').write_text('- lr\n- 0.1\n')
    (root / 'typo.yaml').write_text('warmup_epoch: 3\n')
    (root / 'smoothing.yaml').write_text('smoothing: 1.5\n')
    (root / 'cifar' / 'cifar-10-batches-py').mkdir(parents=True)  # a CIFAR folder without its files
    # a checkpoint of timm's own train.py: its arguments are an argparse Namespace
    torch.save({'epoch': 3, 'arch': 'test_resnet', 'state_dict': teacher.state_dict(), 'version': 2,
                'args': argparse.Namespace(model='test_resnet', opt='sgd'), 'metric': 10.0},
               root / 'timm_run.pth.tar')
    (root / 'file').write_text('a file, not a folder\n')
    for name, splits in (('empty', ['train', 'val']), ('differ', ['train', 'val']), ('broken', ['train', 'val'])):
        for split in splits:
            (root / name / split).mkdir(parents=True)
    img = Image.new('RGB', (32, 32), (120, 30, 200))
    for split, classes in (('train', ['a', 'b']), ('val', ['a', 'c'])):
        for c in classes:
            (root / 'differ' / split / c).mkdir()
            img.save(root / 'differ' / split / c / '0.png')
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (root / 'broken' / split / c).mkdir()
            for i in range(4):
                img.save(root / 'broken' / split / c / f'{i}.png')
    (root / 'broken' / 'train' / 'a' / '9.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    # a run with sgd, to resume with another optimizer (its checkpoint written as train.py writes it)
    (root / 'sgd' / 'checkpoint').mkdir(parents=True)
    torch.save({'arch': 'test_resnet', 'distiller': 'vanilla', 'epoch': 0, 'batch_idx': -1, 'step': 4,
                'state_dict': teacher.state_dict(), 'distiller_state': {}, 'args': {'opt': 'sgd'},
                'optimizer': torch.optim.SGD(teacher.parameters(), lr=0.1).state_dict()},
               root / 'sgd' / 'checkpoint' / 'last.pth.tar')
    # a run of another model, to resume from
    other = root / 'other' / 'checkpoint'
    other.mkdir(parents=True)
    torch.save({'arch': 'test_vit', 'distiller': 'vanilla', 'epoch': 0, 'state_dict': {}}, other / 'last.pth.tar')
    return root


T = ['--teacher', 'test_resnet']
BAD_INPUT = [
    ('unknown flag', ['--epoch', '3'], 'unknown flag --epoch; did you mean --epochs'),
    ('unknown yaml key', ['-c', '{root}/typo.yaml'], "unknown key 'warmup_epoch'"),
    ('yaml does not parse', ['-c', '{root}/bad.yaml'], 'is not valid YAML at line'),
    ('yaml not a mapping', ['-c', '{root}/list.yaml'], 'must hold a mapping of flag names to values, not a list'),
    ('missing yaml', ['-c', '{root}/nope.yaml'], "config file '{root}/nope.yaml' cannot be read"),
    ('wrong type', ['--lr', 'fast'], "argument --lr: invalid float value: 'fast'"),
    ('unknown model', ['--model', 'resnet_imaginary'], "unknown model 'resnet_imaginary'"),
    ('unknown teacher', ['--distiller', 'kd', '--teacher', 'vit_imaginary'], "unknown model 'vit_imaginary'"),
    ('unknown distiller', ['--distiller', 'magic'], "unknown distiller 'magic'; choose one of: "),
    ('teacher missing', ['--distiller', 'kd', *T, '--teacher-checkpoint', '{root}/nope.pth'],
     "teacher checkpoint '{root}/nope.pth' does not exist"),
    ('teacher corrupt', ['--distiller', 'kd', *T, '--teacher-checkpoint', '{root}/corrupt.pth'],
     'is truncated or corrupt'),
    ('teacher does not fit', ['--distiller', 'kd', '--teacher', 'test_vit', '--teacher-checkpoint',
                              '{root}/teacher.pth'], 'does not fit the teacher'),
    ('teacher classes', ['--distiller', 'kd', *T, '--teacher-checkpoint', '{root}/teacher100.pth'],
     "has 100 classes, but the teacher is built for 10; use a teacher checkpoint trained on the dataset's 10 "
     'classes'),
    ('dataset missing', ['--dataset', '', '--data-dir', '{root}/nowhere'], "dataset folder '{root}/nowhere' does not exist"),
    ('dataset empty', ['--dataset', '', '--data-dir', '{root}/empty'], 'holds no class folders with images'),
    ('dataset classes differ', ['--dataset', '', '--data-dir', '{root}/differ'],
     "only in train: ['b'], only in val: ['c']"),
    ('corrupt image', ['--dataset', '', '--data-dir', '{root}/broken', '--batch-size', '3', '--img-size', '32'],
     "image file '{root}/broken/train/a/9.png' cannot be decoded"),
    ('pair the method cannot serve', ['--distiller', 'vitkd', *T], 'vitkd'),
    ('resume from another model', ['--resume', '{root}/other/checkpoint/last.pth.tar'],
     "was written with arch 'test_vit', but this run uses 'test_resnet'"),
    ('output not writable', ['--output', '{root}/file'], 'cannot be written'),
    ('batch larger than dataset', ['--batch-size', '512'], 'fewer than one global batch of 512'),
    ('teacher hub weights offline', ['--distiller', 'kd', *T, '--teacher-pretrained'], 'cannot be had here'),
    ('unknown scheduler', ['--sched', 'zigzag'], "the lr schedule cannot be built (--sched 'zigzag')"),
    ('unknown augmentation policy', ['--aa', 'nonsense'], "the training augmentation cannot be built (--aa 'nonsense'"),
    ('model kwargs the model does not take', ['--model-kwargs', 'wings=2'], 'does not take these arguments'),
    ('model kwargs not YAML', ['--model-kwargs', 'depth=['], "--model-kwargs item 'depth=[' has a value that is not"),
    ('odd batch with mixup', ['--mixup', '0.2', '--batch-size', '31'], '--batch-size must be even, not 31'),
    ('gpu asked on a cpu machine', ['--device', 'cuda'], 'asks for a GPU, but none is available'),
    ('resume with another optimizer', ['--resume', '{root}/sgd/checkpoint/last.pth.tar', '--opt', 'adamw'],
     "was written with optimizer 'sgd', but this run uses 'adamw'"),
    # values checked where the flags are parsed: a range (argparse type=), a count or an order (check_values)
    ('label smoothing of 1 or more', ['--smoothing', '1.5'],
     'argument --smoothing: 1.5 is out of range; give a number >= 0 and < 1'),
    ('a range in a yaml', ['-c', '{root}/smoothing.yaml'],
     "key 'smoothing' of config '{root}/smoothing.yaml': 1.5 is out of range"),
    ('mean of two values', ['--mean', '0.5', '0.5'], '--mean 0.5 0.5 is not accepted; give one value, or three'),
    ('crop scale of one value', ['--scale', '0.5'], '--scale 0.5 is not accepted; give two fractions'),
    ('image size 0', ['--img-size', '0'], 'argument --img-size: 0 is out of range; give an integer >= 1'),
    ('image size below the synthetic minimum', ['--img-size', '4'], '--img-size 4 is too small'),
    ('log interval 0', ['--log-interval', '0'], 'argument --log-interval: 0 is out of range'),
    ('eval interval 0', ['--eval-interval', '0'], 'argument --eval-interval: 0 is out of range'),
    ('one input channel', ['--in-chans', '1'], 'argument --in-chans: invalid choice: 1 (choose from 3)'),
    ('unknown compile backend', ['--torchcompile', 'nosuchbackend'],
     '--torchcompile nosuchbackend is not accepted; give a torch.compile backend'),
    ('patch size does not divide the image', ['--model', 'test_vit', '--img-size', '30'],
     "student 'test_vit' cannot take 30x30 images (Input height (30) should be divisible by patch size"),
    ('student hub weights offline', ['--pretrained'],
     "timm pretrained weights of 'test_resnet' cannot be had here: they are not in the local cache"),
    ('cifar download offline', ['--dataset', 'torch/cifar10', '--data-dir', '{root}/nocifar', '--dataset-download'],
     "torch/cifar10 cannot be downloaded into '{root}/nocifar': the proxy 127.0.0.1:9"),
    ('cifar folder that fails the file check', ['--dataset', 'torch/cifar10', '--data-dir', '{root}/cifar'],
     "torch/cifar10 under '{root}/cifar' fails torchvision's file check"),
    ('resume bare weights', ['--resume', '{root}/teacher.pth'],
     "holds bare weights (a state dict), so there is no run to continue; start a new run from its weights with "
     '--initial-checkpoint'),
    ('resume a checkpoint of timm', ['--resume', '{root}/timm_run.pth.tar'],
     "holds a checkpoint of another training script (timm's train.py)"),
    ('resume without experiment', ['--resume', '{root}/sgd/checkpoint/last.pth.tar', '--experiment', ''],
     "--resume FILE needs --experiment NAME, the run folder under '{out}' that the resumed run writes to; to "
     'continue the run it belongs to, pass --output {root} --experiment sgd'),
]


# one case per stage of train.py (argument parsing, the data, resuming) runs as a user would, in a new process,
# where anything else the run prints (log lines, Python warnings) would reach stderr and fail the test
IN_A_NEW_PROCESS = {'unknown flag', 'corrupt image', 'resume with another optimizer'}


def train_in_this_process(argv, monkeypatch, capfd):
    """train.py's entry point in the test process: (exit code, stderr, warnings raised). A new interpreter costs
    about 10 s of imports here, so most bad-input cases run this way. Python warnings are recorded rather than
    printed. The signal handlers and the root logger that train.py sets up are put back afterwards."""
    import train
    monkeypatch.setattr(sys, 'argv', ['train.py', *argv])
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # as python_env() sets for a new process
    # no download reaches a network, whether or not this machine has one: every request meets a closed port
    for name in ('https_proxy', 'http_proxy', 'HTTPS_PROXY', 'HTTP_PROXY'):
        monkeypatch.setenv(name, 'http://127.0.0.1:9')
    for name in ('no_proxy', 'NO_PROXY'):
        monkeypatch.delenv(name, raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    root_logger = logging.getLogger()
    log_handlers, log_level = root_logger.handlers[:], root_logger.level
    capfd.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exit_info:
            warnings.simplefilter('always')
            train.run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        root_logger.handlers[:] = log_handlers
        root_logger.setLevel(log_level)
    return exit_info.value.code, capfd.readouterr().err, [str(w.message) for w in caught]


@pytest.mark.parametrize('case, args, fragment', BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(tmp_path, files, case, args, fragment, monkeypatch,
                                                             capfd):
    out = tmp_path / 'out'
    args = [a.replace('{root}', str(files)) for a in args]
    fragment = fragment.replace('{root}', str(files)).replace('{out}', str(out))
    before = sorted(p.relative_to(files) for p in files.rglob('*'))
    argv = [*SYNTHETIC_ARGS, '--model', 'test_resnet', '--epochs', '1', '--output', str(out), '--experiment', 'run',
            *args]
    if case in IN_A_NEW_PROCESS:
        proc = run_script('train.py', *argv, check=False)
        code, stderr, warned = proc.returncode, proc.stderr, []
    else:
        code, stderr, warned = train_in_this_process(argv, monkeypatch, capfd)
    assert code == 2, (code, stderr[-2000:])
    lines = [l for l in stderr.strip().splitlines() if not l.startswith('WARNING')]
    assert len(lines) == 1 and lines[0].startswith('train.py: error: '), stderr[-2000:]
    assert fragment in lines[0]
    assert 'Traceback' not in stderr and not warned, (stderr[-2000:], warned)
    assert not out.exists()  # neither the run folder nor the --output folder above it
    assert sorted(p.relative_to(files) for p in files.rglob('*')) == before


VALIDATE_BAD_INPUT = [
    ('batch size 0', ['--batch-size', '0', '--model', 'test_resnet', '--pretrained'],
     'argument -b/--batch-size: 0 is out of range; give an integer >= 1'),
    ('hub weights offline', ['--model', 'test_resnet', '--pretrained', '--dataset', 'synthetic'],
     "timm pretrained weights of 'test_resnet' cannot be had here"),
    ('abbreviated flag', ['--img', '32', '--checkpoint', '{root}/teacher.pth'], 'unrecognized arguments: --img'),
    ('mean of two values', ['--mean', '0.5', '0.5', '--checkpoint', '{root}/teacher.pth'],
     '--mean 0.5 0.5 is not accepted'),
]


@pytest.mark.parametrize('case, args, fragment', VALIDATE_BAD_INPUT, ids=[c[0] for c in VALIDATE_BAD_INPUT])
def test_validate_bad_input_is_one_sentence_exit_2(files, case, args, fragment, monkeypatch, capfd):
    import validate
    monkeypatch.setattr(sys, 'argv', ['validate.py', *[a.replace('{root}', str(files)) for a in args]])
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        validate.run()
    stderr = capfd.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.startswith('validate.py: error: ') and len(stderr.strip().splitlines()) == 1, stderr
    assert fragment in stderr


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, capfd):
    """Whatever stops a new run before its first checkpoint (here an error no check foresaw, in the first epoch),
    its run folder and the --output folders created for it are removed, so that the corrected rerun starts."""
    import train

    def failing_epoch(*args, **kwargs):
        raise RuntimeError('an unforeseen failure')

    monkeypatch.setattr(train, 'train_one_epoch', failing_epoch)
    out = tmp_path / 'new' / 'out'
    argv = [*SYNTHETIC_ARGS, '--model', 'test_resnet', '--epochs', '1', '--output', str(out), '--experiment', 'run']
    monkeypatch.setattr(sys, 'argv', ['train.py', *argv])
    root_logger = logging.getLogger()
    log_handlers, log_level = root_logger.handlers[:], root_logger.level
    try:
        with pytest.raises(RuntimeError, match='an unforeseen failure'):  # not a user error: its traceback shows
            train.run()
    finally:
        root_logger.handlers[:] = log_handlers
        root_logger.setLevel(log_level)
    assert 'Run folder:' in capfd.readouterr().out  # the folder had been made
    assert sorted(tmp_path.iterdir()) == []
    # a folder that was there before is kept
    (out / 'run').mkdir(parents=True)
    with pytest.raises(RuntimeError):
        train.main(argv + ['--overwrite'])
    logging.getLogger().handlers[:] = log_handlers
    assert (out / 'run').is_dir()


def test_resume_writes_only_into_output_experiment(tmp_path, files, monkeypatch, capfd):
    """--resume FILE writes into --output/--experiment, never beside FILE; what it said before its log file
    opened ("Resumed from ...") is in log.txt too."""
    before = {p: p.stat().st_mtime_ns for p in files.rglob('*')}
    argv = [*SYNTHETIC_ARGS, '--model', 'test_resnet', '--epochs', '2', '--output', str(tmp_path), '--experiment',
            'continued', '--resume', str(files / 'sgd' / 'checkpoint' / 'last.pth.tar'), '--no-resume-opt']
    code, stderr, _ = train_in_this_process(argv, monkeypatch, capfd)
    assert code == 0, stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in files.rglob('*')} == before
    run_dir = tmp_path / 'continued'
    assert [int(r['epoch']) for r in read_summary(run_dir)] == [1]
    log = (run_dir / 'log.txt').read_text()
    assert 'Resumed from' in log and log.index('Resumed from') < log.index('Run folder:')


def test_validate_takes_the_dataset_of_the_checkpoints_run(tmp_path, monkeypatch, caplog):
    """validate.py --checkpoint alone evaluates on the folder the run trained on, and says so."""
    img = Image.new('RGB', (32, 32), (10, 200, 90))
    for c in ('a', 'b'):
        for split in ('train', 'val'):
            (tmp_path / 'folder' / split / c).mkdir(parents=True)
        for i in range(3):
            img.save(tmp_path / 'folder' / 'val' / c / f'{i}.png')
    model = timm.create_model('test_resnet', num_classes=2)
    torch.save({'arch': 'test_resnet', 'num_classes': 2, 'state_dict': model.state_dict(),
                'data_config': {'input_size': [3, 32, 32]},
                'args': {'dataset': '', 'data': None, 'data_dir': str(tmp_path / 'folder')}}, tmp_path / 'ckpt.pth')
    import validate
    monkeypatch.chdir(tmp_path)  # the default data/imagenet is not there
    caplog.set_level(logging.INFO, logger='validate')
    rows = validate.main(['--checkpoint', str(tmp_path / 'ckpt.pth'), '--workers', '0'])
    assert rows[0]['images'] == 6
    assert f"dataset of the checkpoint's run: --dataset imagefolder --data-dir {tmp_path / 'folder'}" in caplog.text


def test_yaml_true_for_a_flag_with_an_optional_value(tmp_path):
    """`teacher_pretrained: true` is the flag given alone (hub weights), not the path 'True'."""
    import train
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('teacher_pretrained: true\ntorchcompile: false\n')
    args, _ = train.parse_args(['-c', str(cfg)])
    assert args.teacher_pretrained == '' and args.torchcompile is None
    cfg.write_text('teacher_pretrained: false\ntorchcompile: true\n')
    args, _ = train.parse_args(['-c', str(cfg)])
    assert args.teacher_pretrained is None and args.torchcompile == 'inductor'


def test_help_lists_the_config_flag(capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(['--help'])
    assert '-c FILE, --config FILE' in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ DDP liveness


def _child_with_rank(parent_pid, rank):
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            if ppid != parent_pid:
                continue
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = f.read().split(b'\0')
        except (OSError, ValueError, IndexError):
            continue
        if f'RANK={rank}'.encode() in env:
            return int(pid)
    return None


@pytest.mark.ddp
def test_a_dead_rank_does_not_hang_the_others(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29535',
           str(REPO / 'train.py'), *SYNTHETIC_ARGS, '--model', 'test_vit', '--epochs', '50', '--batch-size', '4',
           '--no-aug', '--output', str(tmp_path), '--experiment', 'ddp']
    proc = subprocess.Popen(cmd, cwd=REPO, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    victim = None
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / 'ddp' / 'summary.csv').exists():  # training is under way on both ranks
            victim = _child_with_rank(proc.pid, 1)
            if victim:
                break
        time.sleep(0.2)
    assert victim, 'rank 1 was not found'
    os.kill(victim, signal.SIGKILL)
    start = time.time()
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail('the surviving rank hung after its peer died')
    assert proc.returncode != 0
    assert time.time() - start < 120


@pytest.mark.parametrize('distiller', ['ufd', 'ofa'])
def test_projector_state_is_restored_by_resume(tmp_path, distiller):
    common = ['--model', 'test_resnet', '--teacher', 'test_vit', '--distiller', distiller, '--batch-size', '16',
              '--synthetic-train-size', '64', '--synthetic-val-size', '32', '--opt', 'adamw', '--lr', '1e-3',
              '--warmup-epochs', '0', '--deterministic']
    if distiller == 'ofa':
        common += ['--ofa-stage', '3', '4']
    run_train(tmp_path, *common, '--epochs', '2', experiment='straight')
    run_train(tmp_path, *common, '--epochs', '1', experiment='halves')
    proc, _ = run_train(tmp_path, *common, '--epochs', '2', '--resume',
                        tmp_path / 'halves' / 'checkpoint' / 'last.pth.tar', experiment='halves', synthetic=True)
    assert 'Resumed from' in proc.stdout
    a, b = final_state(tmp_path / 'straight'), final_state(tmp_path / 'halves')
    assert a['distiller_state'] and a['distiller_state'].keys() == b['distiller_state'].keys()
    for key in ('state_dict', 'distiller_state'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
