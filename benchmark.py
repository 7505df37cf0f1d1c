#!/usr/bin/env python3
""" UFD-KD benchmark: what distillation costs per training step, and what it buys at small scale.

In the tradition of timm's benchmark.py. Four modes (`--bench`):

- `train` (default): the speed of the distillation train step of each `--distiller` (one, several or `all`)
  against the student trained alone, the teacher's forward as the distiller runs it, and timm's
  `LogitDistillationTask` (the peer) for the same pair. Every variant lives in one process and they are timed
  round-robin (several rounds, the order rotated each round, median reported) so that machine drift hits all
  alike. Inputs are random tensors unless `--dataset`/`--data-dir` is given (one fixed batch, preloaded).

      python benchmark.py --model resnet18 --teacher resnet50 --distiller kd dkd ufd --img-size 224 -b 32
      python benchmark.py --model resnet18 --teacher swin_tiny_patch4_window7_224 --distiller all --amp \\
          --amp-dtype bfloat16 --channels-last --results-file bench.csv

- `ufd-loss`: the closed-form UFD losses of distillers/ufd.py against the DCT formulation of the paper
  (ufd.md §4.1, explicit DCT-II matrices built here, once), at B=64, C=768 on 7x7 and 14x14 maps: both times,
  the speedup, the tensor operations each dispatches (views excluded: on a GPU, the kernel launches that bound
  the time at these shapes) and the largest relative difference of the four terms.

      python benchmark.py --bench ufd-loss

- `loader`: train.py's training loader alone (the same dataset, augmentation and per-sample seeding, built from
  `--train-args` and the data flags) for each `--loader-workers` count, over two epochs, with pinned memory on
  and off on CUDA: img/s, to compare with the train step's, and each epoch's first-batch wait. Without a
  dataset it reads a generated folder of ImageNet-sized JPEGs.

      python benchmark.py --bench loader -b 128 --loader-workers 0 4 8 16
      python benchmark.py --bench loader --data-dir /data/imagenet --train-args "--aa rand-m9-mstd0.5"

- `results`: the small-scale results table. Trains through train.py (subprocesses, the commands users run) the
  teacher once, each student alone (vanilla), and each student with every distiller its pair supports: logit
  methods on the CNN pair (test_resnet -> test_efficientnet), feature methods on it and on the heterogeneous
  pair (test_resnet -> test_vit, the quickstart's), USKD without a teacher. Every student has the same recipe
  (configs/demo/) and runs over 3 seeds; the table (mean +- std top-1 at the last epoch, gain over the vanilla
  run of the same student, wall and CPU time per run) is printed and written as markdown, csv and json.
  A finished run is reused when its command and config are unchanged. `--quick`: one seed, 4 epochs.
  `--demo`: the quickstart (the heterogeneous pair, vanilla and ufd, one seed).

      python benchmark.py --bench results                       # ~45 min on 2 idle CPU cores
      python benchmark.py --bench results --quick               # ~10 min
      python benchmark.py --bench results --dataset torch/cifar100 --data-dir data/cifar

Ratios reported by `train`:
- `overhead` = distill_step / (student_step + teacher_forward): 1.00 means distillation costs nothing beyond
  running the teacher; above it is the method's own cost (loss math, projectors, extra feature taps).
- `net` = distill_step / (student_step + teacher_forward + own modules), the method's own modules (projectors,
  generators, heads; their forward FLOPs counted by FlopCounterMode) priced at the student's measured time per
  FLOP. For logit methods it equals `overhead`; for feature methods it is the overhead beyond their modules'
  arithmetic.
- `net_timed` = the same with the modules' measured time instead: the `own:<method>` variant replays their
  outermost calls from one step (inputs captured then, detached), forward and backward, alone, followed by the
  optimizer's update of the method's own parameters (the same optimizer and groups, learning rate 0). Teacher
  modules that a method runs with autograd on (ScaleKD's teacher last stage) count as its own work, as in `net`.
- `vs_timm` (kd and the peer only) = kd_step / timm LogitDistillationTask step.
- `rest_ops`, `rest_bytes`, `rest_top`: what `net_timed` leaves above 1.00, counted rather than timed. One more
  step of the distill row and of its parts (student step, teacher forward, own: row) runs under an OpLedger; the
  rest is the tensor operations, and the bytes they read and write, that the distill step dispatches beyond the
  sum of its parts (loss math, gradient sums, casts), and `rest_top` names the three largest. Counts do not
  depend on the machine's speed or load, so a CPU run says what the rest asks of any machine's memory; Triton
  kernels (UFD's, ScaleKD's and squared_error_sum's on a GPU) are not tensor operations and are not counted.
The teacher forward is timed as the distiller runs it (torch.inference_mode unless the distiller opts out) and,
as a second row, under the other grad mode. On CUDA, `host_syncs` counts what CUDA's sync debug mode flags as
synchronizing in one step (`.item()`, boolean-mask indexing, `nonzero`): a step should have none.
"""
import argparse
import collections
import contextlib
import copy
import csv
import ctypes
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
import yaml

import models  # noqa: F401  (registers the CIFAR models in timm)
from distillers import DISTILLERS, DistillerError, add_distiller_args
from distillers.vanilla import Vanilla
from models.factory import ModelError, create_model_at_size
from train import StepFlags

REPO = Path(__file__).resolve().parent
_logger = logging.getLogger('benchmark')

# families, for which pair a method is run on in `results`; a method missing here counts as a feature method
LOGIT_METHODS = ('kd', 'dkd', 'wsld', 'nkd', 'dist')
TEACHER_FREE_METHODS = ('uskd',)
# the results table's CNN pair student (its teacher is configs/demo/teacher.yaml's); student epochs of --quick
CNN_PAIR_STUDENT = 'test_efficientnet'
QUICK_EPOCHS = 4


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--bench', default='train', choices=['train', 'ufd-loss', 'loader', 'results'],
                        help='what to measure (default: train)')
    group = parser.add_argument_group('Train-step benchmark (--bench train)')
    group.add_argument('--model', default='resnet18', help='student model (timm name) (default: resnet18)')
    group.add_argument('--teacher', default='resnet50', help='teacher model (timm name) (default: resnet50)')
    group.add_argument('--teacher-checkpoint', default='', metavar='PATH',
                       help='teacher weights (default: random weights, which time the same)')
    group.add_argument('--distiller', nargs='+', default=['kd'], metavar='NAME',
                       help=f'one or more of {", ".join(DISTILLERS)}, or all (default: kd)')
    group.add_argument('-b', '--batch-size', type=int, default=None, metavar='N',
                       help='batch size (default: 32 for train, 64 for ufd-loss, the config\'s for results)')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='square input size (default: 224 for train, the config\'s for results)')
    group.add_argument('--num-classes', type=int, default=1000, metavar='N', help='classes (default: 1000)')
    group.add_argument('--amp', action='store_true', default=False, help='autocast, as train.py --amp')
    group.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'],
                       help='autocast dtype (default: float16, with a GradScaler as train.py)')
    group.add_argument('--channels-last', action='store_true', default=False, help='channels_last layout')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='torch.compile every variant with this backend (default when given: inductor)')
    group.add_argument('--num-warm-iter', type=int, default=3, metavar='N',
                       help='untimed steps per variant before timing (default: 3)')
    group.add_argument('--num-bench-iter', type=int, default=10, metavar='N',
                       help='timed steps per variant, spread over --rounds (default: 10)')
    group.add_argument('--rounds', type=int, default=None, metavar='N',
                       help='round-robin rounds over the variants, the median over rounds is reported (default: '
                            '--num-bench-iter, one step per variant per round: the finest interleaving)')
    group.add_argument('--device', default=None, help='cpu, cuda, cuda:1 (default: cuda if available)')
    group.add_argument('--opt', default='sgd', help='timm optimizer of every variant (default: sgd, as train.py)')
    group.add_argument('--lr', type=float, default=1e-4, help='learning rate; does not affect speed (default: 1e-4)')
    group.add_argument('--smoothing', type=float, default=0.1,
                       help='label smoothing of the task loss, as train.py (default: 0.1)')
    group.add_argument('--no-nan-check', dest='nan_check', action='store_false', default=True,
                       help='drop train.py\'s per-step finiteness check (a host-device sync on GPUs)')
    group.add_argument('--no-peer', action='store_true', default=False,
                       help='do not time timm\'s LogitDistillationTask')
    group.add_argument('--no-flops', action='store_true', default=False, help='skip the FLOP counts')
    group.add_argument('--no-memory', action='store_true', default=False, help='skip the peak-memory pass')
    group.add_argument('--no-ledger', action='store_true', default=False,
                       help='skip the rest columns (the operations and bytes a distill step dispatches beyond its '
                            'parts, counted in one more step of each)')
    group.add_argument('--gt-loss-weight', type=float, default=None, help='as train.py')
    group.add_argument('--kd-loss-weight', type=float, default=None, help='as train.py')
    group.add_argument('--teacher-train-mode', action='store_true', default=False, help='as train.py')
    group.add_argument('--results-file', default='', metavar='FILE', help='write the rows to a csv or json file')
    group.add_argument('--results-format', default='', choices=['', 'csv', 'json'],
                       help='format of --results-file (default: from its extension, else csv)')
    group.add_argument('--dataset', default='', metavar='NAME',
                       help='time one real batch of this dataset instead of random tensors (train); the dataset '
                            'of the results table (results; default synthetic)')
    group.add_argument('--data-dir', '--data', default='', metavar='DIR', help='dataset root, as train.py')

    group = parser.add_argument_group('UFD loss benchmark (--bench ufd-loss)')
    group.add_argument('--ufd-channels', type=int, default=768, metavar='C', help='teacher width (default: 768)')
    group.add_argument('--ufd-grids', type=int, nargs='+', default=[7, 14], metavar='S',
                       help='square map sizes (default: 7 14)')

    group = parser.add_argument_group('Data loading benchmark (--bench loader)')
    group.add_argument('--loader-workers', type=int, nargs='+', default=None, metavar='N',
                       help='loader processes to try, as train.py --workers (default: 0 and one per available core)')
    group.add_argument('--loader-batches', type=int, default=10, metavar='N',
                       help='timed batches per epoch, after each epoch\'s first (default: 10)')

    group = parser.add_argument_group('Results table (--bench results)')
    group.add_argument('--quick', action='store_true', default=False,
                       help='one seed and fewer epochs (about 10 minutes on 2 CPU cores)')
    group.add_argument('--demo', action='store_true', default=False,
                       help='the quickstart: the heterogeneous pair, vanilla and ufd, one seed')
    group.add_argument('--methods', nargs='+', default=None, metavar='NAME',
                       help='distillers to run (default: every one in the dispatch table)')
    group.add_argument('--seeds', type=int, default=None, metavar='N', help='seeds per run (default: 3, quick 1)')
    group.add_argument('--epochs', type=int, default=None, metavar='N', help='student epochs (default: the config\'s)')
    group.add_argument('--teacher-epochs', type=int, default=None, metavar='N',
                       help='teacher epochs (default: the config\'s)')
    group.add_argument('--cnn-pair', nargs=2, default=None, metavar=('TEACHER', 'STUDENT'),
                       help=f'models of the CNN pair (default: configs/demo/teacher.yaml\'s -> {CNN_PAIR_STUDENT})')
    group.add_argument('--hetero-pair', nargs=2, default=None, metavar=('TEACHER', 'STUDENT'),
                       help='models of the heterogeneous pair (default: configs/demo/teacher.yaml\'s -> '
                            'configs/demo/ufd.yaml\'s)')
    group.add_argument('--pairs', nargs='+', default=None, choices=['cnn', 'hetero'],
                       help='pairs to run (default: both; --demo: hetero)')
    group.add_argument('--jobs', type=int, default=None, metavar='N',
                       help='train.py processes at once, each with cpus/jobs threads (default: min(2, cpus))')
    group.add_argument('--output', default='', metavar='DIR', help='run folders (default: output/results)')
    group.add_argument('--train-args', default='', metavar='"ARGS"',
                       help='extra train.py arguments for every run, e.g. "--synthetic-train-size 256"; with '
                            '--bench loader, the augmentation and data flags of the loader')
    group.add_argument('--rerun', action='store_true', default=False,
                       help='train again even where a finished run with the same command exists')
    add_distiller_args(parser.add_argument_group('Method parameters (as train.py)'))
    return parser


