"""The teacher knowledge cache (cache_teacher.py, data/teacher_cache.py, train.py --teacher-cache) and the
process-independent mixup it relies on (data/mixup.py)."""
import shutil
import subprocess
import sys

import pytest
import timm
import torch

import models  # noqa: F401
from cli import UsageError
from data import DatasetError
from data.loader import EpochSampler
from data.mixup import GlobalBatchMixup
from data.teacher_cache import TeacherCache, topk_to_log_probs
from distillers.kd import kd_loss
from tests.helpers import REPO, python_env, run_script, run_train, train_in_process
from tests.test_training import step_losses

# 64 samples in 4 global batches of 16 per epoch; K = the 10 classes in float32 makes the cache exact; mixup and
# cutmix per element exercise every draw that must not depend on the number of processes
STREAM = ['--dataset', 'synthetic', '--synthetic-classes', '10', '--synthetic-train-size', '64',
          '--synthetic-val-size', '32', '--img-size', '32', '--workers', '0', '--log-interval', '1', '--seed', '0',
          '--epochs', '2', '--warmup-epochs', '0', '--mixup', '0.8', '--cutmix', '1.0', '--mixup-mode', 'elem']
# a student without BatchNorm, so that a batch split over two processes computes what one process does
STUDENT = ['--model', 'test_vit', '--distiller', 'kd', '--kd-temperature', '4', '--lr', '0.05', '--smoothing', '0']


def write_cache(folder, teacher, *extra, processes=1, check=True):
    args = [*STREAM, *STUDENT, '--teacher', 'test_resnet', '--teacher-checkpoint', teacher, '--cache-dir', folder,
            '--cache-topk', '10', '--cache-dtype', 'float32', *extra]
    if processes == 1:
        return run_script('cache_teacher.py', '--batch-size', '16', *args, check=check)
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={processes}', '--master_port=29531',
           str(REPO / 'cache_teacher.py'), '--batch-size', str(16 // processes), *[str(a) for a in args]]
    proc = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    """(folder of runs, teacher checkpoint, cache written by one process, the cached run, the live run)."""
    root = tmp_path_factory.mktemp('cache')
    torch.manual_seed(1)
    teacher = root / 'teacher.pth'
    torch.save(timm.create_model('test_resnet', num_classes=10).state_dict(), teacher)
    write_cache(root / 'cache', teacher)
    _, cached = run_train(root, *STREAM, *STUDENT, '--batch-size', '16', '--teacher-cache', root / 'cache',
                          experiment='cached', synthetic=False)
    _, live = run_train(root, *STREAM, *STUDENT, '--batch-size', '16', '--teacher', 'test_resnet',
                        '--teacher-checkpoint', teacher, experiment='live', synthetic=False)
    return root, teacher, root / 'cache', cached, live


def weights(run_dir, name='last.pth.tar'):
    return torch.load(run_dir / 'checkpoint' / name, map_location='cpu', weights_only=False)['state_dict']


# ------------------------------------------------------------------------------------------------ units
def test_topk_reconstruction_by_hand():
    # C = 5, K = 2: classes 3 and 0 hold 0.5 and 0.2; the 0.3 left is spread over the other three classes
    rebuilt = topk_to_log_probs(torch.tensor([[3, 0]]), torch.tensor([[0.5, 0.2]]), 5).exp()
    torch.testing.assert_close(rebuilt, torch.tensor([[0.2, 0.1, 0.1, 0.5, 0.1]]))
    # K = C: the stored distribution itself; a probability stored as 0 stays finite and adds nothing to KL
    full = topk_to_log_probs(torch.tensor([[1, 0, 2]]), torch.tensor([[1.0, 0.0, 0.0]]), 3)
    assert torch.isfinite(full).all() and full[0, 1] == 0
    student = torch.tensor([[0.0, 3.0, -1.0]])
    exact = kd_loss(student, torch.tensor([[-1e4, 0.0, -1e4]]), 1.0)
    torch.testing.assert_close(kd_loss(student, full, 1.0), exact)


def test_log_probabilities_are_the_logits_at_any_temperature():
    logits = torch.randn(4, 10) * 3
    probs, classes = logits.softmax(1).topk(10, dim=1)
    rebuilt = topk_to_log_probs(classes, probs, 10)
    student = torch.randn(4, 10)
    for t in (1.0, 4.0):
        torch.testing.assert_close(kd_loss(student, rebuilt, t), kd_loss(student, logits, t))


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_mixup_is_the_same_under_one_two_or_four_processes(mode):
    global_batch, batches = 8, 3
    images, labels = torch.randn(global_batch * batches, 3, 8, 8), torch.randint(0, 5, (global_batch * batches,))
    mixup = GlobalBatchMixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=5, seed=3,
                             global_batch=global_batch, prob=0.9)
    seen = {}
    for world in (1, 2, 4):
        for rank in range(world):
            sampler = EpochSampler(len(images), global_batch // world, rank=rank, world_size=world)
            for b in range(batches):
                positions = sampler.batch_positions(b)
                x, y = mixup(images[positions].clone(), labels[positions], positions, epoch=1)
                for row, p in enumerate(positions.tolist()):
                    if world == 1:
                        seen[p] = (x[row], y[row])
                    else:
                        assert torch.equal(seen[p][0], x[row]) and torch.equal(seen[p][1], y[row]), (world, p)
    assert any(not torch.equal(seen[p][0], images[p]) for p in seen)  # some images were mixed
    torch.testing.assert_close(torch.stack([seen[p][1] for p in seen]).sum(1), torch.ones(len(seen)))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.e2e
def test_cached_run_is_the_live_run_and_resumes_exactly(cache):
    root, _, folder, cached, live = cache
    theirs, mine = weights(live), weights(cached)
    for key in mine:
        torch.testing.assert_close(mine[key].float(), theirs[key].float(), rtol=1e-4, atol=1e-5)
    assert 'from the cache' in (cached / 'log.txt').read_text()
    run_train(root, *STREAM, *STUDENT, '--batch-size', '16', '--teacher-cache', folder, '--resume',
              cached / 'checkpoint' / 'checkpoint-0.pth.tar', experiment='resumed', synthetic=False)
    resumed = weights(root / 'resumed')
    assert all(torch.equal(resumed[k], mine[k]) for k in mine)


@pytest.mark.e2e
@pytest.mark.ddp
def test_two_processes_write_and_read_the_cache_of_one(cache):
    root, teacher, folder, cached, _ = cache
    write_cache(root / 'cache2', teacher, processes=2)
    one, two = TeacherCache.open(str(folder)), TeacherCache.open(str(root / 'cache2'))
    assert len(two.manifest['shards']) == 2
    for epoch in (0, 1):
        positions = torch.arange(64)
        (c1, p1), (c2, p2) = one.records(epoch, positions), two.records(epoch, positions)
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-7)
        assert torch.equal(c1[:, 0], c2[:, 0])
    # the 1-process cache under 2 processes: the losses of the 1-process run, step by step
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533',
           str(REPO / 'train.py'), *STREAM, *STUDENT, '--batch-size', '8', '--teacher-cache', str(folder),
           '--output', str(root), '--experiment', 'ddp']
    proc = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine, theirs = step_losses(root / 'ddp'), step_losses(cached)
    assert mine.keys() == theirs.keys() and theirs['train/loss_kd'].keys() == set(range(1, 9))
    for tag in theirs:
        for step, value in theirs[tag].items():
            assert mine[tag][step] == pytest.approx(value, rel=1e-4), (tag, step)


