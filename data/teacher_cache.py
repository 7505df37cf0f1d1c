"""The teacher knowledge cache: the teacher's top-K classes and probabilities for every (epoch, sample) of a run's
data stream, written once by cache_teacher.py and read by `train.py --teacher-cache DIR` (docs/cache.md).

Layout of DIR:
- `manifest.json`: what the cache was written for (teacher, dataset, data seed, every flag that shapes a training
  batch, epochs, K, dtype) and each shard's size and sha256;
- `shard-<r>-of-<W>.bin`, one per writing process r of W: fixed-size records (K class indices, then K
  probabilities), epoch-major. Record `e * per_rank + q` of shard r is the sample at global position
  p = r + W * q of epoch e (EpochSampler deals position p to rank p mod W), so a reader with any number of
  processes finds position p in shard p mod W, record e * per_rank + p // W. The shards are read through memory
  maps: a batch's records are one fancy index per shard, no file read on the step's path beyond the page cache.

The data stream is a function of (data seed, epoch, position) alone (data/loader.py, data/mixup.py), which is what
lets one cache serve any student, any logit method, any initialization seed and any number of processes with the
same global batch.
"""
import hashlib
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .errors import DatasetError
from .loader import dataset_targets

MANIFEST = 'manifest.json'
CACHE_FORMAT = 'ufd-kd teacher cache'
CACHE_VERSION = 1
DTYPES = {'float16': np.float16, 'float32': np.float32}
# the flags whose values decide the image a sample becomes at an epoch (with the resolved input size, mean, std)
BATCH_FLAGS = ('no_aug', 'scale', 'ratio', 'hflip', 'vflip', 'color_jitter', 'aa', 'reprob', 'remode', 'recount',
               'train_interpolation', 'aug_repeats', 'mixup', 'cutmix', 'cutmix_minmax', 'mixup_prob',
               'mixup_switch_prob', 'mixup_mode', 'mixup_off_epoch')


class TeacherCacheError(DatasetError):
    """A teacher cache that cannot serve this run; the message names what differs or is broken."""


def shard_name(rank: int, world_size: int) -> str:
    return f'shard-{rank:03d}-of-{world_size:03d}.bin'


def record_dtype(topk: int, num_classes: int, dtype: str) -> np.dtype:
    index = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    return np.dtype([('classes', index, (topk,)), ('probs', DTYPES[dtype], (topk,))])


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()


def dataset_identity(args, dataset, num_classes: int) -> dict:
    """Name, split, size, classes and a fingerprint of the training set: the synthetic generator's parameters, or
    the sha256 of its file list (image folders) or of its labels in order (torchvision's CIFAR)."""
    name = (args.dataset or '').lower()
    if name == 'synthetic':
        payload = {k: getattr(args, k, None) for k in ('synthetic_classes', 'synthetic_train_size', 'synthetic_seed',
                                                        'synthetic_superclasses', 'synthetic_train_fraction')}
        payload['img_size'] = int(args.input_size[-1])
    else:
        reader = getattr(dataset, 'reader', None)
        samples = getattr(reader, 'samples', None)
        if samples:
            root = str(getattr(reader, 'root', ''))
            payload = [[os.path.relpath(str(s[0]), root), int(s[1])] for s in samples]
        else:
            payload = dataset_targets(dataset)
    fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return {'name': name or 'imagefolder', 'split': args.train_split if name != 'synthetic' else 'train',
            'samples': len(dataset), 'classes': int(num_classes), 'fingerprint': fingerprint}


def stream_identity(args, data_config: dict, global_batch: int, data_seed: int) -> dict:
    """Every value that shapes a training batch, as the manifest stores it (JSON types)."""
    values = {'data_seed': int(data_seed), 'global_batch': int(global_batch),
              'input_size': [int(v) for v in data_config['input_size']],
              'mean': [float(v) for v in data_config['mean']], 'std': [float(v) for v in data_config['std']]}
    for flag in BATCH_FLAGS:
        value = getattr(args, flag)
        values[flag] = list(value) if isinstance(value, tuple) else value
    return json.loads(json.dumps(values))


def _flag(key: str) -> str:
    return {'global_batch': 'global batch (--batch-size x processes)', 'input_size': 'input size',
            'mean': 'mean', 'std': 'std'}.get(key, '--' + key.replace('_', '-'))


