#!/usr/bin/env python3
""" UFD-KD benchmark: what distillation costs per training step.

In the tradition of timm's benchmark.py. It times train.py's own training step (`train.train_step`: forward under
autocast, the losses, backward, gradient clipping, the optimizer update) of each `--distiller` (one, several or
`all`) against the same step of the student trained alone, the teacher's forward as the distiller runs it, and
timm's `LogitDistillationTask` (the peer) for the same pair. Every variant lives in one process and they are timed
round-robin (several rounds, the order rotated each round, the median reported) so that machine drift hits all
alike. Inputs are one random batch, or one fixed batch of `--dataset`/`--data-dir`, preloaded on the device.

Every other flag is train.py's, with train.py's defaults (`-c config.yaml` too): the model, the teacher, the batch
size, precision, the optimizer and each method's parameters. The timed step is the one that train.py runs with the
same flags. Without `--teacher`, methods that need one get a randomly initialized resnet50 (random weights time
the same as trained ones).

    python benchmark.py --model resnet18 --teacher resnet50 --distiller kd dkd ufd -b 32
    python benchmark.py --model resnet18 --teacher swin_tiny_patch4_window7_224 --distiller all -b 64 --amp \\
        --amp-dtype bfloat16 --channels-last --results-file bench.csv

Ratios:
- `overhead` = distill_step / (student_step + teacher_forward): 1.00 means distillation costs nothing beyond
  running the teacher; above it is the method's own cost (loss math, projectors, extra feature taps).
- `net` = distill_step / (student_step + teacher_forward + own modules), the method's own modules (projectors,
  generators, heads; their forward FLOPs counted by FlopCounterMode) priced at the student's measured time per
  FLOP. For logit methods it equals `overhead`; for feature methods it is the overhead beyond their modules'
  arithmetic.
- `vs_timm` (kd only) = kd_step / the step of timm's LogitDistillationTask, run through the same train_step.
- `--cached` (docs/cache.md): `kd@cache` = the kd step reading the teacher's records from a cache of the batch, as
  train.py does each step, / the student step (target <= 1.02); `cache_writer` = the cache writer's images/s / the
  teacher's inference alone (target >= 0.9).
The teacher forward is timed as the distiller runs it (torch.inference_mode unless the distiller opts out) and,
as a second row, under the other grad mode. On CUDA, `host_syncs` counts what CUDA's sync debug mode flags as
synchronizing in one step (`.item()`, boolean-mask indexing, `nonzero`): a step should have none.

The data loader has its own benchmark (benchmark_loader.py); accuracy at small scale is results.py's.
"""
import argparse
import contextlib
import copy
import csv
import dataclasses
import gc
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn

import models  # noqa: F401  (registers the CIFAR models in timm)
import train
from cli import ArgumentParser, UsageError, report_user_error
from data.loader import student_data_config
from data.teacher_cache import (CACHE_FORMAT, CACHE_VERSION, CachedTeacher, CacheWriter, TeacherCache,
                                write_manifest)
from distillers import DISTILLERS, DistillerError
from distillers.vanilla import Vanilla
from models.factory import ModelError, create_model_at_size

_logger = logging.getLogger('benchmark')
DEFAULT_TEACHER = 'resnet50'