def _broken(folder, tmp_path, how):
    copy = tmp_path / 'broken'
    shutil.copytree(folder, copy)
    shard = copy / 'shard-000-of-001.bin'
    data = bytearray(shard.read_bytes())
    if how == 'missing':
        shard.unlink()
    elif how == 'truncated':
        shard.write_bytes(data[:-60])
    else:
        data[100] ^= 0xFF
        shard.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize('extra,message', [
    (['--hflip', '0.3'], '--hflip 0.5 in the cache, 0.3 here'),
    (['--mixup-mode', 'batch'], "--mixup-mode 'elem' in the cache, 'batch' here"),
    (['--batch-size', '8'], r'global batch \(--batch-size x processes\) 16 in the cache, 8 here'),
    (['--data-seed', '5'], '--data-seed 0 in the cache, 5 here'),
    (['--epochs', '3'], 'this run trains 3 epochs, but teacher cache'),
    (['--teacher', 'test_vit'], '--teacher test_vit differs from the teacher test_resnet'),
    (['--synthetic-seed', '1'], 'was written for the dataset synthetic'),
    (['--distiller', 'fitnet'], "distiller 'fitnet' reads more of the teacher than its logits"),
    (['--distiller', 'mlkd'], "distiller 'mlkd' runs the teacher on a second, strongly augmented view"),
    (['--broken', 'missing'], 'misses its shard shard-000-of-001.bin'),
    (['--broken', 'truncated'], 'shard-000-of-001.bin of teacher cache .* \\(truncated\\)'),
    (['--broken', 'corrupted'], 'shard-000-of-001.bin of teacher cache .* \\(corrupted\\)'),
    (['--not-a-cache'], 'is not a teacher cache'),
], ids=['flag', 'mixup-mode', 'global-batch', 'data-seed', 'epochs', 'teacher', 'dataset', 'feature-method',
        'two-view-method', 'missing-shard', 'truncated-shard', 'corrupted-shard', 'not-a-cache'])
def test_a_cache_that_cannot_serve_the_run_is_refused_before_anything_is_written(cache, tmp_path, extra, message):
    folder = cache[2]
    if extra[0] == '--broken':
        folder, extra = _broken(folder, tmp_path, extra[1]), []
    elif extra[0] == '--not-a-cache':
        folder, extra = tmp_path, []
    if '--teacher' in extra:
        extra = extra + ['--teacher-checkpoint', cache[1]]
    argv = [*STREAM, *STUDENT, '--batch-size', '16', '--teacher-cache', folder, *extra, '--output', tmp_path / 'out',
            '--experiment', 'run']
    with pytest.raises((UsageError, DatasetError), match=message):
        train_in_process(argv)
    assert not (tmp_path / 'out').exists()


@pytest.mark.e2e
def test_writing_into_a_folder_holding_another_cache_is_refused(cache):
    _, teacher, folder, _, _ = cache
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = write_cache(folder, teacher, '--cache-topk', '5', check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0
    assert "already holds a different teacher cache (its 'topk' differs)" in proc.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