# ==================================================================================================== helpers
def resolve_device(name):
    if name is None:
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.backends.cudnn.benchmark = True  # as train.py does without --deterministic
    return torch.device(name)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def machine_description(device, threads=True):
    cpu = platform.processor() or 'unknown CPU'
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        if names:
            cpu = names[0]
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
    if fmt == 'json':
        with open(path, 'w') as f:
            json.dump(rows, f, indent=2)
        return
    fields = list(OrderedDict((k, None) for row in rows for k in row))
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields)
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

    CUDA: max_memory_allocated. CPU: the peak resident set (VmHWM), reset through /proc/self/clear_refs after
    handing freed heap back to the system (malloc_trim) and with a fixed mmap threshold, so that big tensors are
    mapped and unmapped and the resident set follows what is live. An approximation (the allocator still caches
    small blocks); None where /proc cannot be used this way.
    """

    def __init__(self, device):
        self.device = device
        self.libc = None
        self.available = device.type == 'cuda'
        if device.type == 'cpu' and sys.platform.startswith('linux'):
            try:
                self.libc = ctypes.CDLL('libc.so.6')
                self.libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, no dynamic growth
                self._reset_cpu()
                self.available = True
            except (OSError, AttributeError):
                self.available = False

    @staticmethod
    def _status(key):
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise OSError(f'{key} not in /proc/self/status')

    def _reset_cpu(self):
        gc.collect()
        self.libc.malloc_trim(0)
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


class OpLedger(TorchDispatchMode):
    """The tensor operations a piece of code dispatches, by name: how many, and the bytes of the distinct tensors
    they read and write. Views are not counted, nor calls that touch no tensor (`promote_types`, the profiler's
    record_function markers); allocations count as operations but touch no bytes. On a GPU nearly every counted
    operation is a kernel launch, and for the elementwise and reduction work a loss adds, the bytes its kernels
    read and write set the time. The counts do not depend on the machine's speed or load; they do depend on the
    device's code paths: Triton kernels are not tensor operations and are not seen, and CUDA optimizers update
    parameter lists in fewer, larger (foreach) operations."""

    # factory ops that only allocate: their results are written by the next operation, which counts them
    ALLOCATIONS = ('empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided')

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.bytes = collections.Counter()

    @property
    def count(self):
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        touched = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if not func.is_view and touched:
            name = func.overloadpacket.__name__
            self.ops[name] += 1
            if name not in self.ALLOCATIONS:
                self.bytes[name] += self.touched_bytes(func, args, kwargs, touched)
        return out

    @staticmethod
    def touched_bytes(func, args, kwargs, touched):
        """Each distinct tensor once (an `out=` tensor is an argument and the result, and is only written), and
        the tensors an operation changes in place once more (they are read and written), as its schema marks
        them."""
        def size(t):
            return t.numel() * t.element_size()
        total = sum(size(t) for t in {(t.data_ptr(), t.numel(), t.dtype): t for t in touched}.values())
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write and not arg.is_out:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                total += sum(size(t) for t in tree_leaves(value) if isinstance(t, torch.Tensor))
        return total


def count_ops(fn):
    return op_ledger(fn).count


def op_ledger(fn):
    with OpLedger() as ledger:
        fn()
    return ledger


def ledger_rest(whole, parts):
    """What `whole` dispatches beyond the sum of `parts` (OpLedgers): (operations, bytes, the three operations with
    the most bytes, as text)."""
    rest_ops, rest_bytes = collections.Counter(whole.ops), collections.Counter(whole.bytes)
    for part in parts:
        rest_ops.subtract(part.ops)
        rest_bytes.subtract(part.bytes)
    top = sorted((n for n in rest_ops if rest_ops[n] or rest_bytes[n]), key=lambda n: (-abs(rest_bytes[n]), n))[:3]
    text = ', '.join(f'{n} {rest_ops[n]:+d} ({rest_bytes[n] / 2 ** 20:+.1f} MiB)' for n in top)
    return sum(rest_ops.values()), sum(rest_bytes.values()), text


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


# ==================================================================================================== train bench
class Variant:
    """One timed thing: a callable that runs a step, and where its numbers go."""

    def __init__(self, name, kind, step, distiller=None):
        self.name, self.kind, self.step, self.distiller = name, kind, step, distiller
        self.round_ms = []
        self.peak_bytes = None
        self.host_syncs = None


def method_namespace(args, input_size):
    """The attributes a distiller constructor reads from train.py's args."""
    ns = argparse.Namespace(**vars(args))
    ns.input_size = input_size
    return ns


def make_criterion(smoothing):
    from timm.loss import LabelSmoothingCrossEntropy
    return LabelSmoothingCrossEntropy(smoothing=smoothing) if smoothing else nn.CrossEntropyLoss()


def make_optimizer(module, args):
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(module, opt=args.opt, lr=args.lr, weight_decay=2e-5, momentum=0.9)


def make_scaler(args, device):
    if args.amp and args.amp_dtype == 'float16':
        return torch.amp.GradScaler(device.type)
    return None


def distill_step_fn(model, optimizer, scaler, amp_autocast, images, labels, nan_check):
    """train.py's inner step for one batch (no accumulation, no clipping), metric sums included."""
    sums = {}
    n = images.shape[0]
    flags = StepFlags(images.device)

    def step():
        with amp_autocast():
            _, losses = model(images, labels, epoch=0)
        loss = sum(losses.values())
        if nan_check:  # train.py's NaN check: flags built before the backward, read after it, before the update
            flags.start(loss, stop_signal=False, distributed=False)
        backward_and_step(loss, optimizer, scaler, flags if nan_check else None)
        for name, value in losses.items():
            sums[name] = sums.get(name, torch.zeros((), device=images.device)) + value.detach().float() * n
        sums['loss'] = sums.get('loss', torch.zeros((), device=images.device)) + loss.detach().float() * n
    return step