def build_parser():
    parser = ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Any other flag is train.py\'s (python train.py --help): --model, --teacher, -b, --img-size, --amp, '
               '--channels-last, --torchcompile, --opt, --clip-grad, --no-nan-check, -c CONFIG, method flags ...')
    parser.add_argument('--distiller', nargs='+', default=['kd'], metavar='NAME',
                        help=f'one or more of {", ".join(DISTILLERS)}, or all (default: kd)')
    parser.add_argument('--num-warm-iter', type=int, default=3, metavar='N',
                        help='untimed steps per variant before timing (default: 3)')
    parser.add_argument('--num-bench-iter', type=int, default=10, metavar='N',
                        help='timed steps per variant, spread over --rounds (default: 10)')
    parser.add_argument('--rounds', type=int, default=None, metavar='N',
                        help='round-robin rounds over the variants, the median over rounds is reported (default: '
                             '--num-bench-iter, one step per variant per round: the finest interleaving)')
    parser.add_argument('--no-peer', action='store_true', help='do not time timm\'s LogitDistillationTask')
    parser.add_argument('--cached', action='store_true', default=False,
                        help='add the cached rows: kd from a teacher cache, and the cache writer (docs/cache.md)')
    parser.add_argument('--cache-topk', type=int, default=10, metavar='K', help='K of the cached rows (default: 10)')
    parser.add_argument('--cache-dtype', default='float16', choices=['float16', 'float32'],
                        help='dtype of the cached rows (default: float16)')
    parser.add_argument('--no-flops', action='store_true', default=False, help='skip the FLOP counts')
    parser.add_argument('--no-memory', action='store_true', default=False, help='skip the peak-memory pass')
    parser.add_argument('--results-file', default='', metavar='FILE', help='write the rows to a csv or json file')
    parser.add_argument('--results-format', default='', choices=['', 'csv', 'json'],
                        help='format of --results-file (default: from its extension, else csv)')
    return parser


def parse_args(argv):
    """(the benchmark's arguments, train.py's arguments): flags the benchmark does not know go to train.py."""
    args, rest = build_parser().parse_known_args(argv)
    args.rounds = args.num_bench_iter if args.rounds is None else args.rounds
    if args.rounds < 1 or args.num_bench_iter < 1 or args.num_warm_iter < 0:
        raise UsageError('--rounds and --num-bench-iter must be at least 1, --num-warm-iter at least 0')
    args.distiller = resolve_distiller_names(args.distiller)
    targs, _ = train.parse_args(rest)
    # one process: train_step reads these, train.py sets them from the launcher
    targs.distributed, targs.world_size, targs.rank = False, 1, 0
    targs.data_dir = targs.data_dir or targs.data
    return args, targs


def resolve_distiller_names(names):
    if any(n.lower() == 'all' for n in names):
        return list(DISTILLERS)
    unknown = [n for n in names if n.lower() not in DISTILLERS]
    if unknown:
        raise UsageError(f'unknown distiller {unknown[0]!r}; choose from {", ".join(DISTILLERS)} or all')
    return [n.lower() for n in names]


# ==================================================================================================== helpers
def resolve_device(name):
    if name is None:
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UsageError(f'--device {name} asks for a GPU, but none is available; use --device cpu')
    return torch.device(name)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def machine_description(device, threads=True):
    cpu = platform.processor() or 'unknown CPU'
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    text = f'{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}'
    if threads:
        text += f', {torch.get_num_threads()} threads'
    if device.type == 'cuda':
        text = f'{torch.cuda.get_device_name(device)}; host {text}'
    with contextlib.suppress(OSError):
        text += f', load average {os.getloadavg()[0]:.1f}'
    return text


def write_rows(rows, path, fmt=''):
    fmt = fmt or ('json' if str(path).lower().endswith('.json') else 'csv')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w', newline=None if fmt == 'json' else '') as f:
        if fmt == 'json':
            json.dump(rows, f, indent=2)
        else:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            w.writeheader()
            w.writerows(rows)


def fmt_num(value, spec='.2f', missing='-'):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def markdown_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


class PeakMemory:
    """Peak memory of one call above what was held before it.

    CUDA: max_memory_allocated. CPU: the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the
    resident set before the call: an approximation (the allocator keeps freed small blocks, so it undercounts what
    fits in them), and None where /proc cannot be used this way.
    """

    def __init__(self, device):
        self.device = device
        self.available = device.type == 'cuda'
        if device.type == 'cpu' and sys.platform.startswith('linux'):
            with contextlib.suppress(OSError):
                self._reset_cpu()
                self._status('VmHWM:')
                self.available = True

    @staticmethod
    def _status(key):
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise OSError(f'{key} not in /proc/self/status')

    @staticmethod
    def _reset_cpu():
        gc.collect()
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')

    def measure(self, fn):
        """Bytes, or None when not measurable."""
        if not self.available:
            fn()
            return None
        if self.device.type == 'cuda':
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        self._reset_cpu()
        base = self._status('VmRSS:')
        fn()
        return max(self._status('VmHWM:') - base, 0)


