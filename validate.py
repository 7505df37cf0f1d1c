#!/usr/bin/env python3
""" UFD-KD validation script, compatible with timm's validate.py flags.

Evaluates this project's checkpoints (the student's `state_dict`, or `state_dict_ema` with --use-ema) and
plain timm checkpoints or state_dicts, on an ImageNet-style folder, torchvision CIFAR or the synthetic set:

    python validate.py --checkpoint output/train/run/checkpoint/model_best.pth.tar --dataset synthetic
    python validate.py /data/imagenet --model resnet18 --checkpoint resnet18.pth --results-file r.csv

`--checkpoint` may name a folder: every *.pth.tar / *.pth in it is evaluated, one result row each.
"""
import argparse
import csv
import glob
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext

import torch
import torch.nn as nn

from timm.data import resolve_data_config
from timm.utils import accuracy

import models  # noqa: F401  (registers the CIFAR models in timm)
from cli import IMAGE_RULES, ArgumentParser, UsageError, check_values, number, report_user_error
from data import DatasetError, create_eval_dataset
from data.loader import build_eval_transform, create_eval_loader
from models.checkpoint import CheckpointError, load_checkpoint_file, load_model_weights, select_state_dict
from models.factory import ModelError, create_model_at_size

_logger = logging.getLogger('validate')


parser = ArgumentParser(description='UFD-KD validation')
parser.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (positional, as in timm)')
parser.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
parser.add_argument('--dataset', metavar='NAME', default='',
                    help='"" / imagefolder, torch/cifar100, torch/cifar10, synthetic, or a timm dataset name')
parser.add_argument('--split', metavar='NAME', default='val', help='dataset split (default: val)')
parser.add_argument('--synthetic-classes', type=number(int, 2), default=None, metavar='N',
                    help='synthetic: classes (default: from the checkpoint\'s run, else 10)')
parser.add_argument('--synthetic-train-size', type=number(int, 1), default=None, metavar='N',
                    help='synthetic, --split train: train images (default: the checkpoint\'s run\'s, else 5000)')
parser.add_argument('--synthetic-val-size', type=number(int, 1), default=None, metavar='N',
                    help='synthetic: val images (default: the checkpoint\'s run\'s, else 1000)')
parser.add_argument('--synthetic-seed', type=int, default=None, metavar='S', help='synthetic: seed')
parser.add_argument('--synthetic-superclasses', type=number(int, 0), default=None, metavar='S',
                    help='synthetic: superclasses (default: the checkpoint\'s run\'s, else 0)')
parser.add_argument('--synthetic-train-fraction', type=number(float, 0, 1, low_open=True), default=None,
                    metavar='F', help='synthetic, --split train: fraction trained on (default: the checkpoint\'s '
                                      'run\'s, else 1)')
parser.add_argument('--model', '-m', default='', metavar='NAME', help='model name (default: the checkpoint\'s arch)')
parser.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='checkpoint file or folder')
parser.add_argument('--use-ema', action=argparse.BooleanOptionalAction, default=False, help='evaluate the EMA weights')
parser.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=False,
                    help='timm pretrained weights')
parser.add_argument('--num-classes', type=number(int, 1), default=None, help='classes (default: the checkpoint\'s)')
parser.add_argument('--img-size', default=None, type=number(int, 1), metavar='N', help='input image size')
parser.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N', help='input size C H W')
parser.add_argument('--crop-pct', default=None, type=number(float, 0, low_open=True), metavar='N',
                    help='center crop ratio')
parser.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='dataset mean')
parser.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='dataset std')
parser.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation')
parser.add_argument('-b', '--batch-size', default=256, type=number(int, 1), metavar='N', help='batch size')
parser.add_argument('-j', '--workers', default=4, type=number(int, 0), metavar='N', help='data loading processes')
parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False, help='mixed precision (autocast)')
parser.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'], help='autocast dtype')
parser.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False,
                    help='channels_last memory layout')
parser.add_argument('--device', default=None, type=str, help='cuda or cpu (default: cuda if available)')
parser.add_argument('--results-file', default='', type=str, metavar='FILE', help='write the results here')
parser.add_argument('--results-format', default='csv', choices=['csv', 'json'], help='format of --results-file')
parser.add_argument('--debug', action=argparse.BooleanOptionalAction, default=False,
                    help='show tracebacks of user errors')


def checkpoint_files(path):
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, '*.pth.tar')) + glob.glob(os.path.join(path, '*.pth')))
        if not files:
            raise UsageError(f'checkpoint folder {path!r} holds no *.pth.tar or *.pth files')
        return files
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path!r} does not exist')
    return [path]