class TeacherCache:
    """A cache folder opened for reading: its manifest, checked shards and their memory maps."""

    def __init__(self, folder: str, manifest: dict, shards: Sequence[np.memmap]):
        self.folder = folder
        self.manifest = manifest
        self.shards = list(shards)
        self.topk = int(manifest['topk'])
        self.num_classes = int(manifest['dataset']['classes'])
        self.writers = int(manifest['processes'])
        self.per_rank = int(manifest['records_per_epoch']) // self.writers

    @classmethod
    def open(cls, folder: str, verify: bool = True) -> 'TeacherCache':
        manifest = read_manifest(folder)
        dtype = record_dtype(int(manifest['topk']), int(manifest['dataset']['classes']), manifest['dtype'])
        shards = []
        for shard in manifest['shards']:
            path = os.path.join(folder, shard['file'])
            if not os.path.isfile(path):
                raise TeacherCacheError(f'teacher cache {folder!r} misses its shard {shard["file"]}; write the cache '
                                        f'again with cache_teacher.py --overwrite')
            size = os.path.getsize(path)
            if size != shard['records'] * dtype.itemsize:
                raise TeacherCacheError(f'shard {shard["file"]} of teacher cache {folder!r} holds {size} bytes, not '
                                        f'the {shard["records"] * dtype.itemsize} of its manifest (truncated); write '
                                        f'the cache again with cache_teacher.py --overwrite')
            if verify and sha256_file(path) != shard['sha256']:
                raise TeacherCacheError(f'shard {shard["file"]} of teacher cache {folder!r} fails its sha256 check '
                                        f'(corrupted); write the cache again with cache_teacher.py --overwrite')
            shards.append(np.memmap(path, dtype=dtype, mode='r'))
        return cls(folder, manifest, shards)

    def check_run(self, stream: dict, dataset: dict, epochs: int, teacher_name: str = '',
                  teacher_sha256: str = ''):
        """Raise TeacherCacheError unless this cache holds the data stream of the run described."""
        where = f'teacher cache {self.folder!r}'
        mine = self.manifest['dataset']
        if mine['fingerprint'] != dataset['fingerprint'] or mine['samples'] != dataset['samples'] \
                or mine['classes'] != dataset['classes']:
            same_size = mine['samples'] == dataset['samples'] and mine['classes'] == dataset['classes']
            raise TeacherCacheError(
                f'{where} was written for the dataset {mine["name"]} ({mine["split"]}, {mine["samples"]} samples, '
                f'{mine["classes"]} classes), not this run\'s {dataset["name"]} ({dataset["split"]}, '
                f'{dataset["samples"]} samples, {dataset["classes"]} classes'
                f'{", other images, labels or generator parameters" if same_size else ""}); pass the cache\'s '
                f'dataset or write a cache for this one')
        cached = self.manifest['stream']
        differ = [f'{_flag(k)} {cached.get(k)!r} in the cache, {v!r} here' for k, v in stream.items()
                  if cached.get(k) != v]
        if differ:
            raise TeacherCacheError(f'{where} was written for another data stream: {"; ".join(differ)}; give the '
                                    f'cache\'s values or write a cache for these')
        if epochs > int(self.manifest['epochs']):
            raise TeacherCacheError(f'this run trains {epochs} epochs, but {where} holds {self.manifest["epochs"]}; '
                                    f'lower --epochs or write a cache of {epochs} epochs')
        teacher = self.manifest['teacher']
        if teacher_name and teacher_name != teacher['name']:
            raise TeacherCacheError(f'--teacher {teacher_name} differs from the teacher {teacher["name"]} of {where}; '
                                    f'drop --teacher or use a cache of this teacher')
        if teacher_sha256 and teacher_sha256 != teacher['sha256']:
            raise TeacherCacheError(f'--teacher-checkpoint (sha256 {teacher_sha256[:16]}) is not the checkpoint '
                                    f'{teacher["checkpoint"]!r} (sha256 {teacher["sha256"][:16]}) of {where}; drop '
                                    f'--teacher-checkpoint or use a cache of this checkpoint')

    def records(self, epoch: int, positions: torch.Tensor):
        """(classes (B, K) int64, probabilities (B, K) float32) of the samples at these global positions."""
        positions = positions.numpy() if isinstance(positions, torch.Tensor) else np.asarray(positions)
        shard, row = positions % self.writers, epoch * self.per_rank + positions // self.writers
        if self.writers == 1:
            rec = self.shards[0][row]
        else:
            rec = np.empty(len(positions), dtype=self.shards[0].dtype)
            for s in np.unique(shard):
                rec[shard == s] = self.shards[s][row[shard == s]]
        return (torch.from_numpy(rec['classes'].astype(np.int64)),
                torch.from_numpy(rec['probs'].astype(np.float32)))


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise TeacherCacheError(f'teacher cache {folder!r} does not exist; write one with cache_teacher.py '
                                f'--cache-dir {folder}')
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get('format') != CACHE_FORMAT:
        raise TeacherCacheError(f'{folder!r} is not a teacher cache (no readable {MANIFEST} written by '
                                f'cache_teacher.py); pass the --cache-dir of a cache_teacher.py run')
    if manifest.get('version') != CACHE_VERSION:
        raise TeacherCacheError(f'teacher cache {folder!r} has format version {manifest.get("version")}, this code '
                                f'reads version {CACHE_VERSION}; write the cache again with cache_teacher.py')
    return manifest


