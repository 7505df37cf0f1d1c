"""Data loaders whose order and augmentation are a pure function of (seed, epoch, position).

Why not timm's create_loader as is: exact resume (a run stopped mid-epoch and resumed ends bit-identical to
the uninterrupted run) needs the sample order and every random augmentation to be reproducible from the
step alone, whatever the number of workers. So:
- `EpochSampler` draws the permutation of epoch e from a generator seeded with (seed, e), splits it over
  the ranks, and can start at a batch offset (mid-epoch resume skips what was already seen, without loading
  it). It yields (index, sample_seed) pairs;
- `SeededTransformDataset` applies the transform under the RNG state of that sample_seed, saving and
  restoring the process's global RNG around it, so augmentation neither depends on nor disturbs the
  training RNG.
The transforms themselves are timm's (create_transform), so every timm augmentation flag works.

A distiller's declarations (distillers/base.py) add to the batch: the dataset index of each sample
(`with_index`), and a second, strong view of each image (`TwoViewTransform`, `build_strong_train_transform`).
"""
import random
import signal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

import timm
from timm.data import create_transform, resolve_data_config
from torchvision import transforms

from .errors import DatasetError
from .mlkd_augment import MLKDRandAugment


class EpochSampler(Sampler):
    """With `repeats` > 1 (repeated augmentation, DeiT's RASampler and timm's RepeatAugSampler): each index of the
    permutation stands `repeats` times in a row before the split over the ranks, so its copies land on different
    ranks; the epoch keeps its length (the first num_samples of the repeated order), and each copy has its own
    sample seed, hence its own augmentation."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1, repeats: int = 1):
        self.num_samples = num_samples
        self.repeats = max(int(repeats), 1)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch = epoch
        self.start_batch = start_batch

    def _rank_indices(self):
        return self._rank_order()[0]

    def _rank_order(self):
        """(dataset indices, their copy numbers under `repeats`) of this rank's epoch."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen)
        else:
            order = torch.arange(self.num_samples)
        copies = torch.zeros_like(order)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)[:self.num_samples]
            copies = (torch.arange(self.num_samples) % self.repeats)
        if self.world_size > 1:
            # every rank gets the same number of samples: drop the tail when training, keep all for eval
            per_rank = self.num_samples // self.world_size if self.drop_last else None
            order, copies = order[self.rank::self.world_size], copies[self.rank::self.world_size]
            if per_rank is not None:
                order, copies = order[:per_rank], copies[:per_rank]
        return order, copies

    def batches_per_epoch(self) -> int:
        n = len(self._rank_indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_positions(self, batch_idx: int) -> torch.Tensor:
        """(B,) int64: where the samples of this rank's batch `batch_idx` stand in the epoch's global order (rank r
        holds positions r, r + W, r + 2W, ...), so global batch i is positions [i*B*W, (i+1)*B*W) whatever W."""
        local = batch_idx * self.batch_size + torch.arange(self.batch_size)
        return self.rank + self.world_size * local

    def __len__(self):
        n = len(self._rank_indices())
        if self.drop_last:
            n = (n // self.batch_size) * self.batch_size
        return max(n - self.start_batch * self.batch_size, 0)

    def __iter__(self):
        order, copies = self._rank_order()
        end = (len(order) // self.batch_size) * self.batch_size if self.drop_last else len(order)
        start = self.start_batch * self.batch_size
        base = (self.seed * 1000003 + self.epoch) * 1000003
        for idx, copy in zip(order[start:end].tolist(), copies[start:end].tolist()):
            yield idx, (base + idx + copy * self.num_samples) % (2 ** 63 - 1)


class SeededTransformDataset(Dataset):
    """Wraps a dataset whose items are (image, target); applies `transform` under a per-sample seed.

    With `with_index` an item is (image, target, index), index being the sample's position in the wrapped
    dataset (a distiller that declares `needs_sample_indices` reads it)."""

    def __init__(self, dataset, transform, with_index: bool = False):
        self.dataset = dataset
        self.transform = transform
        self.with_index = with_index
        # the wrapped dataset must hand back untransformed images
        if hasattr(dataset, 'transform'):
            dataset.transform = None

    def __len__(self):
        return len(self.dataset)

    def _load(self, index):
        reader = getattr(self.dataset, 'reader', None)
        if reader is None or getattr(self.dataset, 'load_bytes', False):
            return self.dataset[index]
        # timm's ImageDataset skips an unreadable image with a warning; a corrupt file is an error here
        source, target = reader[index][:2]
        path = reader.filename(index, absolute=True) if hasattr(reader, 'filename') else str(source)
        try:
            img = Image.open(source)
            img = img.convert(getattr(self.dataset, 'input_img_mode', None) or 'RGB')
        except (OSError, ValueError) as e:
            raise DatasetError(f'image file {path!r} cannot be decoded ({type(e).__name__}); remove or '
                               f'replace it') from None
        if target is None:
            target = -1
        elif getattr(self.dataset, 'target_transform', None) is not None:
            target = self.dataset.target_transform(target)
        return img, target

    def __getitem__(self, item):
        index, sample_seed = item if isinstance(item, tuple) else (item, None)
        img, target = self._load(index)
        if sample_seed is None:
            img = self.transform(img)
        else:
            py_state = random.getstate()
            np_state = np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                random.seed(sample_seed)
                np.random.seed(sample_seed % (2 ** 32))
                img = self.transform(img)
            random.setstate(py_state)
            np.random.set_state(np_state)
        return (img, target, index) if self.with_index else (img, target)


class TwoViewTransform:
    """(weak(img), strong(img)) of one image: two independent draws of the training pipeline, the second with a
    stronger augmentation. Both run under the sample's seeded RNG, weak first, so the pair is a function of
    (seed, epoch, sample)."""

    def __init__(self, weak, strong):
        self.weak = weak
        self.strong = strong

    def __call__(self, img):
        return self.weak(img), self.strong(img)

    def __repr__(self):
        return f'{type(self).__name__}(weak={self.weak!r}, strong={self.strong!r})'


def collate_train_batch(items):
    """torch's default collate, except that two-view items become one (2B, C, H, W) tensor: the B weak views,
    then the B strong views of the same samples in the same order."""
    batch = default_collate(items)
    if isinstance(batch[0], (list, tuple)):
        batch[0] = torch.cat(list(batch[0]))
    return batch


def dataset_targets(dataset):
    """The class of every sample of a training set, in dataset order, read without decoding any image: the
    `targets` of torchvision's and the synthetic datasets, the sample list of timm's image folders."""
    targets = getattr(dataset, 'targets', None)
    reader = getattr(dataset, 'reader', None)
    if targets is None and reader is not None:
        targets = getattr(reader, 'targets', None)
        if targets is None and getattr(reader, 'samples', None) is not None:
            targets = [sample[1] for sample in reader.samples]
    if targets is None or len(targets) != len(dataset):
        raise DatasetError(f'the training set ({type(dataset).__name__}) does not list the class of each sample, '
                           f'which this distiller needs up front; use an image folder, torch/cifar100 or synthetic')
    return [int(t) for t in targets]


def student_data_config(args) -> dict:
    """timm's data config (input size, mean, std, interpolation, crop) for the student `args.model`: its pretrained
    config, overridden by --input-size / --img-size and the other data flags. train.py and benchmark_loader.py both
    resolve it here."""
    pretrained_cfg = timm.models.get_pretrained_cfg(args.model)
    data_args = vars(args).copy()
    if args.img_size and not args.input_size:
        data_args['input_size'] = (3, args.img_size, args.img_size)
    return resolve_data_config(data_args, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg is not None
                               else {}, verbose=False)


def build_train_transform(args, data_config):
    """timm's training transform from the augmentation flags; a setting timm rejects is a ValueError naming it."""
    try:
        return _train_transform(args, data_config)
    except (AssertionError, ValueError, KeyError) as e:
        raise ValueError(f'the training augmentation cannot be built (--aa {args.aa!r}, --remode {args.remode!r}): '
                         f'{e or type(e).__name__}') from None


def _train_transform(args, data_config):
    return create_transform(
        data_config['input_size'], is_training=True, no_aug=args.no_aug, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)


def build_strong_train_transform(args, data_config):
    """The strong view of a two-view distiller (docs/methods/logit2.md §2): the training transform drawn anew, with
    MLKD's RandAugment inserted after the geometric and colour steps, before the conversion to a tensor."""
    steps = list(build_train_transform(args, data_config).transforms)
    to_tensor = [i for i, step in enumerate(steps) if type(step).__name__ in ('ToTensor', 'MaybeToTensor',
                                                                               'PILToTensor', 'MaybePILToTensor')]
    if not to_tensor:
        raise ValueError('the strong view needs a training transform that converts a PIL image to a tensor')
    return transforms.Compose(steps[:to_tensor[0]] + [MLKDRandAugment(2)] + steps[to_tensor[0]:])


def build_eval_transform(data_config):
    return create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode'))


def _ignore_interrupt(worker_id):
    # Ctrl-C reaches the whole process group: the main process stops the run cleanly, and needs its workers for that
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def create_train_loader(dataset, transform, batch_size: int, seed: int, workers: int, rank: int = 0,
                        world_size: int = 1, pin_memory: bool = False, collate_fn=None, with_index: bool = False,
                        aug_repeats: int = 0):
    """Batches (images, labels), or (images, labels, sample_index) with `with_index`; a TwoViewTransform gives
    images of 2B rows (collate_train_batch). `aug_repeats` > 1: repeated augmentation (EpochSampler)."""
    if len(dataset) < batch_size * world_size:
        raise ValueError(f'the training set has {len(dataset)} images, fewer than one global batch of '
                         f'{batch_size * world_size} (batch size {batch_size} x {world_size} processes) with '
                         f'drop-last; lower --batch-size to at most {max(len(dataset) // world_size, 1)}')
    sampler = EpochSampler(len(dataset), batch_size, seed=seed, shuffle=True, drop_last=True, rank=rank,
                           world_size=world_size, repeats=aug_repeats)
    return DataLoader(
        SeededTransformDataset(dataset, transform, with_index), batch_size=batch_size, sampler=sampler,
        num_workers=workers, pin_memory=pin_memory, drop_last=True, collate_fn=collate_fn or collate_train_batch,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_interrupt)


def create_eval_loader(dataset, transform, batch_size: int, workers: int, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False):
    sampler = EpochSampler(len(dataset), batch_size, shuffle=False, drop_last=False, rank=rank,
                           world_size=world_size)
    return DataLoader(
        SeededTransformDataset(dataset, transform), batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, drop_last=False, persistent_workers=workers > 0, worker_init_fn=_ignore_interrupt)
