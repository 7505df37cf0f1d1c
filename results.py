#!/usr/bin/env python3
""" UFD-KD small-scale results: what each distiller gains over the student trained alone, with a confidence interval.

Paired design. For every seed, the student alone (vanilla) and the student with each method are train.py runs
that differ only in --distiller (and the teacher): train.py builds the student first under --seed, and its data
order and augmentation are a function of --seed alone, so both start from the same weights and see the same
batches. A method's gain on a seed is its top-1 minus vanilla's on that seed; the table gives, per method and
pair, the mean top-1, the mean gain and its 95% t-interval over the seeds.

Each pair's teacher is trained once (configs/demo/teacher.yaml, seed 0), every student with the same recipe
(configs/demo/vanilla.yaml), with the overrides below (SETTING, TRAIN_RECIPE, STUDENT_DATA). A method runs on
every pair whose models its constructor accepts (it raises DistillerError otherwise), a method without a
teacher once per student. Runs are train.py subprocesses; what happened is read from their exit codes and
summary.csv, never from their logs. A finished run is reused when the command is given again, keyed by its
whole resolved configuration (and its teacher's), so a table can be extended by one method without retraining
the rest. Outputs in --output: results.md (the table and every run's per-epoch top-1), results.csv/json (one
row per method and pair), runs.csv (one row per run), gains.png (gains with their intervals, a panel per pair).

`kd@cache` is kd trained from a teacher cache (docs/cache.md) with its defaults (top-10, or every class where there
are fewer; float16): for each pair and seed, cache_teacher.py writes the teacher's outputs on that seed's data stream
once (train.py's data seed defaults to --seed, so the cache serves exactly the run it is paired with), and
`train.py --teacher-cache` trains kd from it. Its row `kd@cache vs kd` is its paired difference to kd from the live
teacher.

    python results.py                                  # the full table: 5 seeds, every method, every pair
    python results.py --quick                          # 2 seeds, 4 student epochs: a smoke check
    python results.py --methods kd ufd --pairs cnn     # a part of it (finished runs are reused)
    python results.py --methods kd kd@cache --pairs cnn   # kd from the live teacher and from a teacher cache
    python results.py --dataset torch/cifar100 --data-dir data/cifar --device cuda
"""
import csv
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import train
from benchmark import fmt_num, machine_description, markdown_table, write_rows
from cli import ArgumentParser, UsageError, number
from data import CIFAR_CLASSES
from distillers import DISTILLERS
from distillers.base import DistillerError
from models.factory import ModelError, create_model_at_size

REPO = Path(__file__).resolve().parent
DEMO_DIR = REPO / 'configs' / 'demo'

# Pairs: name -> (teacher, student), each 'timm_name' or 'timm_name,key=value,...' (model kwargs). At 32 px every
# last-stage map is 8x8: the CIFAR ResNets (models/cifar.py) downsample by 4, a ViT with 4-pixel patches has an
# 8x8 token grid.
PAIRS = OrderedDict(
    cnn=('resnet56', 'resnet20'),
    hetero=('test_vit,patch_size=4', 'resnet20'),
    vit=('test_vit,patch_size=4', 'test_vit,patch_size=4,embed_dim=32,depth=4'),
)
# the data of the table on the synthetic set: 20 classes in 4 superclasses of 5 related classes
SETTING = ['--synthetic-classes', '20', '--synthetic-superclasses', '4',
           '--synthetic-train-size', '2000', '--synthetic-val-size', '1000']