def timm_step_fn(task, optimizer, scaler, amp_autocast, images, labels):
    """timm's LogitDistillationTask step: task forward, backward, optimizer step."""
    def step():
        with amp_autocast():
            loss = task(images, labels)['loss']
        backward_and_step(loss, optimizer, scaler)
    return step


def backward_and_step(loss, optimizer, scaler, flags=None):
    """The update both timed steps share, as train.py does it (GradScaler for float16; with `flags`, train.py's
    StepFlags, the NaN check's one host-device sync between the backward and the update)."""
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if flags is not None and not flags.read()[0]:
        raise FloatingPointError('non-finite loss in the benchmark step')
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def capture_teacher_requests(distiller, images, labels, amp_autocast):
    """The FeatureRequests a distiller hands to teacher_forward in one forward (None = logits only)."""
    requests = []
    bound = distiller.teacher_forward

    def recording(x, request=None):
        requests.append(request)
        return bound(x, request)
    distiller.teacher_forward = recording  # an instance attribute in front of the method, for this call only
    try:
        with torch.no_grad(), amp_autocast():
            distiller(images, labels, epoch=0)
    finally:
        del distiller.teacher_forward
    return requests


def capture_own_module_calls(distiller, images, labels, amp_autocast):
    """The outermost calls of the method's own modules in one forward, as (module, args, kwargs) with the inputs
    detached: the distiller's modules (projectors, generators, heads: everything but the student and the task
    loss; the teacher is not in its module tree), and teacher modules it runs with autograd on (ScaleKD's pass of
    projected student features through the teacher's last stage). The teacher's own forward runs without autograd
    and is timed as the teacher row, so those calls are left out; the FLOP-priced `net` counts both kinds alike."""
    # the task loss (`criterion`) is the student step's work, timed there: not the method's
    own = [m for name, m in distiller.named_modules()
           if name and name.split('.')[0] not in ('student', 'criterion')]
    teacher_modules = list(distiller.teacher.modules()) if distiller.teacher is not None else []
    calls, depth = [], [0]

    def detached(value):
        return tree_map_only(torch.Tensor, lambda t: t.detach().clone().requires_grad_(
            t.requires_grad and t.is_floating_point()), value)

    def method_work():
        return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()

    def enter(module, args, kwargs):
        if depth[0] == 0:
            calls.append((module, detached(args), detached(kwargs)))
        depth[0] += 1

    def leave(module, args, kwargs, output):
        depth[0] -= 1

    def enter_teacher(module, args, kwargs):
        if method_work():
            enter(module, args, kwargs)

    def leave_teacher(module, args, kwargs, output):
        if method_work():
            leave(module, args, kwargs, output)

    handles = [h for m in own for h in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                         m.register_forward_hook(leave, with_kwargs=True))]
    handles += [h for m in teacher_modules for h in (m.register_forward_pre_hook(enter_teacher, with_kwargs=True),
                                                      m.register_forward_hook(leave_teacher, with_kwargs=True))]
    try:
        with amp_autocast():
            distiller(images, labels, epoch=0)
    finally:
        for h in handles:
            h.remove()
        distiller.zero_grad(set_to_none=True)
    return calls


def own_parameter_optimizer(optimizer, distiller, args):
    """An optimizer of the same kind over the method's own parameters only (the distill step's parameter groups
    without the student's, each group's settings kept), run at learning rate 0: its step does all the work of
    theirs in the distill step and leaves the parameters, which the `own:` row shares with the distill row,
    unchanged. It is built at --lr (some timm optimizers refuse 0) and set to 0 after. None when the method has
    no trainable parameters of its own, or when one update at learning rate 0 moves them (MADGRAD steps with
    lr + eps): the row then times the modules without their update, with a warning."""
    student = {id(p) for p in distiller.student.parameters()}
    groups = []
    for group in optimizer.param_groups:
        params = [p for p in group['params'] if id(p) not in student]
        if params:
            groups.append({**{k: v for k, v in group.items() if k != 'params'}, 'params': params})
    if not groups:
        return None
    from timm.optim import create_optimizer_v2

    def build():
        own = create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=2e-5, momentum=0.9)
        for group in own.param_groups:
            group['lr'] = 0.0
        return own

    params = [p for group in groups for p in group['params']]
    saved = [p.detach().clone() for p in params]
    trial = build()
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    trial.step()
    moved = any(not torch.equal(p, before) for p, before in zip(params, saved))
    with torch.no_grad():
        for p, before in zip(params, saved):
            p.copy_(before)
            p.grad = None
    if moved:
        _logger.warning(f'--opt {args.opt} changes parameters at learning rate 0, so the own: rows time the '
                        f'method\'s modules without the update of their parameters')
        return None
    return build()


def own_modules_step_fn(distiller, calls, amp_autocast, optimizer=None):
    """Forward and backward of the calls `capture_own_module_calls` recorded, alone, on the inputs they got in a
    step, then `optimizer`'s update of the method's own parameters (`own_parameter_optimizer`): the method's own
    cost, timed rather than priced by FLOPs. Updating 100M projector parameters is a large part of that cost
    (about 0.5 s of UFD's 5.4 s step on the CPU at batch 8). Gradients reach the inputs that needed them, as in
    the step."""
    own_params = [p for n, p in distiller.named_parameters() if not n.startswith('student.')]

    def tensors(value):
        return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]

    def step():
        with amp_autocast():
            outputs = [module(*args, **kwargs) for module, args, kwargs in calls]
        total = sum(t.float().sum() for t in tensors(outputs) if t.requires_grad)
        if isinstance(total, torch.Tensor):
            total.backward()
        if optimizer is not None:
            optimizer.step()
        for p in own_params:
            p.grad = None
        for _, args, kwargs in calls:
            for t in tensors((args, kwargs)):
                t.grad = None
        return outputs
    return step


def teacher_step_fn(distiller, requests, amp_autocast, images, inference_mode=None):
    """The teacher forward(s) of one distill step, as the distiller runs them (`inference_mode=None`), or with
    its grad mode switched to torch.inference_mode (True) or torch.no_grad (False) for the comparison."""
    own_mode = distiller.teacher_inference_mode

    def step():
        distiller.teacher_inference_mode = own_mode if inference_mode is None else inference_mode
        try:
            with amp_autocast():
                # returned, so that a compiled version cannot drop the work as dead code
                return [distiller.teacher_forward(images, request) for request in requests]
        finally:
            distiller.teacher_inference_mode = own_mode
    return step


def load_real_batch(args, input_size, student, batch_size):
    from timm.data import resolve_data_config
    from data import create_eval_dataset
    from data.loader import build_eval_transform
    cfg = resolve_data_config({'input_size': input_size}, model=student)
    dataset = create_eval_dataset(args.dataset, args.data_dir or None, 'val', input_size[-1], args.num_classes,
                                  max(batch_size, 64), 0)
    transform = build_eval_transform(cfg)
    samples = [dataset[i % len(dataset)] for i in range(batch_size)]
    images = torch.stack([transform(img) for img, _ in samples])
    labels = torch.tensor([int(t) for _, t in samples]) % args.num_classes
    return images, labels


def resolve_distiller_names(names):
    if any(n.lower() == 'all' for n in names):
        return list(DISTILLERS)
    unknown = [n for n in names if n.lower() not in DISTILLERS]
    if unknown:
        raise SystemExit(f'benchmark.py: error: unknown distiller(s) {", ".join(unknown)}; choose from '
                         f'{", ".join(DISTILLERS)} or all')
    return [n.lower() for n in names]


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


