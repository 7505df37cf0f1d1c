#!/usr/bin/env python3
""" UFD-KD training script: distill any timm teacher into any timm student.

In the tradition of timm's train.py. `-c/--config FILE.yaml` supplies defaults (keys are the flags' dest
names), any flag on the command line overrides them. One process runs on the CPU or one GPU;
`torchrun --nproc_per_node=N train.py ...` runs DDP over N processes (nccl on GPUs, gloo on the CPU).

    python train.py -c configs/demo/teacher.yaml
    torchrun --nproc_per_node=8 train.py /data/imagenet \
        -c configs/imagenet/swin_tiny_patch4_window7_224_resnet18_ufd.yaml --teacher-checkpoint swin_tiny.pth

What a distiller is and how train.py uses it: distillers/base.py. The checkpoint format: models/checkpoint.py.
"""
import argparse
import csv
import datetime
import difflib
import fnmatch
import logging
import logging.handlers
import os
import random
import shutil
import signal
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext, suppress
from typing import Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import is_model
from timm.optim import create_optimizer_v2, optimizer_kwargs, param_groups_layer_decay
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, dispatch_clip_grad, distribute_bn, init_distributed_device

import models  # noqa: F401  (registers the CIFAR models in timm)
from cli import (IMAGE_RULES, ArgumentParser, Switch, UsageError, ascending_pair, check_values, exit_process, number,
                 report_user_error)
from data import DatasetError, create_datasets
from data.mixup import GlobalBatchMixup, mixup_requested
from data.teacher_cache import CachedTeacher, TeacherCache, dataset_identity, stream_identity
from data.loader import (TwoViewTransform, build_eval_transform, build_strong_train_transform, build_train_transform,
                         create_eval_loader, create_train_loader, dataset_targets, student_data_config)
from distillers import DISTILLERS, DistillerError, add_distiller_args, get_distiller_class
from models.checkpoint import (CHECKPOINT_VERSION, CheckpointError, atomic_copy, atomic_save, file_sha256,
                               load_checkpoint_file, load_model_weights)
from models.factory import ModelError, create_model_at_size
from validate import evaluate

_logger = logging.getLogger('train')


# The first parser only knows -c/--config; the YAML it names becomes the defaults of the main parser, which lists
# -c too (its parent) so that --help shows it.
config_parser = ArgumentParser(description='Training config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML file whose keys (flag dest names) set the defaults of any flag')

parser = ArgumentParser(description='UFD-KD: knowledge distillation for timm models', parents=[config_parser])

group = parser.add_argument_group('Dataset parameters')
group.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (positional, as in timm)')
group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
group.add_argument('--dataset', metavar='NAME', default='',
                   help='"" / imagefolder (train/ and val/ folders), torch/cifar100, torch/cifar10, synthetic, '
                        'or any timm dataset name')
group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
group.add_argument('--val-split', metavar='NAME', default='val', help='dataset validation split (default: val)')
group.add_argument('--dataset-download', action=Switch, default=False,
                   help='download the torch/ dataset when it is not under --data-dir')
group.add_argument('--synthetic-classes', type=number(int, 2), default=10, metavar='N', help='synthetic: classes')
group.add_argument('--synthetic-train-size', type=number(int, 1), default=5000, metavar='N',
                   help='synthetic: train images')
group.add_argument('--synthetic-val-size', type=number(int, 1), default=1000, metavar='N', help='synthetic: val images')
group.add_argument('--synthetic-seed', type=int, default=0, metavar='S',
                   help='synthetic: seed of the class definitions and samples (independent of --seed)')
group.add_argument('--synthetic-superclasses', type=number(int, 0), default=0, metavar='S',
                   help='synthetic: group the classes into S superclasses of visually related classes, whose '
                        'confusions a teacher\'s soft labels carry (e.g. 20 classes, 4 superclasses; 0: none)')
group.add_argument('--synthetic-train-fraction', type=number(float, 0, 1, low_open=True), default=1.0, metavar='F',
                   help='synthetic: train on a deterministic, class-balanced fraction F of the '
                        '--synthetic-train-size images (a student on less data than its teacher saw)')

group = parser.add_argument_group('Model parameters (the student)')
group.add_argument('--model', default='resnet18', type=str, metavar='MODEL', help='student model (timm name)')
group.add_argument('--pretrained', action=Switch, default=False, help='start from timm pretrained weights')
group.add_argument('--pretrained-path', default=None, type=str, metavar='PATH',
                   help='load these weights as the pretrained ones (timm pretrained_cfg file overlay)')
group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='load this checkpoint into the student after creation')
group.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='continue a run from this checkpoint, or "auto" for the newest valid one of the run folder')
group.add_argument('--no-resume-opt', action=Switch, default=False,
                   help='when resuming, do not restore the optimizer and scaler state')
group.add_argument('--num-classes', type=number(int, 1), default=None, metavar='N',
                   help='classes (default: the dataset\'s)')
group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type of the student')
group.add_argument('--img-size', type=number(int, 1), default=None, metavar='N', help='image size (square)')
group.add_argument('--in-chans', type=int, default=None, choices=[3], metavar='N',
                   help='image input channels: 3 (every dataset here gives RGB images)')
group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                   help='input dimensions (C H W), overrides --img-size')
group.add_argument('--crop-pct', default=None, type=number(float, 0, low_open=True), metavar='N',
                   help='eval center crop ratio')
group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='dataset mean')
group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='dataset std')
group.add_argument('--interpolation', default='', type=str, metavar='NAME', help='eval resize interpolation')
group.add_argument('-b', '--batch-size', type=number(int, 1), default=128, metavar='N', help='batch size PER PROCESS')
group.add_argument('-vb', '--validation-batch-size', type=number(int, 1), default=None, metavar='N',
                   help='validation batch size (default: --batch-size)')
group.add_argument('--channels-last', action=Switch, default=False, help='channels_last memory layout')
group.add_argument('--grad-accum-steps', type=number(int, 1), default=1, metavar='N',
                   help='batches per optimizer update')
group.add_argument('--grad-checkpointing', action=Switch, default=False,
                   help='gradient checkpointing in the student')
group.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V',
                   help='extra keyword arguments of the student constructor (values parsed as YAML)')
group.add_argument('--drop', type=number(float, 0, 1, high_open=True), default=0.0, metavar='PCT',
                   help='dropout rate (default: 0)')
group.add_argument('--drop-path', type=number(float, 0, 1, high_open=True), default=None, metavar='PCT',
                   help='drop path rate')
group.add_argument('--drop-block', type=number(float, 0, 1, high_open=True), default=None, metavar='PCT',
                   help='DropBlock rate (timm\'s drop_block_rate; models that have it, e.g. ResNets)')
group.add_argument('--bn-momentum', type=number(float, 0, 1), default=None, metavar='M',
                   help='momentum of every BatchNorm of the student (PyTorch convention, default: the model\'s)')
group.add_argument('--bn-eps', type=number(float, 0, low_open=True), default=None, metavar='EPS',
                   help='epsilon of every BatchNorm of the student (default: the model\'s)')
group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='torch.compile the training step (backend, default inductor)')

group = parser.add_argument_group('Teacher parameters')
group.add_argument('--teacher', default='', type=str, metavar='MODEL', help='teacher model (timm name)')
group.add_argument('--teacher-checkpoint', default='', type=str, metavar='PATH',
                   help='teacher weights: a checkpoint of this project or timm, or a bare state_dict')
group.add_argument('--teacher-pretrained', nargs='?', default=None, const='', type=str, metavar='PATH',
                   help='alone: timm pretrained weights of --teacher; with a path: as --teacher-checkpoint (OFAKD)')
group.add_argument('--teacher-use-ema', '--use-ema-teacher', dest='teacher_use_ema', action=Switch,
                   default=False, help='load the EMA weights of the teacher checkpoint')
group.add_argument('--teacher-kwargs', nargs='*', default=[], metavar='K=V',
                   help='extra keyword arguments of the teacher constructor (values parsed as YAML)')
group.add_argument('--teacher-eval-first', action=Switch, default=False,
                   help='validate the teacher on the val split before training and print its top-1')
group.add_argument('--teacher-train-mode', action=Switch, default=False,
                   help='run the teacher in train mode (drop-path on, BN batch statistics), as the original '
                        'ScaleKD/UFD runs did; its weights stay frozen')
group.add_argument('--teacher-cache', default='', type=str, metavar='DIR',
                   help='distill from the teacher outputs stored by cache_teacher.py in DIR instead of running the '
                        'teacher (methods that read only the teacher\'s logits; docs/cache.md)')

group = parser.add_argument_group('Distillation parameters')
group.add_argument('--distiller', default='vanilla', type=str, metavar='NAME',
                   help=f'distillation method: {", ".join(DISTILLERS)}')
group.add_argument('--gt-loss-weight', type=float, default=None, metavar='W',
                   help='weight of the task loss (default: the method\'s own, 1 - alpha for kd)')
group.add_argument('--kd-loss-weight', type=float, default=None, metavar='W',
                   help='weight of the logit distillation term (default: the method\'s own)')
add_distiller_args(parser.add_argument_group('Method parameters'))

group = parser.add_argument_group('Optimizer parameters')
group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='timm optimizer (default: sgd)')
group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
group.add_argument('--opt-kwargs', nargs='*', default=[], metavar='K=V',
                   help='extra optimizer keyword arguments (values parsed as YAML)')