# for teachers and students alike: warm-up per step (not a first epoch at the warm-up lr) and an evaluation after
# every epoch, so that the per-epoch top-1 shows each run leave chance
TRAIN_RECIPE = ['--sched-on-updates', '--eval-interval', '1']
# students learn from half of the images their teacher saw (a deterministic, class-balanced half)
STUDENT_DATA = ['--synthetic-train-fraction', '0.5']
SEEDS, QUICK_SEEDS, QUICK_EPOCHS, TEACHER_EPOCHS = 5, 2, 4, 12
CACHED_KD, CACHE_TOPK = 'kd@cache', 10  # kd from a teacher cache (cache_teacher.py's default K) per pair and seed
# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def build_parser():
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-c', '--config', default='', metavar='FILE',
                        help='YAML file whose keys (flag dest names) set the defaults of these flags')
    parser.add_argument('--quick', action='store_true', default=False,
                        help=f'{QUICK_SEEDS} seeds and {QUICK_EPOCHS} student epochs: a smoke check, not evidence')
    parser.add_argument('--methods', nargs='+', default=None, metavar='NAME',
                        help=f'distillers to run, and {CACHED_KD} (kd from a teacher cache) (default: every one '
                             f'but vanilla, which always runs)')
    parser.add_argument('--pairs', nargs='+', default=None, metavar='NAME',
                        help=f'pairs to run (default: all of {", ".join(PAIRS)}, and any --pair)')
    parser.add_argument('--pair', nargs=3, action='append', default=None, metavar=('NAME', 'TEACHER', 'STUDENT'),
                        help='add or replace a pair; a model is "name" or "name,key=value,..." (model kwargs)')
    parser.add_argument('--seeds', type=number(int, 1), default=None, metavar='N',
                        help=f'seeds 0..N-1 (default: {SEEDS}, --quick {QUICK_SEEDS}); a CI needs at least 2')
    parser.add_argument('--epochs', type=number(int, 1), default=None, metavar='N',
                        help=f'student epochs (default: the config\'s, --quick {QUICK_EPOCHS})')
    parser.add_argument('--teacher-epochs', type=number(int, 1), default=TEACHER_EPOCHS, metavar='N',
                        help=f'teacher epochs (default: {TEACHER_EPOCHS})')
    parser.add_argument('--jobs', type=number(int, 1), default=None, metavar='N',
                        help='train.py processes at once, each with cpus/jobs threads (default: min(2, cpus))')
    parser.add_argument('--device', default='cpu', metavar='DEV', help='device of every run (default: cpu)')
    parser.add_argument('--dataset', default='', metavar='NAME',
                        help='dataset of every run, as train.py (default: synthetic, with the table\'s setting; an '
                             'ImageFolder with --data-dir)')
    parser.add_argument('--data-dir', '--data', default='', metavar='DIR', help='dataset root, as train.py')
    parser.add_argument('--img-size', type=number(int, 8), default=None, metavar='N',
                        help='input size (default: 32, where every pair\'s last maps are 8x8)')
    parser.add_argument('-b', '--batch-size', type=number(int, 1), default=None, metavar='N',
                        help='batch size (default: the config\'s)')
    parser.add_argument('--output', default='', metavar='DIR', help='run folders (default: output/results)')
    parser.add_argument('--train-args', default='', metavar='"ARGS"',
                        help='extra train.py arguments for every run, e.g. "--synthetic-train-size 256"')
    parser.add_argument('--rerun', action='store_true', default=False,
                        help='train again even where a finished run of the same configuration exists')
    parser.add_argument('--results-file', default='', metavar='FILE',
                        help='write the rows to this csv or json file (default: results.csv and results.json '
                             'in --output)')
    parser.add_argument('--results-format', default='', choices=['', 'csv', 'json'],
                        help='format of --results-file (default: from its extension, else csv)')
    return parser


def parse_args(argv):
    """CLI > YAML (-c) > built-in default, as train.py."""
    parser = build_parser()
    config, _ = parser.parse_known_args(argv)
    if config.config:
        parser.set_defaults(**train.load_config_defaults(config.config, parser))
    args = parser.parse_args(argv)
    try:
        args.train_args = shlex.split(args.train_args) if isinstance(args.train_args, str) else args.train_args
    except ValueError as e:
        raise UsageError(f'--train-args {args.train_args!r} cannot be split into arguments ({e})') from None
    if not args.dataset and not args.data_dir:
        args.dataset = 'synthetic'
    args.command_line = ' '.join(['python results.py'] + [shlex.quote(a) for a in argv])
    return args