def count_host_syncs(fn):
    """Host-device synchronizations in one call of `fn`, as CUDA's sync debug mode reports them (CUDA only).

    A step should have none (`.item()`-like reads, boolean-mask indexing and nonzero() stall the host until the
    GPU catches up, so the GPU then idles while the next kernels are queued). The NaN check's wait on its own
    pinned copy (train.py's StepFlags) is not flagged, and costs little.
    """
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum('synchroniz' in str(w.message) for w in caught)


def count_flops(fn):
    """FLOPs of one call (torch.utils.flop_counter: matmuls and convolutions), or None where it fails."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()
    except Exception as e:  # an op the counter cannot follow: report it as missing rather than stop
        _logger.warning(f'FLOP count failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})')
        return None


# ==================================================================================================== steps
class Variant:
    """One timed thing: a callable that runs a step, and where its numbers go."""

    def __init__(self, name, kind, step, distiller=None):
        self.name, self.kind, self.step, self.distiller = name, kind, step, distiller
        self.round_ms, self.peak_bytes, self.host_syncs = [], None, None


def train_step_fn(model, module, batch, targs, device):
    """train.py's step (train.train_step) of `model` on the fixed batch (images, labels, extras), with train.py's
    optimizer and scaler for `module` built from train.py's flags, and its NaN check when --nan-check is on."""
    images, labels, extras = batch
    optimizer = train.create_optimizer(module, targs)
    amp_autocast, loss_scaler = train.create_amp(targs, device)
    trainable = [p for p in module.parameters() if p.requires_grad]
    step_flags = train.StepFlags(device) if targs.nan_check else None

    def step():
        train.train_step(model, images, labels, 0, optimizer, loss_scaler, amp_autocast, targs, trainable,
                         step_flags=step_flags, batch_extras=extras)
    return step


class TimmTaskAdapter(nn.Module):
    """timm's LogitDistillationTask behind the distiller interface train_step calls: (logits, losses)."""

    def __init__(self, task):
        super().__init__()
        self.task = task

    def forward(self, images, labels, epoch=0):
        return None, {'loss': self.task(images, labels)['loss']}


def distiller_batch(distiller, images, labels, dataset_size):
    """(images, labels, extras) of the batch a distiller declares (distillers/base.py): two views of each image
    (the second one flipped: its content does not change the time), the sample indices of the batch within a
    training set of `dataset_size` samples, which the distiller is told the classes of."""
    extras = {}
    if distiller.two_view:
        images = torch.cat([images, images.flip(-1)])
    if distiller.needs_sample_indices:
        size = max(dataset_size, len(labels))
        distiller.set_train_targets(labels.tolist() + [int(t) for t in torch.randint(
            0, int(labels.max()) + 1, (size - len(labels),))])
        extras['sample_index'] = torch.arange(len(labels), device=labels.device)
    return images, labels, extras


def capture_teacher_requests(distiller, batch, amp_autocast):
    """The FeatureRequests a distiller hands to teacher_forward in one forward (None = logits only)."""
    requests = []
    bound = distiller.teacher_forward

    def recording(x, request=None):
        requests.append(request)
        return bound(x, request)
    distiller.teacher_forward = recording  # an instance attribute in front of the method, for this call only
    images, labels, extras = batch
    try:
        with torch.no_grad(), amp_autocast():
            distiller(images, labels, epoch=0, **extras)
    finally:
        del distiller.teacher_forward
    return requests


def teacher_step_fn(distiller, requests, amp_autocast, images, inference_mode):
    """The teacher forward(s) of one distill step, as the distiller runs them, under torch.inference_mode (True) or
    torch.no_grad (False)."""
    own_mode = distiller.teacher_inference_mode

    def step():
        distiller.teacher_inference_mode = inference_mode
        try:
            with amp_autocast():
                # returned, so that a compiled version cannot drop the work as dead code
                return [distiller.teacher_forward(images, request) for request in requests]
        finally:
            distiller.teacher_inference_mode = own_mode
    return step