group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum (default: 0.9)')
group.add_argument('--weight-decay', type=number(float, 0), default=2e-5, help='weight decay (default: 2e-5)')
group.add_argument('--weight-decay-all', action=Switch, default=False,
                   help='decay every parameter, norms, biases and no_weight_decay() names included, as mmcls and '
                        'mdistiller do (default: off, timm\'s exemption of 1-d tensors and those names)')
group.add_argument('--clip-grad', type=number(float, 0, low_open=True), default=None, metavar='NORM',
                   help='clip gradients (default: off)')
group.add_argument('--clip-mode', type=str, default='norm', choices=['norm', 'value', 'agc'],
                   help='gradient clipping mode')
group.add_argument('--layer-decay', type=number(float, 0, 1, low_open=True), default=None, metavar='RATE',
                   help='layer-wise lr decay: the student\'s layer i of L learns at RATE^(L-1-i) x lr (timm\'s '
                        'grouping); the distiller\'s own modules learn at the top layer\'s full lr')

group = parser.add_argument_group('Learning rate schedule parameters')
group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                   help='timm LR scheduler: cosine, tanh, step, multistep, plateau, poly, wsd, rsqrt, constant (after '
                        'the warm-up), none (--lr throughout) (default: cosine)')
group.add_argument('--sched-on-updates', action=Switch, default=False,
                   help='step the schedule per optimizer update instead of per epoch')
group.add_argument('--lr', type=number(float, 0), default=None, metavar='LR',
                   help='learning rate (default: --lr-base scaled by the global batch)')
group.add_argument('--lr-base', type=number(float, 0), default=0.1, metavar='LR',
                   help='base learning rate: lr = lr_base * global_batch / lr_base_size')
group.add_argument('--lr-base-size', type=number(int, 1), default=256, metavar='DIV',
                   help='base batch size of --lr-base')
group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help='linear or sqrt scaling')
group.add_argument('--lr-k-decay', type=float, default=1.0, help='cosine k-decay (default: 1)')
group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate')
group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound of the schedule')
group.add_argument('--epochs', type=number(int, 1), default=300, metavar='N', help='epochs to train (default: 300)')
group.add_argument('--start-epoch', default=None, type=int, metavar='N', help='manual epoch number')
group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                   help='epochs of the multistep decays')
group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval of step decay')
group.add_argument('--warmup-epochs', type=number(int, 0), default=5, metavar='N', help='warmup epochs')
group.add_argument('--warmup-prefix', action=Switch, default=False,
                   help='put the warm-up before the --epochs of the schedule: the run trains --warmup-epochs + '
                        '--epochs (timm\'s meaning)')
group.add_argument('--cooldown-epochs', type=number(int, 0), default=0, metavar='N',
                   help='epochs at min lr after the schedule')
group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='plateau patience')
group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')
group.add_argument('--lr-cycle-mul', type=number(float, 0, low_open=True), default=1.0, metavar='MULT',
                   help='length multiplier of each further cosine/tanh/poly cycle (default: 1)')
group.add_argument('--lr-cycle-decay', type=number(float, 0, low_open=True), default=0.5, metavar='MULT',
                   help='peak lr multiplier of each further cycle (default: 0.5)')
group.add_argument('--lr-cycle-limit', type=number(int, 1), default=1, metavar='N',
                   help='cycles of a cosine/tanh/poly schedule; more cycles lengthen the run (default: 1)')

group = parser.add_argument_group('Augmentation and regularization parameters')
group.add_argument('--no-aug', action=Switch, default=False, help='no training augmentation')
group.add_argument('--aug-repeats', type=number(int, 0), default=0, metavar='N',
                   help='repeated augmentation (DeiT): each sample N times per epoch under different augmentations, '
                        'on different processes where there are N or more; an epoch keeps its length (0: off)')
group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                   help='random resized crop scale')
group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='random resized crop aspect ratio')
group.add_argument('--hflip', type=number(float, 0, 1), default=0.5, help='horizontal flip probability')
group.add_argument('--vflip', type=number(float, 0, 1), default=0., help='vertical flip probability')
group.add_argument('--color-jitter', type=number(float, 0), default=0.4, metavar='PCT', help='color jitter factor')
group.add_argument('--aa', type=str, default=None, metavar='NAME',
                   help='RandAugment/AutoAugment policy, e.g. rand-m9-mstd0.5-inc1 or original')
group.add_argument('--reprob', type=number(float, 0, 1), default=0., metavar='PCT', help='random erasing probability')
group.add_argument('--remode', type=str, default='pixel', help='random erasing mode')
group.add_argument('--recount', type=int, default=1, help='random erasing count')
group.add_argument('--mixup', type=number(float, 0), default=0.0, help='mixup alpha (on when > 0)')
group.add_argument('--cutmix', type=number(float, 0), default=0.0, help='cutmix alpha (on when > 0)')
group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
group.add_argument('--mixup-prob', type=number(float, 0, 1), default=1.0,
                   help='probability of mixup or cutmix per batch')
group.add_argument('--mixup-switch-prob', type=number(float, 0, 1), default=0.5,
                   help='probability of cutmix when both on')
group.add_argument('--mixup-mode', type=str, default='batch', choices=['batch', 'pair', 'elem'],
                   help='how to apply mixup/cutmix: per batch, per pair or per element')
group.add_argument('--mixup-off-epoch', default=0, type=number(int, 0), metavar='N',
                   help='turn mixup off after this epoch')
group.add_argument('--smoothing', type=number(float, 0, 1, high_open=True), default=0.1,
                   help='label smoothing (default: 0.1)')
group.add_argument('--bce-loss', action=Switch, default=False, help='binary cross entropy task loss')
group.add_argument('--bce-target-thresh', type=float, default=None, help='threshold that binarizes BCE targets')
group.add_argument('--train-interpolation', type=str, default='random', help='training interpolation')

group = parser.add_argument_group('Model exponential moving average')
group.add_argument('--model-ema', action=Switch, default=False, help='track an EMA of the student')
group.add_argument('--model-ema-decay', type=number(float, 0, 1), default=0.9998, help='EMA decay')
group.add_argument('--model-ema-warmup', action=Switch, help='warm the EMA decay up')

group = parser.add_argument_group('Miscellaneous parameters')
group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
group.add_argument('--data-seed', type=int, default=None, metavar='S',
                   help='seed of the data stream: sample order, augmentation, mixup/cutmix (default: --seed); '
                        'with it fixed, --seed changes only the initialization and the training RNG')
group.add_argument('--deterministic', action=Switch, default=False,
                   help='deterministic algorithms (bit-exact reruns and resumes; slower on GPUs)')
group.add_argument('--log-interval', type=number(int, 1), default=50, metavar='N', help='batches between log lines')
group.add_argument('--recovery-interval', type=number(int, 0), default=0, metavar='N',
                   help='optimizer updates between mid-epoch recovery checkpoints (0: off)')
group.add_argument('--checkpoint-hist', type=number(int, 0), default=10, metavar='N', help='best checkpoints kept')
group.add_argument('-j', '--workers', type=number(int, 0), default=4, metavar='N', help='data loading processes')
group.add_argument('--amp', action=Switch, default=False, help='mixed precision (autocast)')
group.add_argument('--amp-dtype', default='float16', type=str, choices=['float16', 'bfloat16'],
                   help='autocast dtype; float16 uses a GradScaler')
group.add_argument('--pin-mem', action=Switch, default=False, help='pin CPU memory in the loader')
group.add_argument('--device', default=None, type=str, help='cuda, cpu, cuda:1 (default: cuda if available)')
group.add_argument('--dist-backend', default=None, type=str, help='nccl on GPUs, gloo on the CPU by default')
group.add_argument('--dist-url', default='env://', type=str, help='torch.distributed init url')
group.add_argument('--sync-bn', action=Switch, default=False, help='SyncBatchNorm in the student (GPUs)')
group.add_argument('--dist-bn', type=str, default='reduce', choices=['reduce', 'broadcast', ''],
                   help='under DDP, make the BatchNorm statistics of every process the same before each evaluation '
                        'and checkpoint: reduce (average), broadcast (rank 0\'s), or \'\' (leave each its own)')
group.add_argument('--output', default='', type=str, metavar='PATH', help='output folder (default: ./output/train)')
group.add_argument('--experiment', default='', type=str, metavar='NAME',
                   help='run folder name (default: date-model-teacher-distiller)')
group.add_argument('--overwrite', action=Switch, default=False,
                   help='allow writing into an existing run folder (its files are replaced)')
group.add_argument('--eval-metric', default='top1', type=str, choices=['top1', 'top5', 'loss'],
                   help='metric that picks the best checkpoint')
group.add_argument('--eval-interval', type=number(int, 1), default=1, metavar='N',
                   help='evaluate when epoch %% N == 0, in the last part of training (--eval-interval-end) and at '
                        'the last epoch (OFAKD\'s rule)')
group.add_argument('--eval-interval-end', type=number(float, 0, 1), default=0.75, metavar='FRACTION',
                   help='evaluate every epoch after this fraction of the epochs (default: 0.75)')
group.add_argument('--speedtest', action=Switch, default=False,
                   help='never evaluate (timing runs); last.pth.tar is still written every epoch')