# ==================================================================================================== statistics
def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (a table to 30, Cornish-Fisher beyond)."""
    if df < 1:
        raise ValueError(f'a t quantile needs at least 1 degree of freedom, got {df}')
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_gain(method_top1, vanilla_top1):
    """(mean gain, 95% CI low, CI high) of paired per-seed top-1s; the interval is None below two pairs."""
    gains = [m - v for m, v in zip(method_top1, vanilla_top1)]
    if not gains:
        return None, None, None
    mean = statistics.mean(gains)
    if len(gains) < 2:
        return mean, None, None
    half = t_quantile_975(len(gains) - 1) * statistics.stdev(gains) / math.sqrt(len(gains))
    return mean, mean - half, mean + half


# ==================================================================================================== runs
class TrainRun:
    """One train.py subprocess. Its key is the fingerprint of its resolved configuration; a finished run with the
    same key (exit 0, results_run.json written, every epoch in summary.csv) is reused."""

    def __init__(self, label, folder, argv, epochs, seed, depends_on=None):
        self.label, self.argv, self.epochs, self.seed, self.depends_on = label, argv, epochs, seed, depends_on
        resolved = vars(train.parse_args(argv)[0]).copy()
        for key in ('output', 'experiment', 'overwrite', 'config', 'teacher_checkpoint', 'resume'):
            resolved.pop(key, None)
        if depends_on is not None:
            resolved['teacher_run'] = depends_on.fingerprint
        self.fingerprint = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.run_dir = Path(folder) / f'{self.label.replace(" ", "_")}_{self.fingerprint}'
        self.status, self.exit_code, self.top1, self.epoch_top1 = 'pending', None, None, []
        self.wall_s, self.cpu_s = None, None

    def command(self):
        return [sys.executable, str(REPO / 'train.py'), *self.argv, '--output', str(self.run_dir.parent),
                '--experiment', self.run_dir.name, '--overwrite']

    def _read_summary(self):
        path = self.run_dir / 'summary.csv'
        if not path.exists():
            return []
        with open(path) as f:
            return [float(r['eval_top1']) for r in csv.DictReader(f) if r.get('eval_top1')]

    def finished(self):
        marker = self.run_dir / 'results_run.json'
        if not marker.exists():
            return False
        with open(marker) as f:
            info = json.load(f)
        epoch_top1 = self._read_summary()
        if info.get('fingerprint') != self.fingerprint or info.get('exit_code') != 0 or len(epoch_top1) != self.epochs:
            return False
        self.status, self.exit_code, self.epoch_top1 = 'ok', 0, epoch_top1
        self.top1 = epoch_top1[-1] if epoch_top1 else None
        self.wall_s, self.cpu_s = info.get('wall_s'), info.get('cpu_s')
        return True

    def run(self, threads, rerun=False):
        if not rerun and self.finished():
            self.status = 'ok (reused)'
            return self
        if self.depends_on is not None and not self.depends_on.status.startswith('ok'):
            self.status = f'skipped: its teacher {self.depends_on.status}'
            return self
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / 'results_run.json').unlink(missing_ok=True)
        log_path = self.run_dir.parent / f'{self.run_dir.name}.log'
        start = time.time()
        with open(log_path, 'w') as log:
            proc = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            # wait4: the child's own CPU time, which the other runs sharing the machine do not inflate
            _, wait_status, usage = os.wait4(proc.pid, 0)
        self.exit_code = os.waitstatus_to_exitcode(wait_status)
        self.wall_s, self.cpu_s = round(time.time() - start, 1), round(usage.ru_utime + usage.ru_stime, 1)
        self.epoch_top1 = self._read_summary() if self.exit_code == 0 else []
        if self.exit_code != 0:
            kind = 'refused its settings' if self.exit_code == 2 else 'failed'
            self.status = f'{kind} (exit {self.exit_code}; see {log_path})'
        elif len(self.epoch_top1) != self.epochs:
            self.status = f'failed: summary.csv has {len(self.epoch_top1)} of {self.epochs} epochs'
        else:
            self.status, self.top1 = 'ok', self.epoch_top1[-1] if self.epoch_top1 else None
            with open(self.run_dir / 'results_run.json', 'w') as f:
                json.dump({'argv': self.argv, 'fingerprint': self.fingerprint, 'exit_code': 0,
                           'wall_s': self.wall_s, 'cpu_s': self.cpu_s}, f)
        return self


class CacheRun(TrainRun):
    """One cache_teacher.py subprocess writing the teacher cache of a student run's data stream (the run's own
    train.py arguments) into its folder; it evaluates no epochs (`epochs` 0), and is reused as a TrainRun is."""

    def command(self):
        topk = min(CACHE_TOPK, run_classes(train.parse_args(self.argv)[0]))  # every class where there are fewer
        return [sys.executable, str(REPO / 'cache_teacher.py'), *self.argv, '--cache-dir', str(self.run_dir),
                '--cache-topk', str(topk), '--overwrite']

    def finished(self):
        return (self.run_dir / 'manifest.json').exists() and super().finished()


def parse_model(text):
    """'name,key=value,...' -> (name, [key=value, ...])."""
    name, *kwargs = text.split(',')
    return name, kwargs


def model_argv(spec, flag_model, flag_kwargs):
    name, kwargs = parse_model(spec)
    return [flag_model, name] + ([flag_kwargs, *kwargs] if kwargs else [])


def slug(spec):
    return spec.replace(',', '_').replace('=', '')


def run_classes(args):
    """The number of classes of a run's dataset, from its train.py arguments (10 for an ImageFolder)."""
    dataset = (args.dataset or '').lower()
    return args.num_classes or (args.synthetic_classes if dataset == 'synthetic' else CIFAR_CLASSES.get(dataset, 10))