def describe_requests(requests):
    """Per FeatureRequest, '; '-joined: 'logits', or what else it asks for (stages, blocks, final map, ...)."""
    def describe(request):
        fields = dataclasses.asdict(request).items() if request is not None else ()
        parts = [k if v is True else f'{k}={"/".join(map(str, v))}' for k, v in fields if v not in ((), False, None)]
        return 'logits+' + ','.join(parts) if parts else 'logits'
    return '; '.join(map(describe, requests))


def load_batch(targs, input_size, data_config, num_classes):
    """One batch: random tensors, or the first images of --dataset/--data-dir with train.py's eval transform (the
    fixed batch keeps the loader and the augmentation out of the timing)."""
    batch_size = targs.batch_size
    if not (targs.dataset or targs.data_dir):
        return torch.randn(batch_size, *input_size), torch.randint(0, num_classes, (batch_size,))
    from data import create_eval_dataset
    from data.loader import build_eval_transform
    dataset = create_eval_dataset(targs.dataset, targs.data_dir or None, 'val', input_size[-1], num_classes,
                                  max(batch_size, 64), 0)
    transform = build_eval_transform(data_config)
    samples = [dataset[i % len(dataset)] for i in range(batch_size)]
    images = torch.stack([transform(img) for img, _ in samples])
    return images, torch.tensor([int(t) for _, t in samples]) % num_classes


def cached_variants(args, make_kd, teacher, images, labels, num_classes, amp_autocast, timed_step, folder):
    """{'kd': the kd step (`make_kd(teacher)` builds the distiller) reading its teacher from a cache of this batch
    through train.py's per-step code (CachedTeacher.load_batch, then train_step), 'writer': cache_teacher.py's
    step (the teacher's inference, its top-K records written to a memory map), 'teacher': that inference alone}."""
    topk, n = args.cache_topk, len(images)

    def infer():
        with amp_autocast(), torch.inference_mode():
            return teacher(images)
    written = CacheWriter(folder, 0, 1, 1, n, topk, num_classes, args.cache_dtype)
    written.write(0, 0, infer())
    write_manifest(folder, {'format': CACHE_FORMAT, 'version': CACHE_VERSION, 'topk': topk, 'dtype': args.cache_dtype,
                            'processes': 1, 'records_per_epoch': n, 'epochs': 1, 'dataset': {'classes': num_classes},
                            'shards': [written.close()]})
    kd = make_kd(CachedTeacher(TeacherCache.open(folder)))
    kd_step, positions = timed_step(kd, (images, labels, {})), torch.arange(n)

    def cached_kd():
        kd.teacher.load_batch(0, positions, images.device)
        kd_step()
    epochs = 64  # the writer moves on to fresh pages of its map at each step, as it does through an epoch
    writer, calls = CacheWriter(folder, 0, 1, epochs, n, topk, num_classes, args.cache_dtype), itertools.count()
    return {'kd': Variant('kd@cache', 'cached', cached_kd, kd),
            'writer': Variant('cache_writer', 'cached', lambda: writer.write(next(calls) % epochs, 0, infer())),
            'teacher': Variant('teacher:logits@inference_mode[alone]', 'cached', infer)}


def time_round_robin(variants, warm, iters, rounds, device):
    for v in variants:
        for _ in range(warm):
            v.step()
    synchronize(device)
    per_round = max(1, math.ceil(iters / rounds))
    for r in range(rounds):
        # rotate the order so that no variant always runs right after the same one
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(per_round):
                v.step()
            synchronize(device)
            v.round_ms.append((time.perf_counter() - start) * 1000 / per_round)


