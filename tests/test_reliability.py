"""Reliability: exact resume (SIGKILL and SIGTERM), corrupt checkpoints, no overwrite, non-finite losses,
one-sentence errors for bad input that write nothing, and a dead DDP rank not hanging the others."""
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
     'has 100 classes, but the teacher is built for 10'),
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
    monkeypatch.setattr(train, '_fresh_run', {})
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # as python_env() sets for a new process
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
    args = [a.replace('{root}', str(files)) for a in args]
    fragment = fragment.replace('{root}', str(files))
    out = tmp_path / 'out'
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
    assert not (out / 'run').exists()
    assert sorted(p.relative_to(files) for p in files.rglob('*')) == before


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
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533',
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