def admission(method, teacher_spec, student_spec, argv):
    """None when `method`'s constructor accepts the pair (random weights, the run's input size), else why not."""
    args = train.parse_args([*argv, '--distiller', method, *model_argv(student_spec, '--model', '--model-kwargs')]
                            + (model_argv(teacher_spec, '--teacher', '--teacher-kwargs') if teacher_spec else []))[0]
    input_size = tuple(train.student_data_config(args)['input_size'])
    classes = run_classes(args)
    try:
        student = create_model_at_size(args.model, input_size, num_classes=classes,
                                       **train.parse_kwargs(args.model_kwargs, '--model-kwargs'))
        teacher = None if not teacher_spec else create_model_at_size(
            args.teacher, input_size, num_classes=classes,
            **train.parse_kwargs(args.teacher_kwargs, '--teacher-kwargs'))
    except (ModelError, TypeError) as e:
        raise UsageError(f'the pair {teacher_spec or "-"} -> {student_spec} cannot be built ({e}); give timm model '
                         f'names, as "name" or "name,key=value,..."') from None
    try:
        DISTILLERS[method](student, teacher, train.create_train_loss(args, False), args, input_size)
    except DistillerError as e:
        return str(e)
    return None


# ==================================================================================================== the table
def plan(args):
    pairs = OrderedDict(PAIRS)
    for name, teacher, student in args.pair or []:
        pairs[name] = (teacher, student)
    selected = args.pairs or list(pairs)
    unknown = [p for p in selected if p not in pairs]
    if unknown:
        raise UsageError(f'unknown pair {unknown[0]!r}; choose from {", ".join(pairs)} or add one with --pair')
    methods = [m for m in (args.methods or [*DISTILLERS, CACHED_KD]) if m != 'vanilla']
    unknown = [m for m in methods if m not in DISTILLERS and m != CACHED_KD]
    if unknown:
        raise UsageError(f'unknown method {unknown[0]!r}; choose from {", ".join(DISTILLERS)} or {CACHED_KD}')
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else
                             int(train.load_config_defaults(str(DEMO_DIR / 'vanilla.yaml'), train.parser)['epochs']))
    return OrderedDict((p, pairs[p]) for p in selected), methods, seeds, epochs


def common_argv(args):
    """train.py arguments shared by teachers and students: the data, the device, the recipe's overrides."""
    argv = ['--dataset', args.dataset]
    if args.data_dir:
        argv += ['--data-dir', args.data_dir]
    if args.dataset.lower() == 'synthetic':
        argv += SETTING
    argv += ['--img-size', str(args.img_size or 32), '--device', args.device, *TRAIN_RECIPE]
    if args.batch_size:
        argv += ['--batch-size', str(args.batch_size)]
    return argv + list(args.train_args)