def bench_train(args):
    device = resolve_device(args.device)
    batch_size = args.batch_size or 32
    img_size = args.img_size or 224
    input_size = (3, img_size, img_size)
    names = resolve_distiller_names(args.distiller)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16

    def amp_autocast():
        if args.amp:
            return torch.autocast(device_type=device.type, dtype=amp_dtype)
        return contextlib.nullcontext()

    torch.manual_seed(0)
    student = create_model_at_size(args.model, input_size, num_classes=args.num_classes)
    needs_teacher = any(DISTILLERS[n].needs_teacher for n in names)
    teacher = None
    if needs_teacher:
        teacher = create_model_at_size(args.teacher, input_size, num_classes=args.num_classes)
        if args.teacher_checkpoint:
            from models.checkpoint import load_model_weights
            load_model_weights(teacher, args.teacher_checkpoint, who='teacher')
        teacher.to(device).eval()
        if args.channels_last:
            teacher.to(memory_format=torch.channels_last)

    if args.dataset or args.data_dir:
        images, labels = load_real_batch(args, input_size, student, batch_size)
    else:
        images = torch.randn(batch_size, *input_size)
        labels = torch.randint(0, args.num_classes, (batch_size,))
    images, labels = images.to(device), labels.to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    ns = method_namespace(args, input_size)
    criterion = make_criterion(args.smoothing)

    def prepare(module):
        module.to(device)
        if args.channels_last:
            module.to(memory_format=torch.channels_last)
        module.train()
        return module

    def compiled(module):
        return torch.compile(module, backend=args.torchcompile) if args.torchcompile else module

    variants, rows_info = [], OrderedDict()
    baseline = prepare(Vanilla(copy.deepcopy(student), None, criterion, ns, input_size))
    student_variant = Variant('student', 'student', distill_step_fn(
        compiled(baseline), make_optimizer(baseline, args), make_scaler(args, device), amp_autocast, images, labels,
        args.nan_check), baseline)
    variants.append(student_variant)

    teacher_variants = {}  # (requests, grad mode) -> (the distiller's own teacher forward, the other grad mode)
    for name in names:
        cls = DISTILLERS[name]
        info = rows_info[name] = {'status': 'ok', 'requests': (), 'variant': None, 'own_variant': None}
        try:
            distiller = cls(copy.deepcopy(student), teacher if cls.needs_teacher else None, criterion, ns,
                            input_size)
            prepare(distiller)
            requests = tuple(capture_teacher_requests(distiller, images, labels, amp_autocast)) \
                if cls.needs_teacher else ()
        except NotImplementedError:
            info['status'] = 'not implemented'
            continue
        except DistillerError as e:
            info['status'] = f'unsupported: {e}'
            continue
        except Exception as e:  # a distiller under construction must not stop the others' numbers
            info['status'] = f'error: {type(e).__name__}: {str(e).splitlines()[0][:160]}'
            _logger.warning(f'{name}: {info["status"]}')
            continue
        info['requests'] = requests
        optimizer = make_optimizer(distiller, args)
        variant = Variant(name, 'distill', distill_step_fn(
            compiled(distiller), optimizer, make_scaler(args, device), amp_autocast, images, labels, args.nan_check),
            distiller)
        info['variant'] = variant
        variants.append(variant)
        if distiller.extra_parameters():
            calls = capture_own_module_calls(distiller, images, labels, amp_autocast)
            own_step = own_modules_step_fn(distiller, calls, amp_autocast,
                                           own_parameter_optimizer(optimizer, distiller, args))
            info['own_variant'] = Variant(f'own:{name}', 'own', own_step, distiller)
            variants.append(info['own_variant'])
        requests_key = (requests, distiller.teacher_inference_mode)
        info['requests_key'] = requests_key
        if requests and requests_key not in teacher_variants:
            own = 'inference_mode' if distiller.teacher_inference_mode else 'no_grad'
            key = f'teacher:{"; ".join(describe_request(r) for r in requests)}@{own}'
            fwd = teacher_step_fn(distiller, requests, amp_autocast, images)
            if args.torchcompile:
                fwd = torch.compile(fwd, backend=args.torchcompile)
            pair = [Variant(key, 'teacher', fwd, distiller)]
            if not args.torchcompile:  # the fast-path question: what does inference_mode save over no_grad?
                other = not distiller.teacher_inference_mode
                pair.append(Variant(key.rsplit('@', 1)[0] + ('@inference_mode' if other else '@no_grad'), 'teacher',
                                    teacher_step_fn(distiller, requests, amp_autocast, images, inference_mode=other),
                                    distiller))
            teacher_variants[requests_key] = pair
            variants.extend(pair)

    peer = None
    if teacher is not None and not args.no_peer:
        from timm.task import LogitDistillationTask
        peer_student = copy.deepcopy(student).to(device)
        if args.channels_last:
            peer_student.to(memory_format=torch.channels_last)
        kd_weight = ns.kd_loss_weight if ns.kd_loss_weight is not None else DISTILLERS['kd'].default_kd_loss_weight
        task = LogitDistillationTask(peer_student, teacher, criterion=criterion, task_loss_weight=1.0 - kd_weight,
                                     temperature=ns.kd_temperature, device=device, verbose=False)
        task.to(device).train()
        if args.torchcompile:
            task.compile(backend=args.torchcompile)
        peer = Variant('timm_kd', 'peer', timm_step_fn(task, make_optimizer(task.trainable_module, args),
                                                       make_scaler(args, device), amp_autocast, images, labels))
        variants.append(peer)

    _logger.info(f'Timing {len(variants)} variants: {args.num_warm_iter} warm-up + {args.num_bench_iter} steps each, '
                 f'{args.rounds} round-robin rounds, batch {batch_size} at {img_size}px on {device}')
    time_round_robin(variants, args.num_warm_iter, args.num_bench_iter, args.rounds, device)

    if device.type == 'cuda':
        count_host_syncs(variants[0].step)  # the first count also sees one-time lazy initializations: discarded
        for v in variants:
            try:
                v.host_syncs = count_host_syncs(v.step)
            except RuntimeError as e:  # a build without the sync debug mode: the column stays empty
                _logger.warning(f'host-sync count unavailable: {e}')
                break

    ledgers = {}
    if not args.no_ledger and not args.torchcompile:  # a compiled step runs its own kernels: nothing to list
        # one more step of each part under an OpLedger, for the rest columns: what a distill step dispatches beyond
        # the student step, the teacher forward and its own modules, which on a GPU is the overhead left to explain
        parts = [student_variant] + [pair[0] for pair in teacher_variants.values()] + [
            info[key] for info in rows_info.values() for key in ('variant', 'own_variant') if info[key] is not None]
        ledgers = {v.name: op_ledger(v.step) for v in parts}

    if not args.no_memory:
        meter = PeakMemory(device)
        for v in variants:
            v.peak_bytes = meter.measure(v.step)

    flops = {}
    if not args.no_flops:
        # forward passes only, with autograd on as in training (the counter's module tracker expects it)
        with amp_autocast():
            flops['student'] = count_flops(lambda: baseline.student(images))
            for (requests, _), (v, *_) in teacher_variants.items():
                flops[requests] = count_flops(lambda: [v.distiller.teacher_forward(images, r) for r in requests])
            for name, info in rows_info.items():
                if info['variant'] is not None:
                    d = info['variant'].distiller
                    flops[name] = count_flops(lambda: d(images, labels, epoch=0))
                    d.zero_grad(set_to_none=True)

    def median(v):
        return statistics.median(v.round_ms)

    student_ms = median(student_variant)
    peer_ms = median(peer) if peer is not None else None
    common = OrderedDict(model=args.model, teacher=args.teacher if teacher is not None else '', batch_size=batch_size,
                         img_size=img_size, device=str(device), amp=args.amp_dtype if args.amp else 'off',
                         channels_last=args.channels_last, compile=args.torchcompile or 'off')

    def base_row(v):
        row = OrderedDict(variant=v.name, kind=v.kind)
        row.update(common)
        row.update(step_ms=round(median(v), 3), step_ms_min=round(min(v.round_ms), 3),
                   step_ms_max=round(max(v.round_ms), 3),
                   samples_per_sec=round(batch_size * 1000 / median(v), 2),
                   peak_mem_mb=round(v.peak_bytes / 2 ** 20, 1) if v.peak_bytes is not None else 'n/a',
                   host_syncs=v.host_syncs)
        return row

    def round_ms(value):
        return round(value, 3) if value is not None else None

    def gflops(value):
        return round(value / batch_size / 1e9, 4) if value is not None else None

    rows = []
    row = base_row(student_variant)
    row.update(student_gflops_per_img=gflops(flops.get('student')), status='ok')
    rows.append(row)
    for (requests, _), pair in teacher_variants.items():
        for v in pair:
            row = base_row(v)
            row.update(teacher_gflops_per_img=gflops(flops.get(requests)), status='ok',
                       teacher_request='; '.join(describe_request(r) for r in requests))
            rows.append(row)
    if peer is not None:
        row = base_row(peer)
        row.update(vs_timm=1.0, status='ok')
        rows.append(row)
    for info in rows_info.values():
        if info['own_variant'] is not None:
            row = base_row(info['own_variant'])
            row['status'] = 'ok'
            rows.append(row)
    for name, info in rows_info.items():
        v = info['variant']
        if v is None:
            row = OrderedDict(variant=name, kind='distill')
            row.update(common)
            row['status'] = info['status']
            rows.append(row)
            continue
        own_teacher, *other_teacher = teacher_variants[info['requests_key']] if info['requests'] else (None,)
        teacher_ms = median(own_teacher) if own_teacher is not None else 0.0
        own_mode_ms = teacher_ms if own_teacher is not None else None
        # the teacher forward under the grad mode the distiller does not use (none when compiled or teacherless)
        other_mode_ms = median(other_teacher[0]) if other_teacher else None
        in_inference_mode = v.distiller.teacher_inference_mode
        row = base_row(v)
        student_g = flops.get('student')
        teacher_g = (flops.get(info['requests']) if info['requests'] else 0) if flops else None
        total_g = flops.get(name)
        own_g = net = None
        if None not in (student_g, teacher_g, total_g):
            own_g = max(total_g - student_g - teacher_g, 0)
            # the method's own modules priced at the student's measured time per FLOP (forward and backward
            # scale alike): what is left above 1 is overhead beyond the modules' arithmetic
            net = median(v) / (student_ms + teacher_ms + student_ms * own_g / student_g) if student_g else None
        # the same ratios paired round by round (every variant ran in every round, close in time): their spread
        # says how much the machine drifted during the measurement
        teacher_rounds = own_teacher.round_ms if info['requests'] \
            else [0.0] * len(v.round_ms)
        paired = [d / (s + t) for d, s, t in zip(v.round_ms, student_variant.round_ms, teacher_rounds)]
        own_ms = median(info['own_variant']) if info['own_variant'] is not None else 0.0
        rest = (None, None, None)
        if ledgers:
            rest = ledger_rest(ledgers[v.name], [ledgers[p.name] for p in (student_variant, own_teacher,
                                                                            info['own_variant']) if p is not None])
        row.update(student_step_ms=round(student_ms, 3), teacher_fwd_ms=round(teacher_ms, 3),
                   teacher_grad_mode=('inference_mode' if in_inference_mode else 'no_grad') if own_mode_ms else None,
                   teacher_fwd_no_grad_ms=round_ms(other_mode_ms if in_inference_mode else own_mode_ms),
                   teacher_fwd_inference_mode_ms=round_ms(own_mode_ms if in_inference_mode else other_mode_ms),
                   overhead=round(median(v) / (student_ms + teacher_ms), 3),
                   overhead_paired_median=round(statistics.median(paired), 3),
                   overhead_paired_min=round(min(paired), 3), overhead_paired_max=round(max(paired), 3),
                   overhead_net=round(net, 3) if net is not None else None,
                   own_modules_ms=round(own_ms, 3),
                   overhead_net_timed=round(median(v) / (student_ms + teacher_ms + own_ms), 3),
                   vs_timm=round(median(v) / peer_ms, 3) if (peer_ms and name == 'kd') else None,
                   vs_timm_paired_median=round(statistics.median(
                       d / p for d, p in zip(v.round_ms, peer.round_ms)), 3) if (peer_ms and name == 'kd') else None,
                   rest_ops=rest[0], rest_bytes=rest[1],
                   rest_top=rest[2], extra_params_m=round(v.distiller.extra_parameters() / 1e6, 4),
                   student_gflops_per_img=gflops(student_g), teacher_gflops_per_img=gflops(teacher_g),
                   distiller_gflops_per_img=gflops(own_g), teacher_calls=len(info['requests']),
                   teacher_request='; '.join(describe_request(r) for r in info['requests']), status='ok')
        rows.append(row)
    return rows, device


