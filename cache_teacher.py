#!/usr/bin/env python3
""" Write a teacher knowledge cache: the teacher's top-K classes and probabilities for every (epoch, sample) of a
training recipe's data stream, read back by `train.py --teacher-cache DIR` (docs/cache.md).

It takes train.py's own flags and config files, so the recipe is the same by construction, plus --cache-dir,
--cache-topk, --cache-dtype and --overwrite. Under torchrun each process writes its own shard.

    python cache_teacher.py -c configs/cifar100/resnet56_resnet20_kd.yaml --teacher-checkpoint T.pth.tar \\
        --cache-dir caches/resnet56-c100
    python train.py -c configs/cifar100/resnet56_resnet20_kd.yaml --teacher-cache caches/resnet56-c100
"""
import argparse
import datetime
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import init_distributed_device

import train
from cli import UsageError, exit_process, number, report_user_error
from data import DatasetError, create_datasets
from data.loader import build_train_transform, create_train_loader, student_data_config
from data.mixup import GlobalBatchMixup, mixup_requested
from data.teacher_cache import (CACHE_FORMAT, CACHE_VERSION, CacheWriter, TeacherCacheError,
                                dataset_identity, read_manifest, record_dtype, remove_cache, same_cache,
                                stream_identity, write_manifest)
from distillers import DistillerError, get_distiller_class
from models.checkpoint import CheckpointError, file_sha256
from models.factory import ModelError

_logger = logging.getLogger('cache_teacher')

group = train.parser.add_argument_group('Teacher cache (cache_teacher.py)')
group.add_argument('--cache-dir', default='', type=str, metavar='DIR', help='folder the cache is written to')
group.add_argument('--cache-topk', type=number(int, 1), default=10, metavar='K',
                   help='classes stored per sample and epoch, the most probable first (default: 10; the number of '
                        'classes stores the whole distribution)')
group.add_argument('--cache-dtype', default='float16', choices=['float16', 'float32'],
                   help='dtype of the stored probabilities (default: float16)')


def _decide_folder(args, manifest):
    """A refusal message, or '' when the cache may be written into args.cache_dir (clearing an old one under
    --overwrite)."""
    folder = args.cache_dir
    if not os.path.isdir(folder) or not os.listdir(folder):
        return ''
    if args.overwrite:
        return ''
    try:
        old = read_manifest(folder)
    except TeacherCacheError:
        return (f'--cache-dir {folder!r} already holds files and no teacher cache; pick an empty or new folder, or '
                f'pass --overwrite to write the cache there')
    differing = same_cache(old, manifest)
    if differing is None:
        return f'--cache-dir {folder!r} already holds this cache; nothing to write'
    return (f'--cache-dir {folder!r} already holds a different teacher cache (its {differing!r} differs); pick '
            f'another folder or pass --overwrite to replace it')


