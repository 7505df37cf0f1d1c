#!/usr/bin/env python3
""" UFD-KD loader benchmark: how fast train.py's training loader delivers batches.

It builds train.py's training loader alone (the same dataset, augmentation, sampler and per-sample seeding, from
train.py's flags) for each `--loader-workers` count and times it over two epochs, with pinned memory on and off on
CUDA, each batch copied to the device as train.py does: img/s, to compare with the training step's
(benchmark.py), and each epoch's first-batch wait. The loader keeps up when its img/s is at least the step's.
Without --dataset/--data-dir it reads a generated folder of ImageNet-sized JPEGs.

Every other flag is train.py's, with its defaults (`-c config.yaml` too):

    python benchmark_loader.py -b 128 --loader-workers 0 4 8 16
    python benchmark_loader.py --data-dir /data/imagenet --aa rand-m9-mstd0.5 --loader-workers 8
"""
import argparse
import logging
import os
import sys
import tempfile
import time
from collections import OrderedDict

import timm

import models  # noqa: F401  (registers the CIFAR models in timm)
import train
from benchmark import fmt_num, machine_description, markdown_table, report, resolve_device, synchronize
from cli import ArgumentParser, UsageError, report_user_error
from data import DatasetError, create_datasets
from data.loader import build_train_transform, create_train_loader, student_data_config
from data.synthetic import write_jpeg_folder


def build_parser():
    parser = ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Any other flag is train.py\'s (python train.py --help): -b, --img-size, --model, --dataset, '
               '--data-dir, --device, the augmentation flags, -c CONFIG ...')
    parser.add_argument('--loader-workers', type=int, nargs='+', default=None, metavar='N',
                        help='loader processes to try, as train.py --workers (default: 0 and one per available core)')
    parser.add_argument('--loader-batches', type=int, default=10, metavar='N',
                        help='timed batches per epoch, after each epoch\'s first (default: 10)')
    parser.add_argument('--results-file', default='', metavar='FILE', help='write the rows to a csv or json file')
    parser.add_argument('--results-format', default='', choices=['', 'csv', 'json'],
                        help='format of --results-file (default: from its extension, else csv)')
    return parser


def time_loader(loader, device, timed):
    """(seconds to each epoch's first batch, images in the timed batches, their seconds), over two epochs."""
    per_epoch = loader.sampler.batches_per_epoch()
    first_batch_s, images_seen, timed_s = [], 0, 0.0
    for epoch in range(2):
        # each epoch ends at its last timed batch (a mid-epoch start, as train.py resumes): persistent workers
        # would otherwise make epoch 2 wait for epoch 1's left-over prefetched batches
        loader.sampler.set_epoch(epoch, start_batch=per_epoch - (timed + 1))
        start = time.perf_counter()
        batches = iter(loader)
        images, labels = next(batches)
        images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        synchronize(device)
        first_batch_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(timed):
            images, labels = next(batches)
            images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            images_seen += images.shape[0]
        synchronize(device)
        timed_s += time.perf_counter() - start
        del batches
    return first_batch_s, images_seen, timed_s


def bench_loader(args, targs):
    device = resolve_device(targs.device)
    if args.loader_batches < 1:
        raise UsageError(f'--loader-batches must be at least 1, not {args.loader_batches}')
    workers_list = args.loader_workers if args.loader_workers is not None else [0, len(os.sched_getaffinity(0))]
    if min(workers_list) < 0:
        raise UsageError(f'--loader-workers takes counts of 0 or more, got {workers_list}')
    if not timm.is_model(targs.model):
        raise UsageError(f'unknown model {targs.model!r}: not in the timm registry nor in models/')
    batch_size = targs.batch_size
    if batch_size < 1:
        raise UsageError(f'--batch-size must be at least 1, not {batch_size}')
    pin_choices = (False, True) if device.type == 'cuda' else (False,)  # pinning needs an accelerator
    data_config = student_data_config(targs)
    targs.input_size = tuple(data_config['input_size'])
    rows = []
    with tempfile.TemporaryDirectory(prefix='ufdkd-loader-') as tmp:
        if targs.dataset or targs.data_dir:
            source = targs.dataset or targs.data_dir
        else:
            # each epoch: one untimed batch (the workers' start), then the timed ones; every class in both splits
            train_images = batch_size * (args.loader_batches + 1)
            classes = min(4, train_images)
            write_jpeg_folder(tmp, train_images, classes, num_classes=classes)
            targs.data_dir = tmp
            source = 'generated JPEG folder (500x375)'
        try:
            dataset, _, _ = create_datasets(targs)
            transform = build_train_transform(targs, data_config)
        except (DatasetError, ValueError) as e:
            raise UsageError(str(e)) from None
        for workers in workers_list:
            for pin_memory in pin_choices:
                try:
                    loader = create_train_loader(dataset, transform, batch_size, targs.seed, workers,
                                                 pin_memory=pin_memory)
                except ValueError as e:
                    raise UsageError(str(e)) from None
                timed = min(args.loader_batches, loader.sampler.batches_per_epoch() - 1)
                if timed < 1:
                    raise UsageError(f'{source} has {len(dataset)} training images, fewer than two batches '
                                           f'of {batch_size}; lower --batch-size')
                first_batch_s, images_seen, timed_s = time_loader(loader, device, timed)
                del loader  # ends the persistent workers
                rows.append(OrderedDict(
                    source=source, model=targs.model, batch_size=batch_size, img_size=targs.input_size[-1],
                    device=str(device), workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                    img_per_sec=round(images_seen / timed_s, 1), batch_ms=round(timed_s * 1000 / (2 * timed), 1),
                    first_batch_s_epoch1=round(first_batch_s[0], 3), first_batch_s_epoch2=round(first_batch_s[1], 3),
                    timed_batches=2 * timed))
    return rows, device


def print_rows(rows, machine):
    print(f'\nMachine: {machine}')
    print(f'Data: {rows[0]["source"]}, batch {rows[0]["batch_size"]} at {rows[0]["img_size"]} px, train.py\'s '
          f'augmentation for {rows[0]["model"]}')
    header = ['workers', 'pin memory', 'img/s', 'ms/batch', 'first batch s (epoch 1 / 2)']
    table = [[str(r['workers']), 'yes' if r['pin_memory'] else 'no', fmt_num(r['img_per_sec'], '.1f'),
              fmt_num(r['batch_ms'], '.1f'),
              f'{r["first_batch_s_epoch1"]:.3f} / {r["first_batch_s_epoch2"]:.3f}'] for r in rows]
    print(markdown_table(header, table))
    print('\nThe loader keeps up when its img/s is at least the training step\'s (benchmark.py). With workers, they '
          'persist across epochs, so epoch 2\'s first batch does not wait for processes to start.')


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args, rest = build_parser().parse_known_args(argv)
    try:
        targs, _ = train.parse_args(rest)
        if targs.data and not targs.data_dir:
            targs.data_dir = targs.data
        rows, device = bench_loader(args, targs)
    except UsageError as e:
        return report_user_error('benchmark_loader.py', e)
    return report(rows, print_rows, machine_description(device, threads=False), args)


if __name__ == '__main__':
    sys.exit(main())