def describe_request(request):
    """'logits', or what else a FeatureRequest asks for (stages, blocks, final map, ...)."""
    if request is None:
        return 'logits'
    parts = []
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if value not in ((), False, None):
            parts.append(field.name if value is True else f'{field.name}={"/".join(map(str, value))}')
    return 'logits+' + ','.join(parts) if parts else 'logits'


def overhead_text(row):
    if row.get('overhead') is None:
        return '-'
    return (f'{row["overhead"]:.3f} ({row["overhead_paired_min"]:.2f}-{row["overhead_paired_max"]:.2f})'
            if row.get('overhead_paired_min') is not None else f'{row["overhead"]:.3f}')


def rest_text(row):
    if row.get('rest_ops') is None:
        return '-'
    return f'{row["rest_ops"]:+d} / {row["rest_bytes"] / 2 ** 20:+.1f}'


def print_train_rows(rows, machine):
    print(f'\nMachine: {machine}')
    first = next((r for r in rows if 'step_ms' in r), rows[0])
    print(f'Student {first["model"]}, teacher {first["teacher"] or "-"}, batch {first["batch_size"]} at '
          f'{first["img_size"]}px, amp {first["amp"]}, channels_last {first["channels_last"]}, '
          f'compile {first["compile"]}\n')
    syncs = any(r.get('host_syncs') is not None for r in rows)
    header = ['variant', 'step ms', 'img/s', 'teacher ms', 'overhead', 'net', 'net timed', 'vs timm', 'peak MB',
              'rest ops/MiB', 'extra M params', 'GFLOPs/img s/t/own'] + (['syncs'] if syncs else []) + ['status']
    table = []
    for r in rows:
        if 'step_ms' not in r:
            table.append([r['variant']] + ['-'] * (len(header) - 2) + [r['status']])
            continue
        g = '/'.join(fmt_num(r.get(k), '.3f') for k in ('student_gflops_per_img', 'teacher_gflops_per_img',
                                                          'distiller_gflops_per_img'))
        table.append([r['variant'], fmt_num(r['step_ms'], '.1f'), fmt_num(r['samples_per_sec'], '.1f'),
                      fmt_num(r.get('teacher_fwd_ms'), '.1f'), overhead_text(r),
                      fmt_num(r.get('overhead_net'), '.3f'), fmt_num(r.get('overhead_net_timed'), '.3f'),
                      fmt_num(r.get('vs_timm'), '.3f'), r['peak_mem_mb'], rest_text(r),
                      fmt_num(r.get('extra_params_m'), '.3f'), g]
                     + ([fmt_num(r.get('host_syncs'), 'd')] if syncs else []) + [r['status']])
    print(markdown_table(header, table))
    tops = [f'  {r["variant"]}: {r["rest_top"]}' for r in rows if r.get('rest_top')]
    if tops:
        print('\nThe rest, the three operations with the most bytes:\n' + '\n'.join(tops))
    print('\noverhead = distill step / (student step + teacher forward), of the medians over rounds (in brackets: '
          'the range of the same ratio taken round by round). net = the same with the method\'s own '
          'modules added to the denominator at the student\'s measured time per FLOP; net timed = the same with '
          'their measured time instead (the own:<method> row: forward and backward of those modules alone, on the '
          'inputs they got in a step, and the optimizer\'s update of their parameters). vs timm = kd step / timm '
          'LogitDistillationTask step. teacher:<request>@<mode>: the teacher forward of the distill step, under the '
          'grad mode the distiller uses (the one in the overhead) and, as a second row, under the other mode. Peak '
          'memory: above what was allocated before the step. rest: the tensor operations (and the MiB they read '
          'and write) a distill step dispatches beyond the student step, the teacher forward and the own: row, '
          'counted op by op; Triton kernels (on a GPU: UFD\'s and ScaleKD\'s losses, squared_error_sum) are not '
          'tensor operations and are not counted.'
          + (' syncs: operations in one step that CUDA\'s sync debug mode flags as synchronizing (.item(), '
             'boolean-mask indexing, nonzero); the NaN check\'s wait on its own pinned copy is not one of them.'
             if syncs else ''))