group.add_argument('--nan-check', action=Switch, default=True,
                   help='stop at the first non-finite loss after saving the last good state (one sync per step)')
group.add_argument('--debug', action=Switch, default=False, help='show tracebacks of user errors')
group.add_argument('--local_rank', '--local-rank', dest='local_rank_ignored', default=None, type=int,
                   help=argparse.SUPPRESS)  # old launchers pass it; the rank comes from LOCAL_RANK


_BUILTIN_DEFAULTS = {a.dest: a.default for a in parser._actions if a.dest != 'help'}


def _is_compile_backend(name):
    import torch._dynamo  # only when asked: its import takes a while
    return name in torch._dynamo.list_backends(exclude_tags=())


# flags whose values are checked together (a single value's range is its argparse type, cli.number)
VALUE_RULES = IMAGE_RULES + [
    ('scale', ascending_pair(), 'give two fractions of the image area, 0 < low <= high'),
    ('ratio', ascending_pair(), 'give two aspect ratios, 0 < low <= high'),
    ('cutmix_minmax', ascending_pair(high=1.0), 'give two fractions of the image, 0 < low <= high <= 1'),
    ('torchcompile', _is_compile_backend,
     'give a torch.compile backend of torch._dynamo.list_backends(), e.g. inductor'),
]


# ---------------------------------------------------------------------------------------------------- arguments
def _suggest(name, candidates):
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f'; did you mean {" or ".join(close)}?' if close else ''


def _coerce_yaml_value(action, key, value, path):
    """A YAML value as argparse would have produced it from the command line, or a UsageError."""
    where = f'key {key!r} of config {path!r}'
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UsageError(f'{where} is a switch and takes true or false, not {value!r}')
        return value
    if action.nargs == '?' and isinstance(value, bool):
        # a flag with an optional value: `true` is the flag given alone (hub weights for --teacher-pretrained),
        # `false` is the flag not given
        return action.const if value else None
    if value is None:
        return None
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise UsageError(f'{where} takes {action.nargs} values, not {values!r}')
        return [_coerce_scalar(action, where, v) for v in values]
    if isinstance(value, (list, dict)):
        raise UsageError(f'{where} takes one value, not {value!r}')
    return _coerce_scalar(action, where, value)


def _coerce_scalar(action, where, value):
    checked = action.type  # a cli.number(...) range check runs after the conversion to its base type
    kind = getattr(checked, 'base_type', checked)
    if kind is None or kind is str:
        if isinstance(value, (dict, list)):
            raise UsageError(f'{where} takes a string, not {value!r}')
        value = str(value) if not isinstance(value, str) else value
    elif kind in (int, float):
        if isinstance(value, bool):
            raise UsageError(f'{where} takes a number, not {value!r}')
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            raise UsageError(f'{where} takes {"an integer" if kind is int else "a number"}, not {value!r}') from None
        if kind is int and isinstance(value, float) and value != converted:
            raise UsageError(f'{where} takes an integer, not {value!r}')
        value = converted
        if checked is not kind:
            try:
                value = checked(value)
            except argparse.ArgumentTypeError as e:
                raise UsageError(f'{where}: {e}') from None
    else:
        try:
            value = kind(value)
        except Exception:
            raise UsageError(f'{where} has an invalid value {value!r}') from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f'{where} is {value!r}; choose one of {", ".join(map(str, action.choices))}')
    return value


def load_config_defaults(path, main_parser):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f'config file {path!r} cannot be read ({e.strerror})') from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        raise UsageError(f'config file {path!r} is not valid YAML{where}') from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UsageError(f'config file {path!r} must hold a mapping of flag names to values, '
                         f'not a {type(cfg).__name__}')
    actions = {a.dest: a for a in main_parser._actions if a.dest not in ('help', 'config')}
    defaults = {}
    for key, value in cfg.items():
        if key not in actions or key == 'local_rank_ignored':
            hint = _suggest(str(key).replace('-', '_'), list(actions))
            raise UsageError(f'unknown key {key!r} in config {path!r}{hint}')
        defaults[key] = _coerce_yaml_value(actions[key], key, value, path)
    return defaults


def parse_args(argv=None):
    """CLI > YAML > built-in default. Returns (args, the YAML text of the resolved configuration)."""
    argv = sys.argv[1:] if argv is None else argv
    args_config, remaining = config_parser.parse_known_args(argv)
    parser.set_defaults(**_BUILTIN_DEFAULTS)  # a config read by an earlier call in this process does not leak
    if args_config.config:
        parser.set_defaults(**load_config_defaults(args_config.config, parser))
    args, unknown = parser.parse_known_args(remaining)
    if unknown:
        flag = unknown[0].split('=')[0]
        options = [o for a in parser._actions for o in a.option_strings if o.startswith('--')]
        if flag.startswith('-'):
            raise UsageError(f'unknown flag {flag}{_suggest(flag, options)}')
        raise UsageError(f'unexpected argument {flag!r}')
    args.config = args_config.config
    check_values(args, VALUE_RULES)
    resolved = {a.dest: getattr(args, a.dest) for a in parser._actions
                if a.dest not in ('help', 'config', 'local_rank_ignored')}
    args_text = yaml.safe_dump(resolved, default_flow_style=False, sort_keys=False)
    return args, args_text


def parse_kwargs(items, flag):
    kwargs = {}
    for item in items or []:
        if '=' not in item:
            raise UsageError(f'{flag} takes KEY=VALUE items, not {item!r}')
        key, value = item.split('=', 1)
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f'{flag} item {item!r} has a value that is not valid YAML') from None
    return kwargs


# ---------------------------------------------------------------------------------------------------- helpers
def is_primary(args):
    return args.rank == 0


def reduce_sum(tensor, args):
    if args.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def rng_state():
    # only tensors and plain Python values, so the checkpoint loads with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                      has_gauss, cached], 'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (what SLURM and other schedulers send before they kill) and Ctrl-C (SIGINT) ask for a
    clean stop: a recovery checkpoint at the next update, then exit 0. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None
        self.previous = {}
        for sig in (signal.SIGTERM, getattr(signal, 'SIGUSR1', None), signal.SIGINT):
            if sig is not None:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class ConstantLR:
    """What timm's `--sched none` means (the optimizer keeps --lr throughout), with a scheduler's methods."""

    def step(self, epoch, metric=None):
        pass

    def step_update(self, num_updates, metric=None):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        pass


class NonFiniteLoss(RuntimeError):
    pass


class StepFlags:
    """(loss is finite, stop requested) of one step, agreed by every rank, read by the host without waiting for the
    backward: the step's one host-device synchronization, and a cheap one.

    `start` runs after the forward: it builds the flags (stop requests negated, so that one MIN all-reduce serves
    both; every rank must stop at the same step, or the others would wait in the gradient all-reduce) and, on a
    GPU, queues their copy to pinned host memory. `read` runs after the backward has been queued and waits for
    that copy only, so the GPU is already busy with the backward; a `.item()` at that point would wait for the
    whole backward too and leave the GPU idle while the host queues the update and the next forward.
    """

    def __init__(self, device: torch.device):
        self.on_gpu = device.type == 'cuda'
        self.host = torch.zeros(2, pin_memory=True) if self.on_gpu else None
        self.copied = torch.cuda.Event() if self.on_gpu else None
        self.flags = None

    def start(self, loss: torch.Tensor, stop_signal: bool, distributed: bool):
        finite = torch.isfinite(loss.detach()).float()
        flags = torch.stack([finite, torch.full_like(finite, -1.0 if stop_signal else 0.0)])
        if distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        if self.on_gpu:
            self.host.copy_(flags, non_blocking=True)
            self.copied.record()
        else:
            self.flags = flags

    def read(self) -> Tuple[bool, bool]:
        """(finite, stop_requested)."""
        if self.on_gpu:
            self.copied.synchronize()
            finite, negated_stop = self.host.tolist()
        else:
            finite, negated_stop = self.flags.tolist()
        return finite > 0, negated_stop < 0


# ---------------------------------------------------------------------------------------------------- checkpoints
class CheckpointManager:
    """`last.pth.tar` every epoch, `model_best.pth.tar`, the top-k `checkpoint-<epoch>.pth.tar`, and
    `recovery.pth.tar` mid-epoch; every write atomic. Only rank 0 writes."""

    def __init__(self, folder, metric_decreasing, max_history):
        self.folder = folder
        self.decreasing = metric_decreasing
        self.max_history = max_history
        self.history = []  # (metric, epoch)

    def better(self, metric, best):
        if best is None:
            return True
        return metric < best if self.decreasing else metric > best

    def path(self, name):
        return os.path.join(self.folder, name)

    def save_epoch(self, state, epoch, metric):
        os.makedirs(self.folder, exist_ok=True)
        atomic_save(state, self.path('last.pth.tar'))
        if metric is None:
            return
        if self.max_history > 0:
            self.history.append((metric, epoch))
            self.history.sort(key=lambda t: t[0], reverse=not self.decreasing)
            if any(e == epoch for _, e in self.history[:self.max_history]):
                atomic_copy(self.path('last.pth.tar'), self.path(f'checkpoint-{epoch}.pth.tar'))
            for _, old in self.history[self.max_history:]:
                with suppress(FileNotFoundError):
                    os.remove(self.path(f'checkpoint-{old}.pth.tar'))
            self.history = self.history[:self.max_history]
        if state.get('best_epoch') == epoch:
            atomic_copy(self.path('last.pth.tar'), self.path('model_best.pth.tar'))

    def save_recovery(self, state):
        os.makedirs(self.folder, exist_ok=True)
        atomic_save(state, self.path('recovery.pth.tar'))