# ==================================================================================================== benchmark
def bench_train(args, targs):
    device = resolve_device(targs.device)
    torch.backends.cudnn.benchmark = not targs.deterministic  # as train.py
    data_config = student_data_config(targs)
    input_size = tuple(data_config['input_size'])
    synthetic = (targs.dataset or '').lower() == 'synthetic'
    num_classes = targs.num_classes or (targs.synthetic_classes if synthetic else 1000)
    amp_autocast, _ = train.create_amp(targs, device)
    if args.cached and not 1 <= args.cache_topk <= num_classes:
        raise UsageError(f'--cache-topk {args.cache_topk} is not between 1 and the {num_classes} classes')

    torch.manual_seed(targs.seed)
    student = create_model_at_size(targs.model, input_size, num_classes=num_classes,
                                   **train.parse_kwargs(targs.model_kwargs, '--model-kwargs'))

    def prepare(module, training=True):
        module.to(device)
        if targs.channels_last:
            module.to(memory_format=torch.channels_last)
        return module.train(training)

    teacher = teacher_norm = None
    if args.cached or any(DISTILLERS[n].needs_teacher for n in args.distiller):
        targs.teacher = targs.teacher or DEFAULT_TEACHER
        teacher, _, teacher_norm = train.build_teacher(targs, num_classes, input_size, data_config['mean'],
                                                       data_config['std'])
        prepare(teacher, training=False)

    images, labels = load_batch(targs, input_size, data_config, num_classes)
    images, labels = images.to(device), labels.to(device)
    if targs.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    criterion = train.create_train_loss(targs, mixup_active=False)

    def compiled(module):  # as train.py: the whole distiller (teacher forward included) is compiled
        return torch.compile(module, backend=targs.torchcompile) if targs.torchcompile else module

    def timed_step(module, batch):
        return train_step_fn(compiled(module), module, batch, targs, device)

    baseline = prepare(Vanilla(copy.deepcopy(student), None, criterion, targs, input_size))
    student_variant = Variant('student', 'student', timed_step(baseline, (images, labels, {})), baseline)
    variants, rows_info = [student_variant], OrderedDict()

    # (requests, grad mode, images) -> (the teacher forward as the distiller runs it, under the other grad mode)
    teacher_variants = {}
    for name in args.distiller:
        cls = DISTILLERS[name]
        info = rows_info[name] = {'status': 'ok', 'requests': (), 'variant': None}
        try:
            distiller = cls(copy.deepcopy(student), teacher if cls.needs_teacher else None, criterion, targs,
                            input_size)
            if teacher is not None and cls.needs_teacher:
                distiller.set_teacher_normalization(data_config['mean'], data_config['std'], *teacher_norm)
            batch = distiller_batch(distiller, images, labels, targs.synthetic_train_size)
            prepare(distiller)
            requests = tuple(capture_teacher_requests(distiller, batch, amp_autocast)) \
                if cls.needs_teacher else ()
        except (NotImplementedError, DistillerError) as e:
            info['status'] = f'unsupported: {e}' if isinstance(e, DistillerError) else 'not implemented'
            continue
        info.update(requests=requests, batch=batch,
                    variant=Variant(name, 'distill', timed_step(distiller, batch), distiller))
        variants.append(info['variant'])
        requests_key = info['requests_key'] = (requests, distiller.teacher_inference_mode, len(batch[0]))
        if requests and requests_key not in teacher_variants:
            views = len(batch[0]) // len(images)
            key = f'teacher:{describe_requests(requests)}' + (f'[{views} views]' if views > 1 else '')
            # the distiller's own grad mode, then (uncompiled) the fast-path question: what does inference_mode
            # save over no_grad?
            own = distiller.teacher_inference_mode
            pair = teacher_variants[requests_key] = [
                Variant(f'{key}@{"inference_mode" if mode else "no_grad"}', 'teacher',
                        compiled(teacher_step_fn(distiller, requests, amp_autocast, batch[0], mode)), distiller)
                for mode in ((own,) if targs.torchcompile else (own, not own))]
            variants.extend(pair)

    peer = None
    if teacher is not None and not args.no_peer:
        from timm.task import LogitDistillationTask
        kd_weight = targs.kd_loss_weight if targs.kd_loss_weight is not None \
            else DISTILLERS['kd'].default_kd_loss_weight
        task = LogitDistillationTask(prepare(copy.deepcopy(student)), teacher, criterion=criterion,
                                     task_loss_weight=1.0 - kd_weight, temperature=targs.kd_temperature,
                                     device=device, verbose=False)
        task.to(device).train()
        peer = Variant('timm_kd', 'peer', train_step_fn(compiled(TimmTaskAdapter(task)), task.trainable_module,
                                                        (images, labels, {}), targs, device))
        variants.append(peer)

    cached, cache_dir = None, tempfile.TemporaryDirectory(prefix='benchmark-cache-') if args.cached else None
    if args.cached:
        cached = cached_variants(
            args, lambda t: prepare(DISTILLERS['kd'](copy.deepcopy(student), t, criterion, targs, input_size)),
            compiled(teacher), images, labels, num_classes, amp_autocast, timed_step, cache_dir.name)
        variants.extend(cached.values())

    _logger.info(f'Timing {len(variants)} variants: {args.num_warm_iter} warm-up + {args.num_bench_iter} steps each, '
                 f'{args.rounds} round-robin rounds, batch {targs.batch_size} at {input_size[-1]}px on {device}')
    time_round_robin(variants, args.num_warm_iter, args.num_bench_iter, args.rounds, device)

    if device.type == 'cuda':
        count_host_syncs(variants[0].step)  # the first count also sees one-time lazy initializations: discarded
        for v in variants:
            try:
                v.host_syncs = count_host_syncs(v.step)
            except RuntimeError as e:  # a build without the sync debug mode: the column stays empty
                _logger.warning(f'host-sync count unavailable: {e}')
                break

    if not args.no_memory:
        meter = PeakMemory(device)
        for v in variants:
            v.peak_bytes = meter.measure(v.step)

    flops = {}
    if not args.no_flops:
        # forward passes only, with autograd on as in training (the counter's module tracker expects it)
        with amp_autocast():
            flops['student'] = count_flops(lambda: baseline.student(images))
            for key, (v, *_) in teacher_variants.items():
                rows = images if key[2] == len(images) else torch.cat([images] * (key[2] // len(images)))
                flops[key] = count_flops(lambda: [v.distiller.teacher_forward(rows, r) for r in key[0]])
            for name, info in rows_info.items():
                if info['variant'] is not None:
                    d = info['variant'].distiller
                    b_images, b_labels, extras = info['batch']
                    flops[name] = count_flops(lambda: d(b_images, b_labels, epoch=0, **extras))
                    d.zero_grad(set_to_none=True)
    common = OrderedDict(model=targs.model, teacher=targs.teacher if teacher is not None else '',
                         batch_size=targs.batch_size, img_size=input_size[-1], device=str(device),
                         amp=targs.amp_dtype if targs.amp else 'off', channels_last=targs.channels_last,
                         compile=targs.torchcompile or 'off')
    if cache_dir is not None:
        cache_dir.cleanup()
    return result_rows(student_variant, teacher_variants, peer, rows_info, flops, common, cached), device


def result_rows(student_variant, teacher_variants, peer, rows_info, flops, common, cached=None):
    """One row per variant; the distill rows carry the ratios to the student step, teacher forward and peer, the
    cached rows theirs to the student step and the teacher's inference."""
    batch_size = common['batch_size']

    def median(v):
        return statistics.median(v.round_ms)

    def round3(value):
        return round(value, 3) if value is not None else None

    def gflops(value):
        return round(value / batch_size / 1e9, 4) if value is not None else None

    def base_row(v, **extra):
        row = OrderedDict(variant=v.name, kind=v.kind)
        row.update(common)
        row.update(step_ms=round(median(v), 3), step_ms_min=round(min(v.round_ms), 3),
                   step_ms_max=round(max(v.round_ms), 3), samples_per_sec=round(batch_size * 1000 / median(v), 2),
                   peak_mem_mb=round(v.peak_bytes / 2 ** 20, 1) if v.peak_bytes is not None else 'n/a',
                   host_syncs=v.host_syncs, **extra)
        return row

    student_ms = median(student_variant)
    peer_ms = median(peer) if peer is not None else None
    rows = [base_row(student_variant, student_gflops_per_img=gflops(flops.get('student')), status='ok')]
    for key, pair in teacher_variants.items():
        rows += [base_row(v, teacher_gflops_per_img=gflops(flops.get(key)), status='ok',
                          teacher_request=describe_requests(key[0])) for v in pair]
    if peer is not None:
        rows.append(base_row(peer, vs_timm=1.0, status='ok'))
    if cached:
        kd, writer, alone = cached['kd'], cached['writer'], cached['teacher']
        paired = [k / s for k, s in zip(kd.round_ms, student_variant.round_ms)]
        rows += [base_row(alone, teacher_request='logits', status='ok'), base_row(
            kd, student_step_ms=round(student_ms, 3), overhead=round(median(kd) / student_ms, 3),
            overhead_paired_median=round(statistics.median(paired), 3), overhead_paired_min=round(min(paired), 3),
            overhead_paired_max=round(max(paired), 3), status='ok'), base_row(
            writer, teacher_fwd_ms=round(median(alone), 3), writer_vs_teacher=round(median(alone) / median(writer), 3),
            writer_vs_teacher_paired_median=round(statistics.median(
                t / w for t, w in zip(alone.round_ms, writer.round_ms)), 3), status='ok')]
    for name, info in rows_info.items():
        v = info['variant']
        if v is None:
            rows.append(OrderedDict(variant=name, kind='distill', **common, status=info['status']))
            continue
        own_teacher, *other_teacher = teacher_variants[info['requests_key']] if info['requests'] else (None,)
        teacher_ms = median(own_teacher) if own_teacher is not None else 0.0
        own_mode_ms = teacher_ms if own_teacher is not None else None
        # the teacher forward under the grad mode the distiller does not use (none when compiled or teacherless)
        other_mode_ms = median(other_teacher[0]) if other_teacher else None
        in_inference_mode = v.distiller.teacher_inference_mode
        student_g, total_g = flops.get('student'), flops.get(name)
        teacher_g = (flops.get(info['requests_key']) if info['requests'] else 0) if flops else None
        own_g = net = None
        if None not in (student_g, teacher_g, total_g):
            own_g = max(total_g - student_g - teacher_g, 0)
            # the method's own modules priced at the student's measured time per FLOP (forward and backward
            # scale alike): what is left above 1 is overhead beyond the modules' arithmetic
            net = median(v) / (student_ms + teacher_ms + student_ms * own_g / student_g) if student_g else None
        # the same ratio paired round by round (every variant ran in every round, close in time): its spread says
        # how much the machine drifted during the measurement
        teacher_rounds = own_teacher.round_ms if own_teacher is not None else [0.0] * len(v.round_ms)
        paired = [d / (s + t) for d, s, t in zip(v.round_ms, student_variant.round_ms, teacher_rounds)]
        is_kd = peer_ms and name == 'kd'
        rows.append(base_row(
            v, student_step_ms=round(student_ms, 3), teacher_fwd_ms=round(teacher_ms, 3),
            teacher_grad_mode=('inference_mode' if in_inference_mode else 'no_grad') if own_mode_ms else None,
            teacher_fwd_no_grad_ms=round3(other_mode_ms if in_inference_mode else own_mode_ms),
            teacher_fwd_inference_mode_ms=round3(own_mode_ms if in_inference_mode else other_mode_ms),
            overhead=round(median(v) / (student_ms + teacher_ms), 3),
            overhead_paired_median=round(statistics.median(paired), 3),
            overhead_paired_min=round(min(paired), 3), overhead_paired_max=round(max(paired), 3),
            overhead_net=round3(net),
            vs_timm=round(median(v) / peer_ms, 3) if is_kd else None,
            vs_timm_paired_median=round(statistics.median(
                d / p for d, p in zip(v.round_ms, peer.round_ms)), 3) if is_kd else None,
            extra_params_m=round(v.distiller.extra_parameters() / 1e6, 4),
            student_gflops_per_img=gflops(student_g), teacher_gflops_per_img=gflops(teacher_g),
            distiller_gflops_per_img=gflops(own_g), teacher_calls=len(info['requests']),
            teacher_request=describe_requests(info['requests']), status='ok'))
    return rows


def overhead_text(row):
    if row.get('overhead') is None:
        return '-'
    return f'{row["overhead"]:.3f} ({row["overhead_paired_min"]:.2f}-{row["overhead_paired_max"]:.2f})'


def print_rows(rows, machine):
    print(f'\nMachine: {machine}')
    first = next((r for r in rows if 'step_ms' in r), rows[0])
    print(f'Student {first["model"]}, teacher {first["teacher"] or "-"}, batch {first["batch_size"]} at '
          f'{first["img_size"]}px, amp {first["amp"]}, channels_last {first["channels_last"]}, '
          f'compile {first["compile"]}\n')
    syncs = any(r.get('host_syncs') is not None for r in rows)
    header = ['variant', 'step ms', 'img/s', 'teacher ms', 'overhead', 'net', 'vs timm', 'peak MB',
              'extra M params', 'GFLOPs/img s/t/own'] + (['syncs'] if syncs else []) + ['status']
    table = []
    for r in rows:
        if 'step_ms' not in r:
            table.append([r['variant']] + ['-'] * (len(header) - 2) + [r['status']])
            continue
        g = '/'.join(fmt_num(r.get(k), '.3f') for k in ('student_gflops_per_img', 'teacher_gflops_per_img',
                                                          'distiller_gflops_per_img'))
        table.append([r['variant'], fmt_num(r['step_ms'], '.1f'), fmt_num(r['samples_per_sec'], '.1f'),
                      fmt_num(r.get('teacher_fwd_ms'), '.1f'), overhead_text(r),
                      fmt_num(r.get('overhead_net'), '.3f'), fmt_num(r.get('vs_timm'), '.3f'), r['peak_mem_mb'],
                      fmt_num(r.get('extra_params_m'), '.3f'), g]
                     + ([fmt_num(r.get('host_syncs'), 'd')] if syncs else []) + [r['status']])
    print(markdown_table(header, table))
    print('\noverhead = distill step / (student step + teacher forward), of the medians over rounds (in brackets: '
          'the range of the same ratio taken round by round). net = the same with the method\'s own modules added '
          'to the denominator at the student\'s measured time per FLOP. vs timm = kd step / timm '
          'LogitDistillationTask step. teacher:<request>@<mode>: the teacher forward of the distill step, under the '
          'grad mode the distiller uses (the one in the overhead) and, as a second row, under the other mode. Peak '
          'memory: above what was allocated before the step.'
          + (' syncs: operations in one step that CUDA\'s sync debug mode flags as synchronizing (.item(), '
             'boolean-mask indexing, nonzero); the NaN check\'s wait on its own pinned copy is not one of them.'
             if syncs else ''))
    cached = {r['variant']: r for r in rows if r['kind'] == 'cached'}
    if cached:
        print(f'cached: kd from the cache / student step = {overhead_text(cached["kd@cache"])} (target <= 1.02); '
              f'cache writer images/s / teacher inference images/s = {cached["cache_writer"]["writer_vs_teacher"]:.3f} '
              f'(target >= 0.9)')


def report(rows, print_rows, machine: str, args) -> int:
    """The end of a benchmark's main(): `print_rows(rows, machine)`, then the rows to --results-file (when given)
    in --results-format; returns the exit status, 0."""
    print_rows(rows, machine)
    if args.results_file:
        write_rows(rows, args.results_file, args.results_format)
        print(f'\nRows written to {args.results_file}')
    return 0


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args, targs = parse_args(argv)
        rows, device = bench_train(args, targs)
    except (UsageError, ModelError, DistillerError) as e:
        return report_user_error('benchmark.py', e)
    return report(rows, print_rows, machine_description(device), args)


if __name__ == '__main__':
    sys.exit(main())
