"""benchmark_loader.py: it times train.py's training loader, built from train.py's flags."""
import argparse
import json

import pytest

import benchmark_loader
from tests.helpers import run_script


@pytest.mark.e2e
def test_loader_bench_times_train_py_loader_on_generated_jpegs(tmp_path):
    out = tmp_path / 'loader.json'
    proc = run_script('benchmark_loader.py', '-b', '4', '--img-size', '32', '--loader-batches', '2',
                      '--loader-workers', '0', '1', '--device', 'cpu', '--hflip', '0', '--seed', '3',
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
def test_loader_bench_reads_train_py_flags_and_config(tmp_path):
    """train.py's flags and -c YAML set the loader (CLI over YAML); a dataset larger than the timed batches is read
    from a mid-epoch start, so each epoch ends at its last timed batch."""
    config = tmp_path / 'c.yaml'
    config.write_text('batch_size: 5\nimg_size: 24\nsynthetic_train_size: 60\n')
    out = tmp_path / 'loader.json'
    run_script('benchmark_loader.py', '-c', config, '--dataset', 'synthetic', '-b', '3', '--loader-batches', '2',
               '--loader-workers', '1', '--device', 'cpu', '--results-file', out)
    row, = json.loads(out.read_text())
    assert (row['batch_size'], row['img_size'], row['timed_batches'], row['source']) == (3, 24, 4, 'synthetic')


@pytest.mark.parametrize('flags, message', [
    (['--bogus-flag', '1'], 'unknown flag --bogus-flag'),
    (['--synthetic-train-size', '6'], 'has 6 training images, fewer than two batches of 4; lower --batch-size'),
    (['--aa', 'bogus'], "the training augmentation cannot be built (--aa 'bogus'"),
    (['--model', 'no_such_net'], "unknown model 'no_such_net'"),
    (['--loader-batches', '0'], '--loader-batches must be at least 1, not 0'),
])
def test_loader_bench_errors_are_one_clear_sentence(capsys, flags, message):
    assert benchmark_loader.main(['--dataset', 'synthetic', '-b', '4', '--img-size', '32', '--loader-workers', '0',
                                  '--device', 'cpu', *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith('benchmark_loader.py: error: ') and message in err and err.count('\n') == 1


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