class NewRunFolder:
    """The run folder a new run creates, with any missing folders above it. If the run fails before its first
    checkpoint, `remove_unless_checkpointed` takes away what `create` made (the parents only while empty, as
    another run may have started in them); a folder that existed before is never removed."""

    def __init__(self):
        self.created = []  # the run folder first, then each parent that did not exist

    def create(self, run_dir):
        missing, path = [], os.path.abspath(run_dir)
        while not os.path.exists(path):
            missing.append(path)
            path = os.path.dirname(path)
        os.makedirs(run_dir, exist_ok=True)
        self.created = missing

    def remove_unless_checkpointed(self):
        if not self.created or os.path.isdir(os.path.join(self.created[0], 'checkpoint')):
            return
        shutil.rmtree(self.created[0], ignore_errors=True)
        for parent in self.created[1:]:
            with suppress(OSError):
                os.rmdir(parent)
        self.created = []


def _decide_run_folder(args):
    """(run folder, checkpoint to resume or '', refusal message or '') for the arguments."""
    output_base = args.output or './output/train'
    if args.resume and args.resume != 'auto':
        try:
            ckpt = load_checkpoint_file(args.resume)  # a missing or corrupt file is refused before anything else
        except CheckpointError as e:
            return '', '', str(e)
        problem = _not_a_run_checkpoint(args.resume, ckpt)
        if problem:
            return '', '', problem
        if not args.experiment:
            # one rule for every run: it writes into --output/--experiment, never into a folder taken from the
            # checkpoint's path
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
            hint = ''
            if os.path.basename(os.path.dirname(os.path.abspath(args.resume))) == 'checkpoint':
                parent = os.path.dirname(run_dir)
                same = os.path.abspath(output_base) == parent
                hint = (f'; to continue the run it belongs to, pass {"" if same else f"--output {parent} "}'
                        f'--experiment {os.path.basename(run_dir)}')
            return '', '', (f'--resume FILE needs --experiment NAME, the run folder under {output_base!r} that the '
                            f'resumed run writes to{hint}')
        return os.path.join(output_base, args.experiment), args.resume, ''
    name = args.experiment or '-'.join([datetime.datetime.now().strftime('%Y%m%d-%H%M%S'),
                                        args.model.replace('/', '_'),
                                        (args.teacher or 'noteacher').replace('/', '_'), args.distiller])
    run_dir = os.path.join(output_base, name)
    if args.resume == 'auto':
        resume_path = find_resume_checkpoint(run_dir)
        if resume_path is None:
            _logger.info(f'--resume auto: no valid checkpoint in {run_dir}, starting a new run')
        return run_dir, resume_path or '', ''
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not args.overwrite:
        return run_dir, '', (f'run folder {run_dir!r} already exists; pick another --experiment, continue it '
                             f'with --resume auto, or pass --overwrite')
    return run_dir, '', ''


def _not_a_run_checkpoint(path, ckpt):
    """Why `ckpt` cannot be resumed ('' when it can): only a checkpoint written by this train.py holds a run."""
    if 'distiller' in ckpt and 'epoch' in ckpt and isinstance(ckpt.get('state_dict'), dict):
        return ''
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        what = 'bare weights (a state dict)'
    elif isinstance(ckpt.get('args'), argparse.Namespace):
        what = "a checkpoint of another training script (timm's train.py)"
    else:
        what = 'no run of this train.py'
    return (f'checkpoint {path!r} holds {what}, so there is no run to continue; start a new run from its weights '
            f'with --initial-checkpoint {path}')


def find_resume_checkpoint(run_dir):
    """Path of the newest readable checkpoint of a run folder (by optimizer updates), skipping corrupt ones; None
    when there is none."""
    folder = os.path.join(run_dir, 'checkpoint')
    if not os.path.isdir(folder):
        return None
    best = None
    for name in sorted(os.listdir(folder)):
        if not name.endswith('.pth.tar'):
            continue
        path = os.path.join(folder, name)
        try:
            ckpt = load_checkpoint_file(path)
        except CheckpointError as e:
            _logger.warning(f'--resume auto: skipping {e}')
            continue
        if 'state_dict' not in ckpt or 'epoch' not in ckpt:
            continue
        key = (ckpt.get('step', 0), ckpt.get('batch_idx', -1) < 0, name == 'last.pth.tar')
        if best is None or key > best[0]:
            best = (key, path)
    return best[1] if best else None


# ---------------------------------------------------------------------------------------------------- train / eval
def create_train_loss(args, mixup_active):
    """The task loss of the student's logits: soft targets under mixup/cutmix, else label smoothing (or BCE)."""
    if mixup_active:
        return BinaryCrossEntropy(target_threshold=args.bce_target_thresh) if args.bce_loss \
            else SoftTargetCrossEntropy()
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh)
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def create_amp(args, device):
    """(autocast context factory, GradScaler or None): a scaler only for float16, which needs one."""
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    if not args.amp:
        return nullcontext, None

    def amp_autocast():
        return torch.autocast(device_type=device.type, dtype=amp_dtype)
    return amp_autocast, (torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None)


def create_optimizer(model, args):
    """The optimizer of `model` from the flags (--opt, --weight-decay, --opt-kwargs, ...). Without --lr, args.lr is
    set from --lr-base scaled by the global batch (linear, or sqrt for adaptive optimizers)."""
    if args.lr is None:
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps
        scale = global_batch / args.lr_base_size
        lr_scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        args.lr = args.lr_base * (scale ** 0.5 if lr_scale == 'sqrt' else scale)
    try:
        args.opt_args = parse_kwargs(args.opt_kwargs, '--opt-kwargs') or None
        kwargs = optimizer_kwargs(cfg=args)
        if kwargs.pop('layer_decay', None) is not None:
            return create_optimizer_v2(layer_decay_param_groups(model, args), **kwargs)
        if args.weight_decay_all:  # handed a module, timm would still exempt the no_weight_decay() names
            trainable = [p for p in model.parameters() if p.requires_grad]
            return create_optimizer_v2([{'params': trainable, 'weight_decay': args.weight_decay}], **kwargs)
        return create_optimizer_v2(model, **kwargs)
    except (ValueError, AssertionError) as e:
        raise UsageError(f'optimizer {args.opt!r} cannot be built ({e})') from None


def layer_decay_param_groups(model, args):
    """--layer-decay: timm's layer-wise lr scales (`lr_scale`, applied by the schedule) over the student's layers,
    grouped by its group_matcher as timm groups them. The distiller's own trainable modules (projectors, heads)
    are new, as a fine-tuned model's head is: they learn at the top layer's scale, 1. Weight decay as timm's
    factory gives it: none on 1-D tensors and on the names no_weight_decay() lists; on every parameter under
    --weight-decay-all."""
    student = getattr(model, 'student', model)
    decay_all = args.weight_decay_all
    no_decay = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') and not decay_all else set()
    prefix = 'student.' if student is not model else ''
    groups = param_groups_layer_decay(
        student, weight_decay=args.weight_decay, layer_decay=args.layer_decay, weight_decay_exclude_1d=not decay_all,
        no_weight_decay_list={n[len(prefix):] for n in no_decay if n.startswith(prefix)})
    own = [(n, p) for n, p in model.named_parameters() if p.requires_grad and prefix and not n.startswith(prefix)]
    for decay in (False, True):
        params = [p for n, p in own if ((p.ndim > 1 or decay_all)
                                        and not any(fnmatch.fnmatch(n, pattern) for pattern in no_decay)) == decay]
        if params:
            groups.append({'params': params, 'weight_decay': args.weight_decay if decay else 0., 'lr_scale': 1.0})
    # full-lr groups first: the log and summary.csv report param_groups[0]'s lr, which is then --lr's schedule
    return sorted(groups, key=lambda g: -g['lr_scale'])


def set_batchnorm_params(model, args):
    """--bn-momentum / --bn-eps on every BatchNorm of the student. timm's create_model takes them only for the
    EfficientNet family; set on the layers, they mean the same there and work for any model."""
    if args.bn_momentum is None and args.bn_eps is None:
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise UsageError(f'student {args.model!r} has no BatchNorm layer for --bn-momentum / --bn-eps to set; '
                         f'drop them')
    for m in norms:
        if args.bn_momentum is not None:
            m.momentum = args.bn_momentum
        if args.bn_eps is not None:
            m.eps = args.bn_eps


def create_schedule(optimizer, args, updates_per_epoch):
    """(timm scheduler, epochs the run trains: --epochs, plus the warm-up under --warmup-prefix, the cooldown and
    further --lr-cycle-limit cycles)."""
    if args.sched == 'none' and args.layer_decay is not None:
        raise UsageError('--layer-decay scales the lr through the schedule, and --sched none has none; use '
                         '--sched constant for a constant lr with layer decay')
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
            updates_per_epoch=updates_per_epoch)
    except (AssertionError, ValueError) as e:
        raise UsageError(f'the lr schedule cannot be built (--sched {args.sched!r}): '
                         f'{e or "timm rejects these schedule settings"}') from None
    if lr_scheduler is None:  # --sched none: timm leaves the lr at --lr, with no warm-up
        lr_scheduler = ConstantLR()
    return lr_scheduler, num_epochs


