"""Shared helpers for the end-to-end tests: run train.py / validate.py as a user would, on synthetic data."""
import argparse
import csv
import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# a small, fast synthetic problem; tests override what they need
SYNTHETIC_ARGS = [
    '--dataset', 'synthetic', '--synthetic-classes', '10', '--synthetic-train-size', '128',
    '--synthetic-val-size', '64', '--img-size', '32', '--batch-size', '32', '--workers', '0',
    '--log-interval', '1', '--seed', '0',
]


def python_env(threads: int = 1):
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', str(threads))
    env['PYTHONUNBUFFERED'] = '1'
    env['HF_HUB_OFFLINE'] = '1'  # no test reaches the hub: fail at once instead of retrying
    env.pop('CUDA_VISIBLE_DEVICES', None)
    return env


def run_script(script, *args, check=True, cwd=None, timeout=600):
    """Run `python <script> args...` from the repo root; returns the CompletedProcess."""
    cmd = [sys.executable, str(REPO / script), *[str(a) for a in args]]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=python_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n'
                             f'stderr:\n{proc.stderr[-4000:]}')
    return proc


def run_train(tmp_path, *args, experiment='run', synthetic=True, check=True, timeout=600):
    """train.py on the synthetic dataset into tmp_path/experiment; returns (CompletedProcess, run_dir)."""
    base = list(SYNTHETIC_ARGS) if synthetic else []
    proc = run_script('train.py', *base, '--output', tmp_path, '--experiment', experiment, *args,
                      check=check, timeout=timeout)
    return proc, Path(tmp_path) / experiment


def train_in_process(argv):
    """train.main here, not in a subprocess (no second torch import); the root logger's handlers are put back.
    Returns main's exit code."""
    import train
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return train.main([str(a) for a in argv])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def read_summary(run_dir):
    with open(Path(run_dir) / 'summary.csv') as f:
        return list(csv.DictReader(f))


@functools.lru_cache(maxsize=None)
def _distiller_parser():
    from distillers import add_distiller_args
    parser = argparse.ArgumentParser()
    add_distiller_args(parser)  # every class's flags on one parser: no two declare the same flag
    # the flags of train.py that a distiller reads besides its own
    parser.add_argument('--gt-loss-weight', type=float, default=None)
    parser.add_argument('--kd-loss-weight', type=float, default=None)
    parser.add_argument('--teacher-train-mode', action='store_true')
    return parser


def distiller_args(*argv, **overrides):
    """The namespace a distiller is built from in unit tests: every distiller's flags from `argv` (command-line
    words) or at their defaults, the loss weights left to the method (None) unless given, the teacher in eval mode
    unless --teacher-train-mode; `overrides` set further attributes."""
    args = _distiller_parser().parse_args([str(a) for a in argv])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args