def run_table(args):
    pairs, methods, seeds, epochs = plan(args)
    output = Path(args.output or REPO / 'output' / 'results')
    output.mkdir(parents=True, exist_ok=True)
    common = common_argv(args)
    student_common = common + (STUDENT_DATA if args.dataset.lower() == 'synthetic' else [])
    student_common = ['-c', str(DEMO_DIR / 'vanilla.yaml'), *student_common, '--epochs', str(epochs)]
    cpus = os.cpu_count() or 1
    jobs = args.jobs or max(1, min(2, cpus))
    threads = max(1, cpus // jobs)
    started = time.time()

    teachers = OrderedDict()
    for teacher, _ in pairs.values():
        if teacher not in teachers:
            argv = ['-c', str(DEMO_DIR / 'teacher.yaml'), *common, *model_argv(teacher, '--model', '--model-kwargs'),
                    '--epochs', str(args.teacher_epochs), '--seed', '0']
            teachers[teacher] = TrainRun(f'teacher {slug(teacher)}', output / 'teachers', argv, args.teacher_epochs,
                                         seed=0)

    caches = []

    def student_run(method, student, seed, pair_name=None):
        cached = method == CACHED_KD
        argv = [*student_common, *model_argv(student, '--model', '--model-kwargs'),
                '--distiller', 'kd' if cached else method, '--seed', str(seed)]
        teacher_run = None
        if pair_name is not None:
            teacher = pairs[pair_name][0]
            teacher_run = teachers[teacher]
            argv += [*model_argv(teacher, '--teacher', '--teacher-kwargs'),
                     '--teacher-checkpoint', str(teacher_run.run_dir / 'checkpoint' / 'last.pth.tar')]
        folder = output / (pair_name or f'alone_{slug(student)}')
        if cached:  # the cache of this run's data stream (its data seed is --seed), written once by the teacher
            teacher_run = CacheRun(f'cache s{seed}', output / 'caches' / pair_name, argv, 0, seed,
                                   depends_on=teacher_run)
            caches.append((('cache', pair_name, student), teacher_run))
            argv = argv + ['--teacher-cache', str(teacher_run.run_dir)]
        return TrainRun(f'{method} s{seed}', folder, argv, epochs, seed, depends_on=teacher_run)

    # which method runs where: its constructor decides, on random weights at the run's input size
    groups = OrderedDict()  # (method, pair name or None, student) -> runs over seeds
    refused = []  # (method, pair name, why)
    students = list(OrderedDict((s, None) for _, s in pairs.values()))
    for student in students:
        groups[('vanilla', None, student)] = [student_run('vanilla', student, s) for s in range(seeds)]
    for method in methods:
        if method != CACHED_KD and not DISTILLERS[method].needs_teacher:
            for student in students:
                why = admission(method, None, student, student_common)
                if why:
                    refused.append((method, f'alone -> {student}', why))
                else:
                    groups[(method, None, student)] = [student_run(method, student, s) for s in range(seeds)]
            continue
        for name, (teacher, student) in pairs.items():
            why = admission('kd' if method == CACHED_KD else method, teacher, student, student_common)
            if why:
                refused.append((method, name, why))
            else:
                groups[(method, name, student)] = [student_run(method, student, s, name) for s in range(seeds)]

    student_runs = [r for runs in groups.values() for r in runs]
    print(f'Results: pairs {", ".join(f"{k} ({t} -> {s})" for k, (t, s) in pairs.items())}; '
          f'{len(groups) - len(students)} method-pair groups, {len(refused)} refused by their method; {seeds} '
          f'seed(s), {epochs} student epochs; {len(teachers) + len(caches) + len(student_runs)} runs, {jobs} at once '
          f'x {threads} thread(s)', flush=True)

    def execute(runs):
        run_threads = max(threads, cpus // max(1, min(jobs, len(runs))))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for run in pool.map(lambda r: r.run(run_threads, args.rerun), runs):
                curve = ' '.join(f'{t:.1f}' for t in run.epoch_top1)
                print(f'  {run.run_dir.parent.name + "/" + run.label:<36s} {run.status:<14s} top-1 per epoch: '
                      f'{curve}', flush=True)

    execute(list(teachers.values()))
    execute([run for _, run in caches])
    execute(student_runs)

    rows = table_rows(pairs, teachers, groups, refused)
    run_rows = [run_row(run, key) for key, runs in groups.items() for run in runs]
    run_rows = [run_row(run, ('teacher', None, spec)) for spec, run in teachers.items()] + run_rows
    run_rows += [run_row(run, key) for key, run in caches]
    total = time.time() - started
    text = results_markdown(rows, run_rows, args, pairs, seeds, epochs, jobs, threads, total)
    print('\n' + text)
    with open(output / 'results.md', 'w') as f:
        f.write(text + '\n')
    write_rows(rows, args.results_file or output / 'results.csv', args.results_format)
    if not args.results_file:
        write_rows(rows, output / 'results.json', 'json')
    write_rows(run_rows, output / 'runs.csv')
    plot_gains(rows, output / 'gains.png')
    print(f'\nTable, runs and picture: {output}/results.md, results.csv, runs.csv, gains.png')
    return rows


def run_row(run, key):
    method, pair, student = key
    return OrderedDict(method=method, pair=pair or '', model=student, seed=run.seed,
                       status=run.status, exit_code=run.exit_code, top1=run.top1,
                       top1_per_epoch=' '.join(f'{t:g}' for t in run.epoch_top1), wall_s=run.wall_s,
                       cpu_s=run.cpu_s, run_dir=str(run.run_dir))


def _round(value):
    return None if value is None else round(value, 2) + 0.0  # + 0.0: no '-0.0'


def table_rows(pairs, teachers, groups, refused):
    """One row per teacher, per student alone, and per (method, pair) with its paired gain over vanilla."""
    rows = []
    for spec, run in teachers.items():
        rows.append(OrderedDict(method='teacher', pair=', '.join(k for k, (t, _) in pairs.items() if t == spec),
                                teacher=spec, student='', seeds=int(run.top1 is not None), top1_mean=run.top1,
                                gain_mean=None, gain_ci_low=None, gain_ci_high=None, ci_half_width=None,
                                status=run.status))
    def gain_row(method, pair, student, runs, base_runs, note=''):
        base = {r.seed: r.top1 for r in base_runs}
        paired = [(r.top1, base.get(r.seed)) for r in runs if r.top1 is not None and base.get(r.seed) is not None]
        ok = [r.top1 for r in runs if r.top1 is not None]
        mean, low, high = paired_gain(*zip(*paired)) if paired and method != 'vanilla' else (None, None, None)
        bad = [r.status for r in runs if not r.status.startswith('ok')]
        return OrderedDict(
            method=method, pair=pair or f'alone -> {student}', teacher=pairs[pair][0] if pair else '',
            student=student, seeds=len(paired) if method != 'vanilla' else len(ok),
            top1_mean=_round(statistics.mean(ok)) if ok else None, gain_mean=_round(mean),
            gain_ci_low=_round(low), gain_ci_high=_round(high),
            ci_half_width=_round((high - low) / 2) if low is not None else None,
            status=f'{len(bad)} of {len(runs)} runs not ok: {bad[0]}' if bad else note or 'ok')

    for (method, pair, student), runs in groups.items():
        rows.append(gain_row(method, pair, student, runs, groups[('vanilla', None, student)]))
        if method == CACHED_KD and ('kd', pair, student) in groups:
            # the cache against the live teacher, paired by seed: the same initialization and data stream
            rows.append(gain_row(f'{CACHED_KD} vs kd', pair, student, runs, groups[('kd', pair, student)],
                                 note='gain over kd from the live teacher, not over the student alone'))
    for method, pair, why in refused:
        rows.append(OrderedDict(method=method, pair=pair, teacher=pairs[pair][0] if pair in pairs else '',
                                student=pairs[pair][1] if pair in pairs else '', seeds=0, top1_mean=None,
                                gain_mean=None, gain_ci_low=None, gain_ci_high=None, ci_half_width=None,
                                status=f'not admitted: {why}'))
    return rows


def results_markdown(rows, run_rows, args, pairs, seeds, epochs, jobs, threads, total):
    header = ['method', 'pair', 'top-1 (mean)', 'gain over alone (mean)', '95% CI of the gain', 'seeds', 'note']
    body = []
    for r in rows:
        ci = f'[{r["gain_ci_low"]:+.2f}, {r["gain_ci_high"]:+.2f}]' if r['gain_ci_low'] is not None else '-'
        gain = f'{r["gain_mean"]:+.2f}' if r['gain_mean'] is not None else '-'
        body.append([r['method'], r['pair'], fmt_num(r['top1_mean']), gain, ci, r['seeds'],
                     '' if r['status'] == 'ok' else r['status']])
    cpu_total = sum(r['cpu_s'] for r in run_rows if r['cpu_s'] is not None)
    curves = markdown_table(['method', 'pair', 'model', 'seed', 'top-1 per epoch', 'status'],
                            [[r['method'], r['pair'], r['model'], r['seed'], r['top1_per_epoch'] or '-', r['status']]
                             for r in run_rows])
    pair_text = '; '.join(f'{k}: {t} -> {s}' for k, (t, s) in pairs.items())
    dataset = ' '.join(filter(None, [args.dataset or 'ImageFolder', args.data_dir]))
    lines = [markdown_table(header, body), '',
             f'Pairs {pair_text}. Dataset {dataset}; seeds 0-{seeds - 1}, paired (same initialization, data order '
             f'and augmentation for a student alone and distilled); students {epochs} epochs, teachers '
             f'{args.teacher_epochs}; top-1 at the last epoch. '
             f'{jobs} train.py process(es) at once x {threads} thread(s) on '
             f'{machine_description(torch.device("cpu"), threads=False)}, --device {args.device}.',
             f'Wall time {total / 60:.1f} min; the runs used {cpu_total / 60:.1f} CPU-minutes.',
             f'Command: {args.command_line}', '', '### Every run', '', curves]
    if any(r['method'] == CACHED_KD for r in rows):
        lines[3:3] = [f'{CACHED_KD}: kd trained from a teacher cache (cache_teacher.py, top-10 float16: docs/cache.md) '
                      f'written once per pair and seed on that seed\'s data stream; {CACHED_KD} vs kd: its paired '
                      f'difference to kd from the live teacher.']
    return '\n'.join(lines)


def plot_gains(rows, path):
    """Mean gains with their 95% CIs, one panel per pair (and per student alone)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = OrderedDict()
    for r in rows:
        if r['method'] not in ('teacher', 'vanilla') and r['gain_mean'] is not None:
            panels.setdefault(r['pair'], []).append(r)
    if not panels:
        return
    height = max(len(p) for p in panels.values()) * 0.35 + 1.2
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), height), squeeze=False)
    for ax, (pair, prow) in zip(axes[0], panels.items()):
        y = list(range(len(prow)))[::-1]
        gains = [r['gain_mean'] for r in prow]
        low = [r['gain_mean'] - r['gain_ci_low'] if r['gain_ci_low'] is not None else 0 for r in prow]
        high = [r['gain_ci_high'] - r['gain_mean'] if r['gain_ci_high'] is not None else 0 for r in prow]
        ax.errorbar(gains, y, xerr=[low, high], fmt='o', capsize=3, color='tab:blue')
        ax.axvline(0, color='gray', linewidth=1)
        ax.set_yticks(y)
        ax.set_yticklabels([r['method'] for r in prow])
        ax.set_title(f'{pair}: {prow[0]["teacher"] or "no teacher"} -> {prow[0]["student"]}', fontsize=8)
        ax.set_xlabel('top-1 gain over the student alone (points, 95% CI)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ==================================================================================================== main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        run_table(parse_args(argv))
    except UsageError as e:
        print(f'results.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