def main(argv=None):
    args, _ = train.parse_args(argv)
    if not args.cache_dir:
        raise UsageError('cache_teacher.py needs --cache-dir DIR, the folder the cache is written to')
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise UsageError(f'--device {args.device} asks for a GPU, but none is available; use --device cpu')
    device = init_distributed_device(args)
    logging.basicConfig(level=logging.INFO if args.rank == 0 else logging.WARNING, format='%(message)s',
                        stream=sys.stdout, force=True)
    torch.manual_seed(args.seed)
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if not args.teacher:
        raise UsageError('cache_teacher.py needs --teacher NAME (and --teacher-checkpoint FILE)')
    if args.teacher_train_mode:
        raise UsageError('--teacher-train-mode draws drop-path and batch statistics anew at every step, which a '
                         'cache cannot store; drop it')
    if get_distiller_class(args.distiller).two_view:
        raise UsageError(f'distiller {args.distiller!r} trains on two views of each image, which a teacher cache '
                         f'does not store; cache the recipe with a one-view logit method, e.g. --distiller kd')
    mixup_on = mixup_requested(args)
    if mixup_on and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix pair each image with another: --batch-size must be even, not '
                         f'{args.batch_size}')
    if args.num_classes is None and (args.dataset or '').lower() == 'synthetic':
        args.num_classes = args.synthetic_classes

    data_config = student_data_config(args)
    dataset_args = argparse.Namespace(**vars(args))
    dataset_args.input_size = tuple(data_config['input_size'])
    dataset_train, _, num_classes = create_datasets(dataset_args)
    num_classes = args.num_classes or num_classes
    if args.cache_topk > num_classes:
        raise UsageError(f'--cache-topk {args.cache_topk} exceeds the {num_classes} classes; give at most '
                         f'{num_classes}')
    topk = args.cache_topk

    teacher, identity, (t_mean, t_std) = train.build_teacher(args, num_classes, tuple(data_config['input_size']),
                                                             data_config['mean'], data_config['std'])
    if identity['checkpoint'] == 'random-init':
        raise UsageError(f'teacher {args.teacher!r} has random weights, which a cache cannot name; pass '
                         f'--teacher-checkpoint FILE')
    checkpoint = args.teacher_checkpoint or args.teacher_pretrained or ''
    teacher_record = {'name': args.teacher, 'checkpoint': identity['checkpoint'],
                      'sha256': file_sha256(checkpoint) if checkpoint else '', 'use_ema': bool(args.teacher_use_ema),
                      'kwargs': list(args.teacher_kwargs or [])}

    data_seed = args.seed if args.data_seed is None else args.data_seed
    global_batch = args.batch_size * args.world_size
    try:
        loader = create_train_loader(dataset_train, build_train_transform(args, data_config), args.batch_size,
                                     data_seed, args.workers, args.rank, args.world_size, args.pin_mem)
    except ValueError as e:
        raise UsageError(str(e)) from None
    batches = loader.sampler.batches_per_epoch()
    # the epochs train.py's schedule runs for this recipe (cooldown and --warmup-prefix included)
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=args.lr if args.lr is not None else args.lr_base)
    updates_per_epoch = (batches + args.grad_accum_steps - 1) // args.grad_accum_steps
    _, epochs = train.create_schedule(probe, args, updates_per_epoch)
    per_rank = batches * args.batch_size
    manifest = {
        'format': CACHE_FORMAT, 'version': CACHE_VERSION, 'teacher': teacher_record,
        'dataset': dataset_identity(dataset_args, dataset_train, num_classes),
        'stream': stream_identity(args, data_config, global_batch, data_seed),
        'epochs': int(epochs), 'records_per_epoch': per_rank * args.world_size, 'processes': args.world_size,
        'topk': topk, 'dtype': args.cache_dtype,
        'record_bytes': record_dtype(topk, num_classes, args.cache_dtype).itemsize,
    }
    decision = [_decide_folder(args, manifest) if args.rank == 0 else None]
    if args.distributed:
        dist.broadcast_object_list(decision, src=0)
    if decision[0]:
        if decision[0].endswith('nothing to write'):
            _logger.info(decision[0])
            return 0
        raise UsageError(decision[0])
    if args.rank == 0:
        os.makedirs(args.cache_dir, exist_ok=True)
        if args.overwrite:
            remove_cache(args.cache_dir)
    if args.distributed:
        dist.barrier()

    mixup_fn = None
    if mixup_on:
        mixup_fn = GlobalBatchMixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                                    prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                                    label_smoothing=args.smoothing, num_classes=num_classes, seed=data_seed,
                                    global_batch=global_batch)
    # the teacher's input as the distiller gives it (distillers/base.py teacher_input): re-normalized when the
    # teacher was trained with another mean/std
    renorm = None
    if tuple(t_mean) != tuple(data_config['mean']) or tuple(t_std) != tuple(data_config['std']):
        s_mean, s_std, m, s = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device)
                               for v in (data_config['mean'], data_config['std'], t_mean, t_std))
        renorm = (s_std / s, (s_mean - m) / s)
    teacher.eval().requires_grad_(False).to(device)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    forward = torch.compile(teacher, backend=args.torchcompile) if args.torchcompile else teacher
    amp_autocast, _ = train.create_amp(args, device)

    writer = CacheWriter(args.cache_dir, args.rank, args.world_size, epochs, per_rank, topk, num_classes,
                         args.cache_dtype)
    if args.rank == 0:
        size = manifest['record_bytes'] * per_rank * args.world_size * epochs
        _logger.info(f'Teacher {args.teacher} ({teacher_record["checkpoint"]}) -> {args.cache_dir}: {epochs} epochs '
                     f'of {per_rank * args.world_size} samples, top-{topk} {args.cache_dtype}, '
                     f'{manifest["record_bytes"]} bytes a record, {size / 2 ** 20:.1f} MiB; {args.world_size} '
                     f'process(es), global batch {global_batch}')
    start, done, total = time.time(), 0, epochs * batches
    log_start, log_images = start, 0
    for epoch in range(epochs):
        if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        loader.sampler.set_epoch(epoch)
        for batch_idx, (images, labels) in enumerate(loader):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mixup_fn is not None:
                images, _ = mixup_fn(images, labels, loader.sampler.batch_positions(batch_idx), epoch)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp_autocast(), torch.inference_mode():
                x = torch.addcmul(renorm[1].to(images.dtype), images, renorm[0].to(images.dtype)) \
                    if renorm is not None else images
                logits = forward(x)
            writer.write(epoch, batch_idx * args.batch_size, logits)
            done += 1
            log_images += images.shape[0] * args.world_size
            if args.rank == 0 and ((batch_idx + 1) % args.log_interval == 0 or batch_idx + 1 == batches):
                now = time.time()
                eta = (now - start) / done * (total - done)
                _logger.info(f'Cache: {epoch} [{batch_idx + 1:>4d}/{batches}]  '
                             f'{log_images / max(now - log_start, 1e-9):>7.1f} images/s  '
                             f'ETA: {datetime.timedelta(seconds=int(eta))}')
                log_start, log_images = now, 0
    shard = writer.close()
    shards = [shard]
    if args.distributed:
        shards = [None] * args.world_size
        dist.all_gather_object(shards, shard)
    if args.rank == 0:
        manifest['shards'] = shards
        manifest['created'] = datetime.datetime.now().isoformat(timespec='seconds')
        write_manifest(args.cache_dir, manifest)
        rate = total * global_batch / max(time.time() - start, 1e-9)
        _logger.info(f'Wrote {len(shards)} shard(s) and {args.cache_dir}/manifest.json: '
                     f'{sum(s["bytes"] for s in shards) / 2 ** 20:.1f} MiB, {rate:.1f} images/s')
    return 0


def run():
    debug = '--debug' in sys.argv
    try:
        code = main()
    except (UsageError, DatasetError, DistillerError, CheckpointError, ModelError) as e:
        if debug:
            raise
        code = report_user_error('cache_teacher.py', e)
    exit_process(code)


if __name__ == '__main__':
    run()