def topk_to_log_probs(classes: torch.Tensor, probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) float32 log-probabilities of the distribution rebuilt from its top-K: the K stored probabilities, and
    what they leave of 1 spread evenly over the other C - K classes (TinyViT's and FKD's rule). A probability
    that rounds to 0 is taken as float32's smallest normal number, so that p log p stays 0 rather than NaN."""
    probs = probs.float()
    tiny = torch.finfo(torch.float32).tiny
    rest = num_classes - classes.shape[1]
    fill = (1.0 - probs.sum(dim=1, keepdim=True)).clamp_min(0.0) / max(rest, 1)
    # the logarithm of B + B*K values, not of B*C: the tail is one value per row
    full = fill.clamp_min(tiny).log().expand(-1, num_classes).clone()
    return full.scatter_(1, classes.long(), probs.clamp_min(tiny).log())


class CachedTeacher(nn.Module):
    """Stands where the teacher does for a distiller that reads only the teacher's logits (`teacher_logits_only`).
    train.py loads each batch's records (`load_batch`) before the step; the forward then returns the rebuilt
    log-probabilities as the logits. Log-probabilities differ from the teacher's logits by a constant per sample,
    which softmax at any temperature and the z-score of logit standardization remove: with K = the number of
    classes, every logit method sees exactly the live teacher's distribution. With K < C each sees the rebuilt
    distribution, softmax(log p_hat / T) = p_hat^(1/T) normalized, at its temperature T."""

    def __init__(self, cache: TeacherCache):
        super().__init__()
        self.cache = cache
        self.batch = None

    def load_batch(self, epoch: int, positions: torch.Tensor, device: torch.device):
        classes, probs = self.cache.records(epoch, positions)
        self.batch = topk_to_log_probs(classes.to(device, non_blocking=True), probs.to(device, non_blocking=True),
                                       self.cache.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None or self.batch.shape[0] != x.shape[0]:
            rows = None if self.batch is None else self.batch.shape[0]
            raise RuntimeError(f'the cached teacher holds {rows} records for a batch of {x.shape[0]} images')
        return self.batch


class CacheWriter:
    """The shard of one writing process: records written epoch by epoch into a memory map, then checksummed."""

    def __init__(self, folder: str, rank: int, world_size: int, epochs: int, per_rank: int, topk: int,
                 num_classes: int, dtype: str):
        self.name = shard_name(rank, world_size)
        self.path = os.path.join(folder, self.name)
        self.partial = self.path + '.partial'
        self.per_rank = per_rank
        self.records = epochs * per_rank
        self.topk = topk
        self.map = np.memmap(self.partial, dtype=record_dtype(topk, num_classes, dtype), mode='w+',
                             shape=(self.records,))

    def write(self, epoch: int, first: int, logits: torch.Tensor):
        """The records of `logits` (B, C), the rank's samples first .. first + B - 1 of the epoch."""
        probs, classes = logits.float().softmax(dim=1).topk(self.topk, dim=1)
        start = epoch * self.per_rank + first
        rows = self.map[start:start + logits.shape[0]]
        rows['classes'] = classes.cpu().numpy()
        rows['probs'] = probs.cpu().numpy()

    def close(self) -> Dict[str, object]:
        self.map.flush()
        del self.map
        os.replace(self.partial, self.path)
        return {'file': self.name, 'records': self.records, 'bytes': os.path.getsize(self.path),
                'sha256': sha256_file(self.path)}


def write_manifest(folder: str, manifest: dict):
    tmp = os.path.join(folder, f'.{MANIFEST}.tmp')
    with open(tmp, 'w') as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def cache_files(folder: str):
    """The files of a cache in `folder` (manifest, shards, partial shards)."""
    return [n for n in os.listdir(folder) if n == MANIFEST or (n.startswith('shard-') and '.bin' in n)
            or n == f'.{MANIFEST}.tmp']


def remove_cache(folder: str):
    for name in cache_files(folder):
        os.remove(os.path.join(folder, name))


def same_cache(manifest: dict, other: dict, ignore=('shards', 'created')) -> Optional[str]:
    """The first key at which two manifests differ, or None."""
    for key in list(other) + [k for k in manifest if k not in other]:
        if key not in ignore and manifest.get(key) != other.get(key):
            return key
    return None