# ==================================================================================================== ufd-loss bench
def dct_matrix(n, device, dtype=torch.float32):
    """Orthonormal DCT-II matrix D (n x n): X = D x; its inverse is D^T."""
    k = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    i = torch.arange(n, device=device, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


class DctUfdLoss:
    """ufd.md §4.1 taken literally: DCT, keep or drop the DC coefficient, inverse DCT, normalize, sum-SE / B.

    The matrices are built once per shape (the original rebuilt them on every call; this is the faster variant).
    """

    def __init__(self, channels, height, width, device):
        self.dh, self.dw, self.dc = (dct_matrix(n, device) for n in (height, width, channels))
        self.sp_mask = torch.zeros(height, width, device=device)
        self.sp_mask[0, 0] = 1
        self.ch_mask = torch.zeros(channels, device=device)
        self.ch_mask[0] = 1

    def _spatial_parts(self, x):
        spectrum = self.dh @ x @ self.dw.T
        inverse = lambda s: self.dh.T @ s @ self.dw  # noqa: E731
        return inverse(spectrum * self.sp_mask), inverse(spectrum * (1 - self.sp_mask))

    def _channel_parts(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C), raster order
        spectrum = tokens @ self.dc.T
        return (spectrum * self.ch_mask) @ self.dc, (spectrum * (1 - self.ch_mask)) @ self.dc

    @staticmethod
    def _sse(a, b, dim):
        return (F.normalize(a, dim=dim) - F.normalize(b, dim=dim)).pow(2).sum() / a.shape[0]

    def spatial(self, student, teacher):
        (s_dc, s_ac), (t_dc, t_ac) = self._spatial_parts(student.float()), self._spatial_parts(teacher.float())
        return self._sse(s_dc, t_dc, 1), self._sse(s_ac, t_ac, 1)

    def channel(self, student, teacher):
        (s_dc, s_ac), (t_dc, t_ac) = self._channel_parts(student.float()), self._channel_parts(teacher.float())
        return self._sse(s_dc, t_dc, 1), self._sse(s_ac, t_ac, 1)


def gpu_busy_ms(step, iters=5):
    """GPU time per call of `step`: the summed duration of the CUDA kernels it runs, host gaps excluded. Inside a
    training step the host runs ahead of a busy GPU, so this, not the wall time of the call alone, is what a loss
    adds to the step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()) / iters / 1000


def bench_ufd_loss(args):
    from distillers import ufd
    device = resolve_device(args.device)
    batch = args.batch_size or 64
    rows = []
    for size in args.ufd_grids:
        gen = torch.Generator(device='cpu').manual_seed(size)
        student = torch.randn(batch, args.ufd_channels, size, size, generator=gen).to(device).requires_grad_()
        teacher = torch.randn(batch, args.ufd_channels, size, size, generator=gen).to(device)
        dct = DctUfdLoss(args.ufd_channels, size, size, device)
        # on a GPU the closed form runs as fused Triton kernels (distillers/ufd_triton.py); its eager form is timed
        # beside them
        fused = ufd.fused_kernels(student, teacher) is not None

        def closed():  # as the distiller calls it (there, each branch gets its own projector's map)
            return ufd.decoupled_losses(student, student, teacher)

        def eager():
            ufd.FUSED_KERNELS = False
            try:
                return closed()
            finally:
                ufd.FUSED_KERNELS = True

        def literal():
            return (*dct.spatial(student, teacher), *dct.channel(student, teacher))

        def with_backward(fn):
            def run():
                sum(fn()).backward()
                student.grad = None
            return run

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn()
            return run

        if args.torchcompile:
            closed, literal = (torch.compile(fn, backend=args.torchcompile) for fn in (closed, literal))
        forms = {'closed': closed, 'dct': literal, **({'eager': eager} if fused and not args.torchcompile else {})}
        with torch.no_grad():
            values = {name: fn() for name, fn in forms.items()}
        rel = [abs(x.item() - y.item()) / max(abs(y.item()), 1e-30)
               for name in forms if name != 'dct' for x, y in zip(values[name], values['dct'])]
        variants = [Variant(f'{name}_{mode}', 'ufd', wrap(fn)) for mode, wrap in (('fwd', no_grad),
                                                                                  ('fwd_bwd', with_backward))
                    for name, fn in forms.items()]
        ops = {v.name: count_ops(v.step) for v in variants} if not args.torchcompile else {}
        # the fixed host cost of any backward() call (the autograd engine), which both forms pay in fwd_bwd
        probe = torch.ones(1, device=device, requires_grad=True)
        floor = Variant('backward_floor', 'ufd', lambda: (probe * 2).sum().backward())
        time_round_robin(variants + [floor], args.num_warm_iter, args.num_bench_iter, args.rounds, device)
        ms = {v.name: statistics.median(v.round_ms) for v in variants + [floor]}
        gpu_ms = {v.name: gpu_busy_ms(v.step) for v in variants} if device.type == 'cuda' else {}
        for mode in ('fwd', 'fwd_bwd'):
            rows.append(OrderedDict(
                bench='ufd-loss', mode=mode, batch_size=batch, channels=args.ufd_channels, grid=f'{size}x{size}',
                device=str(device), compile=args.torchcompile or 'off', fused_kernels='yes' if fused else 'no',
                closed_form_ms=round(ms[f'closed_{mode}'], 4), dct_ms=round(ms[f'dct_{mode}'], 4),
                # three significant digits: a speedup below 1 rounded to two decimals would be off by up to 3%
                speedup=float(f'{ms[f"dct_{mode}"] / ms[f"closed_{mode}"]:.3g}'),
                eager_closed_form_ms=round(ms[f'eager_{mode}'], 3) if 'eager' in forms else None,
                backward_floor_ms=round(ms['backward_floor'], 3) if mode == 'fwd_bwd' else None,
                closed_form_gpu_ms=round(gpu_ms[f'closed_{mode}'], 3) if gpu_ms else None,
                dct_gpu_ms=round(gpu_ms[f'dct_{mode}'], 3) if gpu_ms else None,
                gpu_speedup=round(gpu_ms[f'dct_{mode}'] / gpu_ms[f'closed_{mode}'], 1) if gpu_ms else None,
                closed_form_ops=ops.get(f'closed_{mode}'), dct_ops=ops.get(f'dct_{mode}'),
                max_rel_diff=float(f'{max(rel):.3g}'),
                values_closed=' '.join(f'{x.item():.6g}' for x in values['closed']),
                values_dct=' '.join(f'{y.item():.6g}' for y in values['dct'])))
    return rows, device


def print_ufd_rows(rows, machine):
    print(f'\nMachine: {machine}\n')
    eager = any(r['eager_closed_form_ms'] is not None for r in rows)
    gpu = any(r['closed_form_gpu_ms'] is not None for r in rows)
    header = ['grid', 'B', 'C', 'pass', 'closed form ms', *(['eager closed form ms'] if eager else []), 'DCT ms',
              'speedup', 'backward() floor ms', *(['GPU ms closed / DCT', 'GPU speedup'] if gpu else []),
              'ops closed / DCT', 'max rel diff']
    print(markdown_table(header, [[r['grid'], r['batch_size'], r['channels'], r['mode'], fmt_num(r['closed_form_ms']),
                                   *([fmt_num(r['eager_closed_form_ms'])] if eager else []),
                                   fmt_num(r['dct_ms']), fmt_num(r['speedup'], '.3g') + 'x',
                                   fmt_num(r['backward_floor_ms']) if r['backward_floor_ms'] is not None else '-',
                                   *([f'{r["closed_form_gpu_ms"]:.3f} / {r["dct_gpu_ms"]:.3f}',
                                      fmt_num(r['gpu_speedup'], '.1f') + 'x'] if gpu else []),
                                   f'{r["closed_form_ops"]} / {r["dct_ops"]}' if r['dct_ops'] else '-',
                                   f'{r["max_rel_diff"]:.2e}'] for r in rows]))
    print('\nTerms compared: spatial DC, spatial AC, channel DC, channel AC (unweighted); max rel diff: of every '
          'closed form against the DCT. backward() floor: a backward() through one multiply, the autograd engine\'s '
          'fixed cost that every fwd_bwd call pays. ops: tensor operations dispatched, views excluded (on a GPU, '
          'kernel launches at least; the fused Triton kernels, one forward and one backward, are not counted).'
          + (' speedup: DCT / closed form, the fused kernels; eager closed form: the same math without them.'
             if eager else '')
          + (' GPU ms: the summed kernel time per call, without the host\'s gaps (what a loss adds to a training '
             'step whose GPU is busy).' if gpu else ''))


# ==================================================================================================== loader bench
def bench_loader(args):
    """train.py's training loader alone (its dataset, augmentation, sampler and per-sample seeding, built from the
    same flags), timed over two epochs for each --loader-workers value, with and without pinned memory on CUDA,
    batches copied to the device as train.py does. Without --dataset/--data-dir it reads a generated folder of
    ImageNet-sized JPEGs (data.synthetic.write_jpeg_folder). The loader keeps up when its img/s is at least the
    train step's (--bench train)."""
    import tempfile
    import timm
    import train as train_script
    from data import DatasetError, create_datasets
    from data.loader import build_train_transform, create_train_loader, student_data_config
    from data.synthetic import write_jpeg_folder

    def fail(message):
        raise SystemExit(f'benchmark.py: error: {message}')

    device = resolve_device(args.device)
    if args.loader_batches < 1:
        fail(f'--loader-batches must be at least 1, not {args.loader_batches}')
    workers_list = args.loader_workers if args.loader_workers is not None else [0, len(os.sched_getaffinity(0))]
    if min(workers_list) < 0:
        fail(f'--loader-workers takes counts of 0 or more, got {workers_list}')
    pin_choices = (False, True) if device.type == 'cuda' else (False,)  # pinning needs an accelerator
    try:
        train_argv = shlex.split(args.train_args)
    except ValueError as e:
        fail(f'--train-args {args.train_args!r} cannot be split into arguments ({e})')
    data_argv = (['--dataset', args.dataset] if args.dataset else []) + \
                (['--data-dir', args.data_dir] if args.data_dir else [])
    # the benchmark's flags first: the same flag in --train-args wins, as it would on train.py's command line
    base_argv = ['--model', args.model, '-b', str(args.batch_size or 32), '--img-size', str(args.img_size or 224)]
    try:
        targs, _ = train_script.parse_args(base_argv + data_argv + train_argv)
    except train_script.UsageError as e:
        fail(e)
    if not timm.is_model(targs.model):
        fail(f'unknown model {targs.model!r}: not in the timm registry nor in models/')
    batch_size = targs.batch_size
    if batch_size < 1:
        fail(f'--batch-size must be at least 1, not {batch_size}')
    data_config = student_data_config(targs)
    targs.input_size = tuple(data_config['input_size'])
    img_size = targs.input_size[-1]
    with tempfile.TemporaryDirectory(prefix='ufdkd-loader-') as tmp:
        if data_argv:
            source = args.dataset or args.data_dir
        else:
            # each epoch: one untimed batch (the workers' start), then the timed ones; every class in both splits
            train_images = batch_size * (args.loader_batches + 1)
            classes = min(4, train_images)
            write_jpeg_folder(tmp, train_images, classes, num_classes=classes)
            targs.data_dir = tmp
            source = 'generated JPEG folder (500x375)'
        try:
            dataset, _, _ = create_datasets(targs)
        except DatasetError as e:
            fail(e)
        try:
            transform = build_train_transform(targs, data_config)
        except ValueError as e:
            fail(e)

        rows = []
        for workers in workers_list:
            for pin_memory in pin_choices:
                try:
                    loader = create_train_loader(dataset, transform, batch_size, targs.seed, workers,
                                                 pin_memory=pin_memory)
                except ValueError as e:
                    fail(e)
                per_epoch = loader.sampler.batches_per_epoch()
                timed = min(args.loader_batches, per_epoch - 1)
                if timed < 1:
                    fail(f'{source} has {len(dataset)} training images, fewer than two batches of {batch_size}; '
                         f'lower --batch-size')
                first_batch_s, images_seen, timed_s = [], 0, 0.0
                for epoch in range(2):
                    # each epoch ends at its last timed batch (a mid-epoch start, as train.py resumes): persistent
                    # workers would otherwise make epoch 2 wait for epoch 1's left-over prefetched batches
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
                del loader  # ends the persistent workers
                rows.append(OrderedDict(
                    source=source, model=targs.model, batch_size=batch_size, img_size=img_size, device=str(device),
                    workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                    img_per_sec=round(images_seen / timed_s, 1), batch_ms=round(timed_s * 1000 / (2 * timed), 1),
                    first_batch_s_epoch1=round(first_batch_s[0], 3), first_batch_s_epoch2=round(first_batch_s[1], 3),
                    timed_batches=2 * timed))
    return rows, device