def train_step(model, images, labels, epoch, optimizer, loss_scaler, amp_autocast, args, parameters, window=1,
               update=True, step_flags=None, preemption=None, buffers=None, batch_extras=None):
    """One batch of training, the step train_one_epoch runs and benchmark.py times: the forward under autocast, the
    sum of the losses, its backward (divided by the accumulation `window`, scaled under float16 autocast) and, when
    `update` (the window's last batch), gradient clipping of `parameters`, the optimizer update and zero_grad.

    `step_flags` (a StepFlags; needed for --nan-check and under DDP) carries the finiteness check and the stop
    request; `buffers` = (floating buffers, a backup of the same shapes) lets a non-finite step put the BN
    statistics back. `batch_extras` are the keyword arguments the distiller declared (distillers/base.py), e.g.
    sample_index. Returns (losses, loss, stop requested); a non-finite loss under --nan-check raises
    NonFiniteLoss naming the components, with the gradients cleared and no update applied.
    """
    def stop_signal():
        return preemption is not None and preemption.signal is not None
    sync_context = model.no_sync if (args.distributed and not update) else nullcontext
    if buffers:
        torch._foreach_copy_(buffers[1], buffers[0])
    with sync_context():
        with amp_autocast():
            _, losses = model(images, labels, epoch=epoch, **(batch_extras or {}))
        loss = sum(losses.values())
        if step_flags is not None:
            step_flags.start(loss, stop_signal(), args.distributed)
        if loss_scaler is not None:
            loss_scaler.scale(loss / window).backward()
        else:
            (loss / window).backward()
    finite, stop_requested = step_flags.read() if step_flags is not None else (True, stop_signal())
    if args.nan_check and not finite:
        # the update is not applied; the forward already moved the BN statistics: put them back
        optimizer.zero_grad(set_to_none=True)
        if buffers:
            torch._foreach_copy_(buffers[0], buffers[1])
        bad = [k for k, v in losses.items() if not bool(torch.isfinite(v.detach()))]
        raise NonFiniteLoss(f'loss component {", ".join(bad) or "total"} is not finite')
    if update:
        if loss_scaler is not None:
            if args.clip_grad is not None:
                loss_scaler.unscale_(optimizer)
                dispatch_clip_grad(parameters, args.clip_grad, mode=args.clip_mode)
            loss_scaler.step(optimizer)
            loss_scaler.update()
        else:
            if args.clip_grad is not None:
                dispatch_clip_grad(parameters, args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, loss, stop_requested


def train_one_epoch(epoch, model, distiller, loader, optimizer, args, device, lr_scheduler, amp_autocast,
                    loss_scaler, model_ema, mixup_fn, state, writer, preemption, save_recovery, batches_per_epoch):
    """One epoch (or its remainder after a mid-epoch resume). `state` carries num_updates and the meters."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch and mixup_fn is not None:
        mixup_fn.mixup_enabled = False
    model.train()
    accum = args.grad_accum_steps
    start_batch = state['batch_idx']
    sums = state['loss_sums']  # name -> float tensor on device, summed over the epoch's batches
    seen = state['samples']
    last_idx = batches_per_epoch - 1
    last_window = batches_per_epoch % accum or accum
    log_start = time.time()
    log_samples = 0
    epoch_start = time.time()
    epoch_samples = 0
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    # a forward that produces a non-finite loss has already updated BN running stats: keep a copy to restore
    float_buffers = distiller.rollback_buffers() if args.nan_check else []
    buffer_backup = [b.detach().clone() for b in float_buffers]
    step_flags = StepFlags(device)
    # without the NaN check a single process needs no flags (and no sync); ranks always agree on stopping
    use_flags = args.nan_check or args.distributed
    cached_teacher = distiller.teacher if isinstance(distiller.teacher, CachedTeacher) else None
    optimizer.zero_grad(set_to_none=True)
    for batch_idx, (images, labels, *extras) in enumerate(loader, start=start_batch):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        # the loader adds the sample indices only for a distiller that declares needs_sample_indices
        batch_extras = {'sample_index': extras[0].to(device, non_blocking=True)} if extras else None
        if cached_teacher is not None or mixup_fn is not None:
            # the batch's positions in the global sample order: what the cache is keyed by and mixup draws from
            positions = loader.sampler.batch_positions(batch_idx)
            if cached_teacher is not None:
                cached_teacher.load_batch(epoch, positions, device)
            if mixup_fn is not None:
                images, labels = mixup_fn(images, labels, positions, epoch)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        update_step = (batch_idx + 1) % accum == 0 or batch_idx == last_idx
        # the last window of an epoch may hold fewer batches than --grad-accum-steps (timm's last_accum_steps)
        window = last_window if batch_idx >= batches_per_epoch - last_window else accum
        try:
            losses, loss, stop_requested = train_step(
                model, images, labels, epoch, optimizer, loss_scaler, amp_autocast, args, trainable,
                window=window, update=update_step, step_flags=step_flags if use_flags else None,
                preemption=preemption, buffers=(float_buffers, buffer_backup) if float_buffers else None,
                batch_extras=batch_extras)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f'{e} at epoch {epoch}, batch {batch_idx} (update {state["num_updates"]})') from None
        if update_step:
            state['num_updates'] += 1
            if model_ema is not None:
                model_ema.update(distiller.student, step=state['num_updates'])
            lr_scheduler.step_update(num_updates=state['num_updates'])
        n = labels.shape[0]  # samples, also where a two-view batch holds 2n images
        for name, value in (*losses.items(), ('loss', loss)):
            weighted = value.detach().float() * n
            sums[name] = sums[name] + weighted if name in sums else weighted
        seen += n
        log_samples += n
        epoch_samples += n
        state['batch_idx'] = batch_idx + 1
        state['samples'] = seen

        if batch_idx == last_idx or (batch_idx + 1) % args.log_interval == 0:
            lr = optimizer.param_groups[0]['lr']
            now = time.time()
            rate = log_samples * args.world_size / max(now - log_start, 1e-9)
            eta = (now - epoch_start) / max(batch_idx + 1 - start_batch, 1) * (last_idx - batch_idx)
            total_seen = reduce_sum(torch.tensor(float(seen), device=device), args)
            current = {k: reduce_sum(v.detach().float(), args) / args.world_size for k, v in losses.items()}
            averages = {k: reduce_sum(v, args) / total_seen for k, v in sums.items()}
            if is_primary(args):
                parts = [f'Train: {epoch} [{batch_idx + 1:>4d}/{batches_per_epoch} '
                         f'({100. * (batch_idx + 1) / batches_per_epoch:>3.0f}%)]',
                         f'Loss: {averages["loss"].item():#.4g}']
                parts += [f'{k}: {current[k].item():#.4g} ({averages[k].item():#.4g})' for k in losses]
                parts += [f'LR: {lr:.3e}', f'{rate:>7.1f} samples/s', f'ETA: {datetime.timedelta(seconds=int(eta))}']
                _logger.info('  '.join(parts))
                if writer is not None:
                    step = state['num_updates']
                    for k, v in current.items():
                        writer.add_scalar(f'train/{k}', v.item(), step)
                    writer.add_scalar('train/loss', (sum(current.values())).item(), step)
                    writer.add_scalar('train/lr', lr, step)
                    writer.add_scalar('train/samples_per_sec', rate, step)
            log_start, log_samples = time.time(), 0

        if update_step and args.recovery_interval and state['num_updates'] % args.recovery_interval == 0 \
                and batch_idx != last_idx:
            save_recovery(epoch)
        # only at an update boundary: gradients accumulated inside a window are not part of a checkpoint
        if update_step and batch_idx != last_idx and stop_requested:
            save_recovery(epoch)
            return None
    state['epoch_time'] = time.time() - epoch_start
    state['epoch_samples'] = epoch_samples
    total_seen = reduce_sum(torch.tensor(float(seen), device=device), args)
    metrics = OrderedDict((k, (reduce_sum(v, args) / total_seen).item()) for k, v in sums.items())
    metrics.move_to_end('loss', last=False)
    return metrics


def validate(model, loader, args, device, amp_autocast, log_suffix=''):
    totals = evaluate(model, loader, device, amp_autocast, args.channels_last)
    totals = reduce_sum(totals, args)
    count = max(totals[3].item(), 1.0)
    metrics = OrderedDict(loss=totals[0].item() / count, top1=100 * totals[1].item() / count,
                          top5=100 * totals[2].item() / count)
    if is_primary(args):
        _logger.info(f'Eval{log_suffix}: loss {metrics["loss"]:.4f}  top1 {metrics["top1"]:.2f}  '
                     f'top5 {metrics["top5"]:.2f}  ({int(count)} images)')
    return metrics


# ---------------------------------------------------------------------------------------------------- setup
def setup_logging(rank):
    """Log lines go to stdout (rank 0: from info up, the other ranks: warnings). Until the run folder's log.txt opens
    they are also held by the returned handler, which `open_log_file` replays into it: what a run says before its
    folder exists (a resume, a re-normalized teacher) is in its log too."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format='%(message)s',
                        stream=sys.stdout, force=True)
    early_lines = logging.handlers.MemoryHandler(capacity=1 << 16, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(early_lines)
    return early_lines


def open_log_file(path, early_lines):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
    early_lines.setTarget(handler)
    early_lines.close()  # writes the held lines, with their own time stamps
    root = logging.getLogger()
    root.removeHandler(early_lines)
    root.addHandler(handler)


def check_input_size(model, who, input_size):
    """One image through `model` (eval mode, no gradients, no RNG drawn): a size the model cannot take, such as one
    its patch size does not divide, is one sentence here rather than a traceback at the first training step."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, *input_size))
    except (RuntimeError, AssertionError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UsageError(f'{who} cannot take {input_size[-2]}x{input_size[-1]} images ({reason}); choose an '
                         f'--img-size it accepts') from None
    finally:
        model.train(was_training)


def _teacher_cache_refusal(distiller_cls, args):
    """Why this run cannot distill from --teacher-cache ('' when it can)."""
    name = args.distiller
    if not distiller_cls.needs_teacher:
        return f'distiller {name!r} uses no teacher, so --teacher-cache has nothing to serve; drop it'
    if not distiller_cls.teacher_logits_only:
        return (f'distiller {name!r} reads more of the teacher than its logits (features or modules), and a teacher '
                f'cache stores only its top-K class probabilities; drop --teacher-cache to distill from the live '
                f'teacher')
    if distiller_cls.two_view:
        return (f'distiller {name!r} runs the teacher on a second, strongly augmented view of each image, which a '
                f'teacher cache does not store; drop --teacher-cache')
    if args.teacher_eval_first:
        return '--teacher-eval-first validates a live teacher, and --teacher-cache builds none; drop one of them'
    if args.teacher_train_mode:
        return ('--teacher-train-mode asks for a live teacher in train mode, and a teacher cache holds the outputs '
                'of the teacher in eval mode; drop one of them')
    return ''


def build_teacher(args, num_classes, input_size, student_mean, student_std):
    """The teacher, its identity (logged and saved, no weights) and the mean/std its weights expect."""
    kwargs = parse_kwargs(args.teacher_kwargs, '--teacher-kwargs')
    checkpoint_path = args.teacher_checkpoint or (args.teacher_pretrained or '')
    hub = args.teacher_pretrained == '' and not args.teacher_checkpoint
    if checkpoint_path and not os.path.isfile(checkpoint_path):
        raise UsageError(f'teacher checkpoint {checkpoint_path!r} does not exist')
    try:
        if hub:  # hub weights keep their own head: a class count that differs is an error, not a random head
            teacher = create_model_at_size(args.teacher, input_size, pretrained=True,
                                           weights_hint='pass --teacher-checkpoint FILE instead', **kwargs)
        else:
            teacher = create_model_at_size(args.teacher, input_size, num_classes=num_classes, **kwargs)
    except ModelError:
        raise
    except TypeError as e:
        raise UsageError(f'teacher {args.teacher!r} does not take these arguments ({e}); check '
                         f'--teacher-kwargs') from None
    except Exception as e:
        if hub:
            raise UsageError(f'timm pretrained weights of teacher {args.teacher!r} cannot be had here '
                             f'({type(e).__name__}); pass --teacher-checkpoint FILE instead') from None
        raise
    if hub and teacher.num_classes != num_classes:
        raise UsageError(f'the timm pretrained teacher {args.teacher!r} has {teacher.num_classes} classes, but the '
                         f'dataset has {num_classes}; fine-tune a teacher and pass --teacher-checkpoint FILE')
    check_input_size(teacher, f'teacher {args.teacher!r}', input_size)
    identity = {'name': args.teacher,
                'checkpoint': checkpoint_path or ('timm-pretrained' if hub else 'random-init')}
    cfg = getattr(teacher, 'pretrained_cfg', None) or {}
    mean, std = cfg.get('mean', student_mean), cfg.get('std', student_std)
    if checkpoint_path:
        checkpoint = load_checkpoint_file(checkpoint_path)
        load_model_weights(teacher, checkpoint_path, use_ema=args.teacher_use_ema, who='teacher',
                           checkpoint=checkpoint,
                           classes_hint=f'use a teacher checkpoint trained on the dataset\'s {num_classes} classes')
        identity['sha256'] = file_sha256(checkpoint_path, 16)
        # a run of this project records the normalization it trained with; other files follow timm's config
        saved = checkpoint.get('data_config') if isinstance(checkpoint.get('data_config'), dict) else {}
        mean, std = saved.get('mean', mean), saved.get('std', std)
    elif not hub:
        mean, std = student_mean, student_std
    return teacher, identity, (tuple(mean), tuple(std))


def main(argv=None, new_folder=None):
    """One training run; returns the exit status. The run folder is created through `new_folder` (a NewRunFolder),
    which lets the caller remove it again when the run fails before its first checkpoint."""
    new_folder = new_folder or NewRunFolder()
    args, args_text = parse_args(argv)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise UsageError(f'--device {args.device} asks for a GPU, but none is available; use --device cpu')
    device = init_distributed_device(args)
    early_log_lines = setup_logging(args.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        # fixed input shapes: let cuDNN pick its fastest convolution algorithms once (timm's train.py does too)
        torch.backends.cudnn.benchmark = True
    # models are built under the same seed on every rank (so a randomly initialized teacher, too, is the same
    # everywhere); the training RNG is then made rank-dependent, as timm does, before the loaders are built
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    if args.data and not args.data_dir:
        args.data_dir = args.data
    mixup_active = mixup_requested(args)
    if mixup_active and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix pair each image with another: --batch-size must be even, not '
                         f'{args.batch_size}')
    if args.sync_bn and device.type != 'cuda':
        raise UsageError('--sync-bn needs GPUs (SyncBatchNorm has no CPU kernel); drop it on the CPU')
    if args.resume == 'auto' and not args.experiment:
        raise UsageError('--resume auto needs --experiment NAME to know which run folder to continue')

    # ------------------------------------------------------------------ run folder (never overwritten by accident)
    # rank 0 decides (the default name has a time stamp; the folder check must not race its creation)
    decision = [_decide_run_folder(args) if is_primary(args) else None]
    if args.distributed:
        dist.broadcast_object_list(decision, src=0)
    run_dir, resume_path, refusal = decision[0]
    if refusal:
        raise UsageError(refusal)
    resume_ckpt = load_checkpoint_file(resume_path) if resume_path else None
    # ------------------------------------------------------------------ data (it decides the class count)
    if not is_model(args.model):
        raise ModelError(f'unknown model {args.model!r}: not in the timm registry nor in models/')
    # the student's pretrained config, overridden by the flags
    data_config = student_data_config(args)
    input_size = tuple(data_config['input_size'])

    dataset_args = argparse.Namespace(**vars(args))
    dataset_args.input_size = input_size
    if args.distributed and args.dataset_download and not is_primary(args):
        dist.barrier()  # rank 0 downloads first
    dataset_train, dataset_eval, dataset_classes = create_datasets(dataset_args)
    if args.distributed and args.dataset_download and is_primary(args):
        dist.barrier()
    if args.num_classes is None:
        args.num_classes = dataset_classes
    elif dataset_classes and args.num_classes != dataset_classes:
        raise UsageError(f'--num-classes {args.num_classes} differs from the {dataset_classes} classes of the '
                         f'dataset; drop --num-classes or fix it')

    # ------------------------------------------------------------------ student
    student_args = dict(pretrained=args.pretrained, drop_rate=args.drop,
                        **parse_kwargs(args.model_kwargs, '--model-kwargs'))
    if args.drop_path is not None:
        student_args['drop_path_rate'] = args.drop_path
    if args.drop_block is not None:
        student_args['drop_block_rate'] = args.drop_block
    if args.gp:
        student_args['global_pool'] = args.gp
    if args.in_chans:
        student_args['in_chans'] = args.in_chans
    if args.pretrained_path:
        student_args['pretrained_cfg_overlay'] = dict(file=args.pretrained_path)
    try:
        student = create_model_at_size(args.model, input_size, num_classes=args.num_classes,
                                       weights_hint='pass --pretrained-path FILE, or drop --pretrained',
                                       **student_args)
    except TypeError as e:
        raise UsageError(f'student {args.model!r} does not take these arguments ({e}); check --model-kwargs, '
                         f'--drop-path, --drop-block and --gp') from None
    check_input_size(student, f'student {args.model!r}', input_size)
    set_batchnorm_params(student, args)
    if args.initial_checkpoint:
        load_model_weights(student, args.initial_checkpoint, who='student')
    if args.grad_checkpointing:
        student.set_grad_checkpointing(enable=True)

    # ------------------------------------------------------------------ teacher and distiller
    distiller_cls = get_distiller_class(args.distiller)
    teacher, teacher_identity, teacher_cache = None, None, None
    if args.teacher_cache:
        refusal = _teacher_cache_refusal(distiller_cls, args)
        if refusal:
            raise UsageError(refusal)
        if args.teacher_checkpoint and not os.path.isfile(args.teacher_checkpoint):
            raise UsageError(f'teacher checkpoint {args.teacher_checkpoint!r} does not exist')
        teacher_cache = TeacherCache.open(args.teacher_cache)
        teacher = CachedTeacher(teacher_cache)
        cached = teacher_cache.manifest['teacher']
        teacher_identity = {'name': cached['name'], 'checkpoint': f'{cached["checkpoint"]} from the cache '
                                                                   f'{args.teacher_cache}'}
    elif distiller_cls.needs_teacher:
        if not args.teacher:
            raise UsageError(f'distiller {args.distiller!r} needs a teacher; pass --teacher NAME '
                             f'(and --teacher-checkpoint FILE)')
        teacher, teacher_identity, teacher_norm = build_teacher(args, args.num_classes, input_size,
                                                                data_config['mean'], data_config['std'])
    elif args.teacher and is_primary(args):
        _logger.info(f'distiller {args.distiller!r} uses no teacher; --teacher {args.teacher} is ignored')

    distiller = distiller_cls(student, teacher, create_train_loss(args, mixup_active), args, input_size)
    if distiller_cls.needs_sample_indices:  # per-sample state (e.g. memory banks) is sized before a resume loads it
        distiller.set_train_targets(dataset_targets(dataset_train))
    if teacher is not None and teacher_cache is None:
        t_mean, t_std = teacher_norm
        if is_primary(args) and (t_mean != tuple(data_config['mean']) or t_std != tuple(data_config['std'])):
            _logger.warning(f'the teacher expects mean {t_mean} / std {t_std}, the student {data_config["mean"]} / '
                            f'{data_config["std"]}: the teacher\'s input is re-normalized')
        distiller.set_teacher_normalization(data_config['mean'], data_config['std'], t_mean, t_std)

    distiller.to(device)
    if teacher is not None:
        teacher.to(device)
    if args.channels_last:
        distiller.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)

    # ------------------------------------------------------------------ optimizer, amp, ema
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    optimizer = create_optimizer(distiller, args)

    amp_autocast, loss_scaler = create_amp(args, device)

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(distiller.student, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)

    # ------------------------------------------------------------------ loaders and schedule
    torch.manual_seed(args.seed + args.rank)
    np.random.seed(args.seed + args.rank)
    random.seed(args.seed + args.rank)
    data_seed = args.seed if args.data_seed is None else args.data_seed
    try:
        train_transform = build_train_transform(args, data_config)
        if distiller_cls.two_view:  # the distiller declared a weak and a strong view of each image
            train_transform = TwoViewTransform(train_transform, build_strong_train_transform(args, data_config))
    except ValueError as e:
        raise UsageError(str(e)) from None
    eval_transform = build_eval_transform(data_config)
    mixup_fn = None
    if mixup_active:
        mixup_fn = GlobalBatchMixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                                    prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                                    label_smoothing=args.smoothing, num_classes=args.num_classes, seed=data_seed,
                                    global_batch=args.batch_size * args.world_size)
    try:
        loader_train = create_train_loader(dataset_train, train_transform, args.batch_size, data_seed, args.workers,
                                           args.rank, args.world_size, args.pin_mem,
                                           with_index=distiller_cls.needs_sample_indices,
                                           aug_repeats=args.aug_repeats)
    except ValueError as e:
        raise UsageError(str(e)) from None
    loader_eval = create_eval_loader(dataset_eval, eval_transform, args.validation_batch_size or args.batch_size,
                                     args.workers, args.rank, args.world_size, args.pin_mem)
    batches_per_epoch = loader_train.sampler.batches_per_epoch()
    updates_per_epoch = (batches_per_epoch + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_schedule(optimizer, args, updates_per_epoch)
    if teacher_cache is not None:
        teacher_cache.check_run(stream_identity(args, data_config, args.batch_size * args.world_size, data_seed),
                                dataset_identity(dataset_args, dataset_train, args.num_classes), num_epochs,
                                teacher_name=args.teacher,
                                teacher_sha256=file_sha256(args.teacher_checkpoint) if args.teacher_checkpoint else '')

    # ------------------------------------------------------------------ resume
    start_epoch, start_batch, num_updates = 0, 0, 0
    best_metric, best_epoch = None, None
    loss_sums, samples_seen = {}, 0
    if resume_ckpt is not None:
        saved_teacher = (resume_ckpt.get('teacher') or {}).get('name', '')
        for what, theirs, mine in (('arch', resume_ckpt.get('arch'), args.model),
                                   ('distiller', resume_ckpt.get('distiller'), args.distiller),
                                   ('teacher', saved_teacher, (teacher_identity or {}).get('name', ''))):
            if theirs is not None and theirs != mine:
                raise UsageError(f'resume checkpoint {resume_path!r} was written with {what} {theirs!r}, but this run '
                                 f'uses {mine!r}')
        student_state = resume_ckpt['state_dict']
        try:
            distiller.student.load_state_dict(student_state)
            distiller.load_distiller_state_dict(resume_ckpt.get('distiller_state', {}))
        except (RuntimeError, DistillerError) as e:
            raise UsageError(f'resume checkpoint {resume_path!r} does not fit this run: '
                             f'{str(e).splitlines()[0][:200]}') from None
        if not args.no_resume_opt:
            saved_opt = (resume_ckpt.get('args') or {}).get('opt', args.opt)
            if saved_opt != args.opt:
                raise UsageError(f'resume checkpoint {resume_path!r} was written with optimizer {saved_opt!r}, '
                                 f'but this run uses {args.opt!r}; pass --no-resume-opt to start a fresh optimizer')
            saved_decay_all = bool((resume_ckpt.get('args') or {}).get('weight_decay_all', False))
            if saved_decay_all != args.weight_decay_all:
                flag = '--weight-decay-all' if saved_decay_all else '--no-weight-decay-all'
                raise UsageError(f'resume checkpoint {resume_path!r} was written with {flag}, which groups the '
                                 f'optimizer differently; pass {flag} to continue it, or --no-resume-opt')
            try:
                optimizer.load_state_dict(resume_ckpt['optimizer'])
                if loss_scaler is not None and resume_ckpt.get('scaler') is not None:
                    loss_scaler.load_state_dict(resume_ckpt['scaler'])
            except (KeyError, ValueError) as e:
                raise UsageError(f'the optimizer state of {resume_path!r} does not fit this run ({e}); pass '
                                 f'--no-resume-opt to start a fresh optimizer') from None
        if model_ema is not None:
            if resume_ckpt.get('state_dict_ema') is not None:
                model_ema.module.load_state_dict(resume_ckpt['state_dict_ema'])
            else:  # the checkpoint had no EMA: start it from the resumed weights, not from the initialization
                model_ema.set(distiller.student)
        num_updates = resume_ckpt.get('step', 0)
        best_metric, best_epoch = resume_ckpt.get('best_metric'), resume_ckpt.get('best_epoch')
        if resume_ckpt.get('batch_idx', -1) >= 0:  # a mid-epoch recovery checkpoint
            start_epoch, start_batch = resume_ckpt['epoch'], resume_ckpt['batch_idx']
            loss_sums = {k: v.to(device) for k, v in resume_ckpt.get('loss_sums', {}).items()}
            samples_seen = resume_ckpt.get('samples', 0)
        else:
            start_epoch = resume_ckpt['epoch'] + 1
        rng = resume_ckpt.get('rng')
        if isinstance(rng, list) and len(rng) == args.world_size:
            set_rng_state(rng[args.rank])
        if is_primary(args):
            _logger.info(f'Resumed from {resume_path}: epoch {start_epoch}, batch {start_batch}, '
                         f'update {num_updates}')
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
        if resume_ckpt is None:
            num_updates = start_epoch * updates_per_epoch
    if resume_ckpt is not None and resume_ckpt.get('scheduler') and args.sched == 'plateau':
        # a plateau schedule carries state (best metric, bad epochs); the others are functions of the step,
        # and their saved state would also carry the old --epochs, which a resume may extend
        lr_scheduler.load_state_dict(resume_ckpt['scheduler'])
    lr_scheduler.step(start_epoch)
    if args.sched_on_updates or num_updates:
        lr_scheduler.step_update(num_updates=num_updates)

    # ------------------------------------------------------------------ DDP over the trainable parts only
    model = distiller
    if args.torchcompile:
        model = torch.compile(distiller, backend=args.torchcompile)
        # the buffers a distiller keeps identical on every rank itself (distillers/crd.py's memory banks) are known to
        # DDP by their names in the module it wraps, which the compiled wrapper prefixes with _orig_mod.
        ignored = getattr(distiller, '_ddp_params_and_buffers_to_ignore', ())
        if ignored:
            model._ddp_params_and_buffers_to_ignore = [f'_orig_mod.{name}' for name in ignored]
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=distiller_cls.find_unused_parameters)

    # ------------------------------------------------------------------ outputs (nothing is written before here)
    writer = None
    summary_path = os.path.join(run_dir, 'summary.csv')
    if is_primary(args):
        try:
            new_folder.create(run_dir)
            probe = os.path.join(run_dir, f'.write-test-{os.getpid()}')
            with open(probe, 'w'):
                pass
            os.remove(probe)
        except OSError as e:
            raise UsageError(f'output folder {run_dir!r} cannot be written ({e.strerror})') from None
        if resume_ckpt is None and args.overwrite:  # a new run starts from an empty folder
            for name in ('checkpoint', 'tb', 'summary.csv', 'log.txt', 'args.yaml'):
                path = os.path.join(run_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        elif resume_ckpt is not None and os.path.exists(summary_path):
            _truncate_summary(summary_path, start_epoch)
        with open(os.path.join(run_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)
        open_log_file(os.path.join(run_dir, 'log.txt'), early_log_lines)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=os.path.join(run_dir, 'tb'))
        n_student = sum(p.numel() for p in distiller.student.parameters())
        _logger.info(f'Run folder: {run_dir}')
        _logger.info(f'Processes: {args.world_size} ({device.type}), batch {args.batch_size} per process, '
                     f'global batch {global_batch}, lr {args.lr:.4g}, {num_epochs} epochs of '
                     f'{batches_per_epoch} batches')
        if args.warmup_prefix and args.warmup_epochs > 0 and num_epochs > args.epochs:
            _logger.warning(f'WARNING: --warmup-prefix adds the {args.warmup_epochs} warm-up epochs to --epochs '
                            f'{args.epochs}: the run trains {num_epochs} epochs in all')
        _logger.info(f'Student {args.model}: {n_student / 1e6:.3f}M parameters; distiller {args.distiller}: '
                     f'{distiller.extra_parameters() / 1e6:.3f}M extra trainable parameters')
        if teacher_identity is not None:
            _logger.info(f'Teacher {teacher_identity["name"]}: {teacher_identity["checkpoint"]}'
                         + (f' (sha256 {teacher_identity["sha256"]})' if 'sha256' in teacher_identity else ''))
            if teacher_identity['checkpoint'] == 'random-init':
                _logger.warning('WARNING: the teacher has random weights; pass --teacher-checkpoint FILE')
    if args.teacher_eval_first and teacher is not None:
        teacher.eval()
        t_metrics = _validate_teacher(distiller, loader_eval, args, device, amp_autocast)
        if is_primary(args):
            _logger.info(f'Teacher top-1: {t_metrics["top1"]:.2f}')
            if writer is not None:
                writer.add_scalar('teacher/top1', t_metrics['top1'], 0)

    checkpoints = CheckpointManager(os.path.join(run_dir, 'checkpoint'), args.eval_metric == 'loss',
                                    args.checkpoint_hist)
    preemption = PreemptionFlag()
    state = {'num_updates': num_updates, 'batch_idx': start_batch, 'loss_sums': loss_sums, 'samples': samples_seen}
    resolved_args = yaml.safe_load(args_text)  # the run's arguments as args.yaml has them, a plain dict

    def checkpoint_state(epoch, batch_idx, metric=None):
        rng = [rng_state()]
        if args.distributed:
            rng = [None] * args.world_size
            dist.all_gather_object(rng, rng_state())
        return {
            'version': CHECKPOINT_VERSION, 'arch': args.model, 'distiller': args.distiller,
            'num_classes': args.num_classes,
            'data_config': {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()},
            'epoch': epoch, 'batch_idx': batch_idx, 'step': state['num_updates'],
            'state_dict': distiller.student.state_dict(),
            'state_dict_ema': model_ema.module.state_dict() if model_ema is not None else None,
            'distiller_state': distiller.distiller_state_dict(),
            'optimizer': optimizer.state_dict(),
            'scheduler': lr_scheduler.state_dict(),
            'scaler': loss_scaler.state_dict() if loss_scaler is not None else None,
            'loss_sums': {k: v.detach().cpu() for k, v in state['loss_sums'].items()},
            'samples': state['samples'],
            'metric': metric, 'best_metric': best_metric, 'best_epoch': best_epoch,
            'args': resolved_args,
            'teacher': teacher_identity, 'rng': rng,
        }

    def save_recovery(epoch):
        ckpt = checkpoint_state(epoch, state['batch_idx'])
        if is_primary(args):
            checkpoints.save_recovery(ckpt)
            _logger.info(f'Recovery checkpoint: epoch {epoch}, batch {state["batch_idx"]}')

    # ------------------------------------------------------------------ the loop
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, num_epochs):
            loader_train.sampler.set_epoch(epoch, state['batch_idx'])
            train_metrics = train_one_epoch(
                epoch, model, distiller, loader_train, optimizer, args, device, lr_scheduler, amp_autocast,
                loss_scaler, model_ema, mixup_fn, state, writer, preemption, save_recovery, batches_per_epoch)
            if train_metrics is None:  # preempted: the recovery checkpoint is written
                if is_primary(args):
                    by = signal.Signals(preemption.signal).name if preemption.signal else 'another process'
                    _logger.info(f'Stopped by signal {by} at epoch {epoch}, batch {state["batch_idx"]}; continue '
                                 f'with --resume auto --experiment {os.path.basename(run_dir)}')
                return 0
            if args.distributed and args.dist_bn:
                # each process has run BatchNorm on its own batches: the evaluation (of every process) and the
                # checkpoint (rank 0's) use one set of statistics, as validate.py on the checkpoint will
                distribute_bn(distiller, args.world_size, args.dist_bn == 'reduce')
                if model_ema is not None:
                    distribute_bn(model_ema, args.world_size, args.dist_bn == 'reduce')
            epoch_lr = optimizer.param_groups[0]['lr']  # the lr this epoch ran with, before the epoch step
            eval_metrics = None
            if not args.speedtest and (epoch % args.eval_interval == 0 or epoch + 1 == num_epochs
                                       or epoch > int(args.eval_interval_end * num_epochs)):
                eval_metrics = validate(distiller.student, loader_eval, args, device, amp_autocast)
                if model_ema is not None:
                    ema_metrics = validate(model_ema.module, loader_eval, args, device, amp_autocast, ' (EMA)')
                    eval_metrics.update((f'{k}_ema', v) for k, v in ema_metrics.items())
            lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric] if eval_metrics else None)
            metric = None
            if eval_metrics is not None:
                # with an EMA, the EMA weights are the model (as in timm): they pick the best checkpoint
                metric = eval_metrics[f'{args.eval_metric}_ema' if model_ema is not None else args.eval_metric]
                if checkpoints.better(metric, best_metric):
                    best_metric, best_epoch = metric, epoch
            state.update(batch_idx=0, loss_sums={}, samples=0)
            ckpt = checkpoint_state(epoch, -1, metric)
            if is_primary(args):
                rate = state['epoch_samples'] * args.world_size / max(state['epoch_time'], 1e-9)
                _write_summary(summary_path, epoch, train_metrics, eval_metrics, epoch_lr, rate)
                if writer is not None:
                    for k, v in train_metrics.items():
                        writer.add_scalar(f'epoch/train_{k}', v, epoch)
                    for k, v in (eval_metrics or {}).items():
                        writer.add_scalar(f'eval/{k}', v, epoch)
                    writer.add_scalar('epoch/samples_per_sec', rate, epoch)
                    writer.flush()
                checkpoints.save_epoch(ckpt, epoch, metric)
                with suppress(FileNotFoundError):
                    os.remove(checkpoints.path('recovery.pth.tar'))
    except NonFiniteLoss as e:
        # the weights have not been stepped with the bad loss: they are the last good state
        ckpt = checkpoint_state(epoch, state['batch_idx'])
        if is_primary(args):
            checkpoints.save_recovery(ckpt)
            _logger.error(f'Stopped: {e}; the last good state is in {checkpoints.path("recovery.pth.tar")}')
        return 1
    finally:
        preemption.restore()
        if writer is not None:
            writer.close()
    if is_primary(args) and best_metric is not None:
        _logger.info(f'*** Best {args.eval_metric}: {best_metric:.2f} (epoch {best_epoch})')
    return 0


def _validate_teacher(distiller, loader, args, device, amp_autocast):
    class TeacherView(nn.Module):
        """The teacher as the distiller runs it (re-normalized input); no submodules, so eval() leaves its mode."""

        def forward(self, x):
            return distiller.teacher(distiller.teacher_input(x))

    return validate(TeacherView(), loader, args, device, amp_autocast, ' (teacher)')


def _write_summary(path, epoch, train_metrics, eval_metrics, lr, rate):
    row = OrderedDict(epoch=epoch, lr=lr)
    row.update((f'train_{k}', v) for k, v in train_metrics.items())
    row.update((f'eval_{k}', v) for k, v in (eval_metrics or {}).items())
    row['samples_per_sec'] = rate
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    fieldnames = list(row)
    if exists:
        with open(path) as f:
            header = next(csv.reader(f), [])
        fieldnames = header + [k for k in row if k not in header]
        if fieldnames != header:  # a column appeared (e.g. eval after skipped epochs): rewrite with the new header
            with open(path) as f:
                rows = list(csv.DictReader(f))
            with open(path, 'w', newline='') as f:
                w = csv.DictWriter(f, fieldnames=fieldnames)
                w.writeheader()
                w.writerows(rows)
    with open(path, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        if not exists:
            w.writeheader()
        w.writerow(row)


def _truncate_summary(path, start_epoch):
    with open(path) as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = [r for r in reader if int(r['epoch']) < start_epoch]
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def run():
    debug = '--debug' in sys.argv
    new_folder = NewRunFolder()
    try:
        code = main(new_folder=new_folder)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one: stop now, no checkpoint
        new_folder.remove_unless_checkpointed()
        if debug:
            raise
        print('train.py: interrupted', file=sys.stderr)
        code = 130
    except BaseException as e:
        # whatever stopped it, a new run that wrote no checkpoint yet leaves nothing behind: the corrected
        # command must not be refused because the folder of the failed attempt exists
        new_folder.remove_unless_checkpointed()
        if debug or not isinstance(e, (UsageError, DatasetError, DistillerError, CheckpointError, ModelError)):
            raise
        code = report_user_error('train.py', e)
    exit_process(code)


if __name__ == '__main__':
    run()
