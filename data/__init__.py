"""Datasets for train.py, validate.py and benchmark.py, through timm.data.

- ImageNet-style folders: `--data-dir DIR` holding `train/<class>/<image>` and `val/<class>/<image>`
  (default root `data/imagenet`).
- `--dataset torch/cifar100` or `torch/cifar10`: torchvision's CIFAR from `--data-dir` (default root
  `data/cifar`), fetched with `--dataset-download` when a network is there.
- `--dataset synthetic`: the in-memory dataset of data/synthetic.py (the demo's and the tests' default).
"""
import os
from typing import Optional, Tuple

from timm.data import create_dataset

from .errors import DatasetError
from .synthetic import SyntheticImageDataset

DEFAULT_ROOTS = {'': 'data/imagenet', 'imagefolder': 'data/imagenet', 'torch/cifar100': 'data/cifar',
                 'torch/cifar10': 'data/cifar'}
CIFAR_CLASSES = {'torch/cifar100': 100, 'torch/cifar10': 10}
# where torchvision keeps each CIFAR under its root
CIFAR_FOLDERS = {'torch/cifar100': 'cifar-100-python', 'torch/cifar10': 'cifar-10-batches-py'}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm', '.tif', '.tiff', '.webp')


def dataset_root(dataset: str, data_dir: Optional[str]) -> str:
    return data_dir or DEFAULT_ROOTS.get(dataset.lower(), 'data/imagenet')


def _class_folders(path):
    return sorted(d.name for d in os.scandir(path) if d.is_dir())


def _has_image(path):
    for _, _, files in os.walk(path):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def _check_image_folder(root: str, train_split: str, val_split: str):
    layout = f'{root}/{train_split}/<class>/<image> and {root}/{val_split}/<class>/<image>'
    if not os.path.isdir(root):
        raise DatasetError(f'dataset folder {root!r} does not exist; expected the layout {layout}')
    classes = {}
    for split in (train_split, val_split):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise DatasetError(f'dataset folder {root!r} has no {split!r} folder; expected the layout {layout}')
        classes[split] = _class_folders(path)
        if not classes[split] or not _has_image(path):
            raise DatasetError(f'dataset folder {path!r} holds no class folders with images; expected the '
                               f'layout {layout}')
    train_only = sorted(set(classes[train_split]) - set(classes[val_split]))
    val_only = sorted(set(classes[val_split]) - set(classes[train_split]))
    if train_only or val_only:
        raise DatasetError(f'the class folders of {root}/{train_split} and {root}/{val_split} differ: only in '
                           f'{train_split}: {train_only[:5]}, only in {val_split}: {val_only[:5]}')
    return len(classes[train_split])


def create_datasets(args) -> Tuple[object, object, int]:
    """(train dataset, eval dataset, number of classes) for the parsed arguments."""
    name = (args.dataset or '').lower()
    if name == 'synthetic':
        size = int(args.input_size[-1])
        kwargs = dict(num_classes=args.synthetic_classes, img_size=size, seed=args.synthetic_seed)
        train = SyntheticImageDataset(num_samples=args.synthetic_train_size, split='train', **kwargs)
        val = SyntheticImageDataset(num_samples=args.synthetic_val_size, split='val', **kwargs)
        return train, val, args.synthetic_classes
    root = dataset_root(name, args.data_dir)
    if name in CIFAR_CLASSES:
        if not args.dataset_download and not os.path.isdir(os.path.join(root, CIFAR_FOLDERS[name])):
            raise DatasetError(
                f'{name} is not under {root!r} (expected {root}/{CIFAR_FOLDERS[name]}); pass --data-dir with '
                f'the folder that holds it, or --dataset-download to fetch it')
        train = create_dataset(name, root=root, split='train', is_training=True, download=args.dataset_download)
        val = create_dataset(name, root=root, split='validation', download=args.dataset_download)
        return train, val, CIFAR_CLASSES[name]
    if name not in ('', 'imagefolder', 'folder'):
        # any other timm dataset name (e.g. hfds/..., tfds/...): handed to timm as is
        train = create_dataset(args.dataset, root=root, split=args.train_split, is_training=True,
                               download=args.dataset_download, batch_size=args.batch_size)
        val = create_dataset(args.dataset, root=root, split=args.val_split, download=args.dataset_download,
                             batch_size=args.batch_size)
        return train, val, args.num_classes
    num_classes = _check_image_folder(root, args.train_split, args.val_split)
    train = create_dataset('', root=os.path.join(root, args.train_split), is_training=True)
    val = create_dataset('', root=os.path.join(root, args.val_split))
    return train, val, num_classes


def create_eval_dataset(dataset: str, data_dir: Optional[str], split: str, img_size: int, synthetic_classes: int,
                        synthetic_size: int, synthetic_seed: int):
    """The evaluation split alone (validate.py)."""
    name = (dataset or '').lower()
    if name == 'synthetic':
        if split not in ('train', 'val', 'validation'):
            raise DatasetError(f'the synthetic dataset has the splits train and val, not {split!r}')
        return SyntheticImageDataset(num_classes=synthetic_classes, num_samples=synthetic_size, img_size=img_size,
                                     split='train' if split == 'train' else 'val', seed=synthetic_seed)
    root = dataset_root(name, data_dir)
    if name in CIFAR_CLASSES:
        if not os.path.isdir(os.path.join(root, CIFAR_FOLDERS[name])):
            raise DatasetError(f'{name} is not under {root!r} (expected {root}/{CIFAR_FOLDERS[name]}); pass '
                               f'--data-dir with the folder that holds it')
        return create_dataset(name, root=root, split='train' if split == 'train' else 'validation')
    if name not in ('', 'imagefolder', 'folder'):
        return create_dataset(dataset, root=root, split=split)
    path = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
    if not os.path.isdir(path) or not _has_image(path):
        raise DatasetError(f'dataset folder {path!r} holds no images; expected {root}/{split}/<class>/<image>')
    return create_dataset('', root=path)