def print_loader_rows(rows, machine):
    print(f'\nMachine: {machine}')
    print(f'Data: {rows[0]["source"]}, batch {rows[0]["batch_size"]} at {rows[0]["img_size"]} px, train.py\'s '
          f'augmentation for {rows[0]["model"]}')
    header = ['workers', 'pin memory', 'img/s', 'ms/batch', 'first batch s (epoch 1 / 2)']
    table = [[str(r['workers']), 'yes' if r['pin_memory'] else 'no', fmt_num(r['img_per_sec'], '.1f'),
              fmt_num(r['batch_ms'], '.1f'),
              f'{r["first_batch_s_epoch1"]:.3f} / {r["first_batch_s_epoch2"]:.3f}'] for r in rows]
    print(markdown_table(header, table))
    print('\nThe loader keeps up when its img/s is at least the train step\'s (benchmark.py --bench train). With '
          'workers, they persist across epochs, so epoch 2\'s first batch does not wait for processes to start.')


# ==================================================================================================== results table
DEMO_DIR = REPO / 'configs' / 'demo'


class TrainRun:
    """One train.py subprocess, reused when a finished run with the same command is on disk."""

    def __init__(self, key, run_dir, argv, epochs):
        self.key, self.run_dir, self.argv, self.epochs = key, Path(run_dir), argv, epochs
        self.status, self.top1, self.best_top1, self.wall_s, self.cpu_s = 'pending', None, None, None, None
        # the command names its config by path: an edited config must not reuse a run made with the old one
        config = argv[argv.index('-c') + 1] if '-c' in argv else None
        digest = hashlib.sha256(json.dumps(argv).encode())
        if config and os.path.isfile(config):
            with open(config, 'rb') as f:
                digest.update(f.read())
        self.fingerprint = digest.hexdigest()[:16]

    def command(self):
        return [sys.executable, str(REPO / 'train.py'), *self.argv]

    def finished(self):
        marker = self.run_dir / 'benchmark_run.json'
        if not marker.exists():
            return False
        with open(marker) as f:
            info = json.load(f)
        if info.get('fingerprint') != self.fingerprint or info.get('status') != 'ok':
            return False
        self.status, self.top1, self.best_top1 = 'ok', info['top1'], info['best_top1']
        self.wall_s, self.cpu_s = info['wall_s'], info.get('cpu_s')
        return True

    def run(self, threads, rerun=False):
        if not rerun and self.finished():
            return self
        env = dict(os.environ)
        env['OMP_NUM_THREADS'] = str(threads)
        env['PYTHONUNBUFFERED'] = '1'
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / 'benchmark_run.json').unlink(missing_ok=True)
        log_path = self.run_dir.parent / f'{self.run_dir.name}.benchmark.log'
        start = time.time()
        with open(log_path, 'w') as log:
            proc = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            # wait4: the child's own CPU time, which the other runs sharing the machine do not inflate
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        self.wall_s = time.time() - start
        self.cpu_s = usage.ru_utime + usage.ru_stime
        with open(log_path) as f:
            output = f.read()
        if proc.returncode != 0:
            lines = output.strip().splitlines()
            usage_errors = [line for line in lines if line.startswith('train.py: error:')]
            if 'NotImplementedError' in output:
                self.status = 'not implemented'
            elif proc.returncode == 2 and usage_errors:
                self.status = 'unsupported: ' + usage_errors[-1].split('error:', 1)[1].strip()
            else:
                self.status = f'failed (exit {proc.returncode}): ' + (lines[-1][:200] if lines else '')
            return self
        rows = read_summary(self.run_dir / 'summary.csv')
        if len(rows) != self.epochs or 'eval_top1' not in rows[-1]:
            self.status = f'failed: summary has {len(rows)} of {self.epochs} epochs'
            return self
        self.top1 = float(rows[-1]['eval_top1'])
        self.best_top1 = max(float(r['eval_top1']) for r in rows if r.get('eval_top1'))
        self.status = 'ok'
        with open(self.run_dir / 'benchmark_run.json', 'w') as f:
            json.dump({'argv': self.argv, 'fingerprint': self.fingerprint, 'status': 'ok', 'top1': self.top1,
                       'best_top1': self.best_top1,
                       'wall_s': self.wall_s, 'cpu_s': self.cpu_s}, f)
        return self


def read_summary(path):
    if not Path(path).exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f) or {}


class Pair:
    """A teacher -> student pair of the table; models are (timm name, list of --model-kwargs K=V)."""

    def __init__(self, name, teacher, student):
        self.name, self.teacher, self.student = name, teacher, student

    @property
    def label(self):
        return f'{self.teacher[0]} -> {self.student[0]}'


def model_spec(cfg, key='model', kwargs_key='model_kwargs'):
    return cfg[key], [str(kv) for kv in cfg.get(kwargs_key) or []]


def model_key(spec):
    """A hashable (name, kwargs) of a model spec."""
    return spec[0], tuple(spec[1])


def results_plan(args):
    """Pairs, methods, seeds and epochs of the table.

    The recipe is configs/demo/: teacher.yaml trains the teacher, vanilla.yaml every student (the distiller, the
    student and the teacher are set on the command line), ufd.yaml is the demo's distilled student. The
    heterogeneous pair is the demo's (teacher.yaml's teacher -> ufd.yaml's student); the CNN pair shares the
    teacher and has the CNN student named below.
    """
    teacher_cfg, ufd_cfg = load_yaml(DEMO_DIR / 'teacher.yaml'), load_yaml(DEMO_DIR / 'ufd.yaml')
    student_cfg = load_yaml(DEMO_DIR / 'vanilla.yaml')
    teacher = model_spec(teacher_cfg)
    pairs = OrderedDict(
        cnn=Pair('cnn', (args.cnn_pair[0], []) if args.cnn_pair else teacher,
                 (args.cnn_pair[1], []) if args.cnn_pair else (CNN_PAIR_STUDENT, [])),
        hetero=Pair('hetero', (args.hetero_pair[0], []) if args.hetero_pair else teacher,
                    (args.hetero_pair[1], []) if args.hetero_pair else model_spec(ufd_cfg)))
    selected = args.pairs or (['hetero'] if args.demo else ['cnn', 'hetero'])
    pairs = OrderedDict((k, v) for k, v in pairs.items() if k in selected)
    methods = args.methods or (['ufd'] if args.demo else [m for m in DISTILLERS if m != 'vanilla'])
    unknown = [m for m in methods if m not in DISTILLERS]
    if unknown:
        raise SystemExit(f'benchmark.py: error: unknown method(s) {", ".join(unknown)}')
    seeds = args.seeds or (1 if (args.quick or args.demo) else 3)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else int(student_cfg['epochs']))
    teacher_epochs = args.teacher_epochs or int(teacher_cfg['epochs'])
    return pairs, [m for m in methods if m != 'vanilla'], seeds, epochs, teacher_epochs