def validate_one(args, checkpoint_path, device):
    ckpt = load_checkpoint_file(checkpoint_path) if checkpoint_path else {}
    run_args = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
    model_name = args.model or ckpt.get('arch') or run_args.get('model')
    if not model_name:
        raise UsageError(f'checkpoint {checkpoint_path!r} does not name its model; pass --model NAME')
    state = select_state_dict(ckpt, use_ema=args.use_ema, path=checkpoint_path) if checkpoint_path else None
    num_classes = args.num_classes or ckpt.get('num_classes')
    if num_classes is None and state is not None:
        # the classifier is the last 2-D weight of the state dict in every timm model
        weights = [v for k, v in state.items() if k.endswith('weight') and v.ndim == 2]
        num_classes = int(weights[-1].shape[0]) if weights else None
    saved_data = ckpt.get('data_config') or {}
    img_size = None
    if args.input_size:
        img_size = tuple(args.input_size)
    elif args.img_size:
        img_size = (3, args.img_size, args.img_size)
    elif saved_data.get('input_size'):
        img_size = tuple(saved_data['input_size'])
    kwargs = dict(pretrained=args.pretrained)
    if num_classes:
        kwargs['num_classes'] = num_classes
    model = create_model_at_size(model_name, img_size, weights_hint='pass --checkpoint FILE instead', **kwargs)
    if state is not None:
        load_model_weights(model, checkpoint_path, use_ema=args.use_ema, who='model', checkpoint=ckpt,
                           classes_hint='drop --num-classes to take the checkpoint\'s' if args.num_classes else '')
    data_args = {k: v for k, v in vars(args).items() if k in ('crop_pct', 'mean', 'std', 'interpolation')}
    for key in ('mean', 'std', 'crop_pct', 'interpolation'):
        if not data_args.get(key) and saved_data.get(key) is not None:
            data_args[key] = saved_data[key]
    data_args['input_size'] = img_size
    data_config = resolve_data_config(data_args, model=model)
    dataset_name, data_dir = args.dataset, args.data_dir or args.data
    if not dataset_name and not data_dir and run_args:
        # the dataset the checkpoint's run trained on (its data_dir is as that run's command gave it)
        dataset_name = run_args.get('dataset') or ''
        data_dir = run_args.get('data_dir') or run_args.get('data')
        _logger.info(f'dataset of the checkpoint\'s run: --dataset {dataset_name or "imagefolder"}'
                     + (f' --data-dir {data_dir}' if data_dir and dataset_name.lower() != 'synthetic' else ''))
    # the synthetic set's samples depend on its size: the run's size of the split gives back the run's images
    if args.split == 'train':
        synthetic_size = args.synthetic_train_size or run_args.get('synthetic_train_size', 5000)
    else:
        synthetic_size = args.synthetic_val_size or run_args.get('synthetic_val_size', 1000)
    dataset = create_eval_dataset(
        dataset_name, data_dir, args.split, int(data_config['input_size'][-1]),
        args.synthetic_classes or run_args.get('synthetic_classes', 10), synthetic_size,
        args.synthetic_seed if args.synthetic_seed is not None else run_args.get('synthetic_seed', 0),
        args.synthetic_superclasses if args.synthetic_superclasses is not None
        else run_args.get('synthetic_superclasses', 0),
        args.synthetic_train_fraction or run_args.get('synthetic_train_fraction', 1.0))
    loader = create_eval_loader(dataset, build_eval_transform(data_config), args.batch_size, args.workers)

    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if args.amp else nullcontext
    start = time.time()
    total_loss, correct1, correct5, count = evaluate(model, loader, device, autocast, args.channels_last).tolist()
    elapsed = time.time() - start
    return OrderedDict(
        model=model_name, checkpoint=checkpoint_path, top1=round(100 * correct1 / max(count, 1), 3),
        top5=round(100 * correct5 / max(count, 1), 3), loss=round(total_loss / max(count, 1), 5),
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        img_size=int(data_config['input_size'][-1]), samples_per_sec=round(count / max(elapsed, 1e-9), 1),
        images=int(count), ema=args.use_ema)


@torch.no_grad()
def evaluate(model, loader, device, autocast=nullcontext, channels_last=False) -> torch.Tensor:
    """Sums over the loader, as float64 on `device`: (cross-entropy, top-1 hits, top-5 hits, images).

    Sums rather than means, so that train.py can add them up across DDP ranks exactly.
    """
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction='sum')
    totals = torch.zeros(4, device=device, dtype=torch.float64)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images).float()
        top1, top5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[-1])))
        n = images.shape[0]
        totals += torch.stack([loss_fn(logits, labels).double(), top1.double() * n / 100, top5.double() * n / 100,
                               torch.tensor(float(n), device=device, dtype=torch.float64)])
    return totals


def write_results(rows, path, fmt):
    if fmt == 'json':
        with open(path, 'w') as f:
            json.dump(rows if len(rows) > 1 else rows[0], f, indent=2)
        return
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    args = parser.parse_args(argv)
    check_values(args, IMAGE_RULES)
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if not args.checkpoint and not args.pretrained:
        raise UsageError('nothing to evaluate: pass --checkpoint FILE|FOLDER or --pretrained')
    if args.results_file:
        folder = os.path.dirname(os.path.abspath(args.results_file))
        if not os.path.isdir(folder):
            raise UsageError(f'the folder of --results-file {args.results_file!r} does not exist')
    rows = []
    for path in checkpoint_files(args.checkpoint) if args.checkpoint else ['']:
        row = validate_one(args, path, device)
        _logger.info(f'{row["model"]} {os.path.basename(path) or "(pretrained)"}: top1 {row["top1"]:.2f}  '
                     f'top5 {row["top5"]:.2f}  loss {row["loss"]:.4f}  params {row["param_count"]}M  '
                     f'img_size {row["img_size"]}  {row["samples_per_sec"]} samples/s')
        rows.append(row)
    if args.results_file:
        write_results(rows, args.results_file, args.results_format)
    return rows


def run():
    try:
        main()
    except (UsageError, DatasetError, CheckpointError, ModelError) as e:
        if '--debug' in sys.argv:
            raise
        sys.exit(report_user_error('validate.py', e))


if __name__ == '__main__':
    run()