def bench_results(args):
    pairs, methods, seeds, epochs, teacher_epochs = results_plan(args)
    output = Path(args.output or REPO / 'output' / ('demo' if args.demo else 'results'))
    output.mkdir(parents=True, exist_ok=True)
    data = []
    if args.dataset or args.data_dir:
        # a folder without a dataset name is an ImageFolder (train.py's default), not the configs' synthetic set
        data += ['--dataset', args.dataset or '']
    if args.data_dir:
        data += ['--data-dir', args.data_dir]
    if args.img_size:
        data += ['--img-size', str(args.img_size)]
    if args.batch_size:
        data += ['--batch-size', str(args.batch_size)]
    extra = shlex.split(args.train_args)
    cpus = os.cpu_count() or 1
    jobs = args.jobs or max(1, min(2, cpus))
    threads = max(1, cpus // jobs)
    started = time.time()

    def execute(runs):
        # fewer runs than jobs (the teachers): give each run the idle cores too
        run_threads = max(threads, cpus // max(1, min(jobs, len(runs))))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for run in pool.map(lambda r: r.run(run_threads, args.rerun), runs):
                top1 = f'{run.top1:.2f}' if run.top1 is not None else '-'
                print(f'  {run.key:<34s} top-1 {top1:>6s}  wall {run.wall_s or 0:6.1f} s  CPU {run.cpu_s or 0:6.1f} s  '
                      f'{run.status}', flush=True)

    def slug(spec):
        return '_'.join([spec[0]] + [kv.replace('=', '') for kv in spec[1]])

    # 1. every distinct teacher, once, with seed 0
    teachers = OrderedDict()
    for pair in pairs.values():
        if model_key(pair.teacher) in teachers:
            continue
        run_dir = output / 'teachers' / slug(pair.teacher)
        argv = ['-c', str(DEMO_DIR / 'teacher.yaml'), '--model', pair.teacher[0], '--model-kwargs', *pair.teacher[1],
                '--epochs', str(teacher_epochs), '--seed', '0', *data, *extra,
                '--output', str(run_dir.parent), '--experiment', run_dir.name, '--overwrite']
        teachers[model_key(pair.teacher)] = TrainRun(f'teacher {pair.teacher[0]}', run_dir, argv,
                                                             teacher_epochs)
    print(f'Results table: pairs {", ".join(p.label for p in pairs.values())}; methods {" ".join(methods)}; '
          f'{seeds} seed(s); {epochs} student epochs, {teacher_epochs} teacher epochs; {jobs} job(s) x {threads} '
          f'thread(s)', flush=True)
    execute(list(teachers.values()))

    # 2. students. Vanilla once per student; teacher-free methods on the first pair's student; logit methods on the
    # CNN pair (they see only logits, so the teacher's architecture does not change what they do); the others on
    # every pair
    def student_run(method, student, seed, pair=None):
        run_dir = output / (pair.name if pair is not None else 'no_teacher') / f'{method}_{slug(student)}_s{seed}'
        argv = ['-c', str(DEMO_DIR / 'vanilla.yaml'), '--model', student[0], '--model-kwargs', *student[1],
                '--distiller', method, '--epochs', str(epochs), '--seed', str(seed), *data, *extra]
        if pair is not None:
            teacher_run = teachers[model_key(pair.teacher)]
            argv += ['--teacher', pair.teacher[0], '--teacher-kwargs', *pair.teacher[1],
                     '--teacher-checkpoint', str(teacher_run.run_dir / 'checkpoint' / 'last.pth.tar')]
        argv += ['--output', str(run_dir.parent), '--experiment', run_dir.name, '--overwrite']
        key = f'{pair.name if pair else "-"}: {method} {student[0]} s{seed}'
        return TrainRun(key, run_dir, argv, epochs)

    table = OrderedDict()  # (method, pair label, student) -> runs over seeds
    first = next(iter(pairs.values()))
    students = list(OrderedDict((model_key(p.student), p.student) for p in pairs.values()).values())
    for seed in range(seeds):
        for student in students:
            table.setdefault(('vanilla', f'- -> {student[0]}', student[0]), []).append(
                student_run('vanilla', student, seed))
        for method in methods:
            if method in TEACHER_FREE_METHODS or not DISTILLERS[method].needs_teacher:
                table.setdefault((method, f'- -> {first.student[0]}', first.student[0]), []).append(
                    student_run(method, first.student, seed))
                continue
            for pair in pairs.values():
                if method in LOGIT_METHODS and pair.name != 'cnn' and 'cnn' in pairs:
                    continue
                if teachers[model_key(pair.teacher)].status != 'ok':
                    continue
                table.setdefault((method, pair.label, pair.student[0]), []).append(
                    student_run(method, pair.student, seed, pair))
    all_runs = [r for rs in table.values() for r in rs]
    execute(all_runs)

    rows = results_rows(teachers, table)
    total = time.time() - started
    machine = machine_description(torch.device('cpu'), threads=False)
    text = results_markdown(rows, list(teachers.values()) + all_runs, args, epochs, teacher_epochs, seeds, jobs,
                            threads, total, machine)
    print('\n' + text)
    with open(output / 'results.md', 'w') as f:
        f.write(text + '\n')
    write_rows(rows, args.results_file or output / 'results.csv', args.results_format)
    if not args.results_file:
        write_rows(rows, output / 'results.json', 'json')
    return rows


def _mean(values, digits=1):
    values = [v for v in values if v is not None]
    return round(statistics.mean(values), digits) if values else None


def results_rows(teachers, table):
    """One row per teacher and per (method, pair); the gain is over the vanilla run of the same student."""
    rows = []
    for (name, _), run in teachers.items():
        rows.append(OrderedDict(method='teacher', pair=f'{name} (teacher)', runs=int(run.top1 is not None),
                                top1_mean=run.top1, top1_std=None, gain=None, best_top1_mean=run.best_top1,
                                wall_s=_mean([run.wall_s]), cpu_s=_mean([run.cpu_s]), status=run.status))
    vanilla = {}
    for (method, label, student), runs in table.items():
        ok = [r for r in runs if r.status == 'ok']
        top1 = [r.top1 for r in ok]
        mean = statistics.mean(top1) if top1 else None
        std = statistics.stdev(top1) if len(top1) > 1 else None
        if method == 'vanilla':
            vanilla[student] = mean
        status = 'ok' if len(ok) == len(runs) else next(r.status for r in runs if r.status != 'ok')
        rows.append(OrderedDict(
            method=method, pair=label, runs=len(ok), top1_mean=round(mean, 2) if mean is not None else None,
            top1_std=round(std, 2) if std is not None else None, gain=None,
            best_top1_mean=_mean([r.best_top1 for r in ok], 2), wall_s=_mean([r.wall_s for r in ok]),
            cpu_s=_mean([r.cpu_s for r in ok]), status=status, student=student))
    for row in rows:
        base = vanilla.get(row.pop('student', None))
        if row['method'] != 'teacher' and row['top1_mean'] is not None and base is not None:
            row['gain'] = round(row['top1_mean'] - base, 2) + 0.0  # no '-0.00' for the vanilla rows
    return rows


def results_markdown(rows, runs, args, epochs, teacher_epochs, seeds, jobs, threads, total, machine):
    header = ['method', 'teacher -> student', 'top-1 (mean ± std)', 'gain vs vanilla', 'wall s/run', 'CPU s/run',
              'note']
    body = []
    for r in rows:
        if r['top1_mean'] is None:
            body.append([r['method'], r['pair'], '-', '-', '-', '-', r['status']])
            continue
        std = f' ± {r["top1_std"]:.2f}' if r['top1_std'] is not None else ''
        gain = f'{r["gain"]:+.2f}' if r['gain'] is not None else ''
        body.append([r['method'], r['pair'], f'{r["top1_mean"]:.2f}{std}', gain, fmt_num(r['wall_s'], '.0f'),
                     fmt_num(r['cpu_s'], '.0f'), '' if r['status'] == 'ok' else r['status']])
    cpu_total = sum(r.cpu_s for r in runs if r.cpu_s is not None)
    cores = os.cpu_count() or 1
    dataset = args.dataset or (f'ImageFolder {args.data_dir}' if args.data_dir else 'synthetic')
    lines = [markdown_table(header, body), '',
             f'Dataset {dataset}; {seeds} seed(s); students {epochs} epochs, teachers {teacher_epochs} epochs; '
             f'recipe configs/demo/; top-1 at the last epoch (mean ± sample std over seeds). {jobs} train.py '
             f'process(es) at once x {threads} thread(s) on {machine}.',
             f'Wall time {total / 60:.1f} min; the runs used {cpu_total / 60:.1f} CPU-minutes, i.e. '
             f'{cpu_total / 60 / cores:.1f} min on {cores} otherwise idle cores.',
             f'Command: {args.command_line}']
    return '\n'.join(lines)


# ==================================================================================================== main
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.command_line = ' '.join(['python benchmark.py'] + [shlex.quote(a) for a in argv])
    args.rounds = args.rounds or args.num_bench_iter
    if args.rounds < 1 or args.num_bench_iter < 1 or args.num_warm_iter < 0:
        raise SystemExit('benchmark.py: error: --rounds and --num-bench-iter must be at least 1, '
                         '--num-warm-iter at least 0')
    if args.bench == 'results':
        bench_results(args)
        return 0
    try:
        if args.bench == 'ufd-loss':
            rows, device = bench_ufd_loss(args)
            print_ufd_rows(rows, machine_description(device))
        elif args.bench == 'loader':
            rows, device = bench_loader(args)
            print_loader_rows(rows, machine_description(device, threads=False))
        else:
            rows, device = bench_train(args)
            print_train_rows(rows, machine_description(device))
    except (ModelError, DistillerError) as e:
        raise SystemExit(f'benchmark.py: error: {e}')
    if args.results_file:
        write_rows(rows, args.results_file, args.results_format)
        print(f'\nRows written to {args.results_file}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
