"""Datasets for train.py, validate.py and benchmark.py, through timm.data.

- ImageNet-style folders: `--data-dir DIR` holding `train/<class>/<image>` and `val/<class>/<image>`
  (default root `data/imagenet`).
- `--dataset torch/cifar100` or `torch/cifar10`: torchvision's CIFAR from `--data-dir` (default root
  `data/cifar`), fetched with `--dataset-download` when a network is there.
- `--dataset synthetic`: the in-memory dataset of data/synthetic.py (the demo's and the tests' default).
"""
import os
import urllib.error
from typing import Optional, Tuple

from timm.data import create_dataset
from torchvision.datasets import CIFAR10, CIFAR100

from network import unreachable

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


def _check_synthetic_size(size: int):
    if size < 8:
        raise DatasetError(f'the synthetic dataset draws images of at least 8x8 pixels; --img-size {size} is '
                           f'too small')


def _torchvision_cifar(name: str, root: str, split: str, download: bool, is_training: bool = False):
    """torchvision's CIFAR through timm; a failed download or a folder that fails torchvision's file check is a
    DatasetError that names the folder."""
    folder = os.path.join(root, CIFAR_FOLDERS[name])
    if download and not os.path.isdir(folder):
        reason = unreachable({'torch/cifar100': CIFAR100, 'torch/cifar10': CIFAR10}[name].url)
        if reason:  # said before torchvision creates any folder
            raise DatasetError(f'{name} cannot be downloaded into {root!r}: {reason}; put the extracted '
                               f'{CIFAR_FOLDERS[name]} folder there and drop --dataset-download')
    try:
        return create_dataset(name, root=root, split=split, is_training=is_training, download=download)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = getattr(e, 'reason', None) or e
        raise DatasetError(f'{name} cannot be downloaded into {root!r} ({reason}); put the extracted '
                           f'{CIFAR_FOLDERS[name]} folder there and drop --dataset-download') from None
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DatasetError(f'{name} under {root!r} fails torchvision\'s file check ({str(e).split(".")[0]}): '
                           f'{folder} must hold the files of the python version of {name.split("/")[1].upper()}; '
                           f'replace them, or delete the folder and pass --dataset-download') from None


def _check_synthetic_structure(classes: int, superclasses: int, train_size: int, fraction: float):
    if superclasses > classes:
        raise DatasetError(f'--synthetic-superclasses {superclasses} exceeds the {classes} classes; give 0 (none) or '
                           f'at most {classes}')
    if round(fraction * train_size) < 1:
        raise DatasetError(f'--synthetic-train-fraction {fraction} keeps none of the {train_size} training images; '
                           f'give at least {1 / train_size:.3g}')


def create_datasets(args) -> Tuple[object, object, int]:
    """(train dataset, eval dataset, number of classes) for the parsed arguments."""
    name = (args.dataset or '').lower()
    if name == 'synthetic':
        size = int(args.input_size[-1])
        _check_synthetic_size(size)
        superclasses = getattr(args, 'synthetic_superclasses', 0)
        fraction = getattr(args, 'synthetic_train_fraction', 1.0)
        _check_synthetic_structure(args.synthetic_classes, superclasses, args.synthetic_train_size, fraction)
        kwargs = dict(num_classes=args.synthetic_classes, img_size=size, seed=args.synthetic_seed,
                      superclasses=superclasses)
        train = SyntheticImageDataset(num_samples=args.synthetic_train_size, split='train', fraction=fraction,
                                      **kwargs)
        val = SyntheticImageDataset(num_samples=args.synthetic_val_size, split='val', **kwargs)
        return train, val, args.synthetic_classes
    root = dataset_root(name, args.data_dir)
    if name in CIFAR_CLASSES:
        if not args.dataset_download and not os.path.isdir(os.path.join(root, CIFAR_FOLDERS[name])):
            raise DatasetError(
                f'{name} is not under {root!r} (expected {root}/{CIFAR_FOLDERS[name]}); pass --data-dir with '
                f'the folder that holds it, or --dataset-download to fetch it')
        train = _torchvision_cifar(name, root, 'train', args.dataset_download, is_training=True)
        val = _torchvision_cifar(name, root, 'validation', args.dataset_download)
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
                        synthetic_size: int, synthetic_seed: int, synthetic_superclasses: int = 0,
                        synthetic_train_fraction: float = 1.0):
    """The evaluation split alone (validate.py). The synthetic train split is the run's: the fraction of it that
    the run trained on."""
    name = (dataset or '').lower()
    if name == 'synthetic':
        _check_synthetic_size(img_size)
        if split not in ('train', 'val', 'validation'):
            raise DatasetError(f'the synthetic dataset has the splits train and val, not {split!r}')
        fraction = synthetic_train_fraction if split == 'train' else 1.0
        _check_synthetic_structure(synthetic_classes, synthetic_superclasses, synthetic_size, fraction)
        return SyntheticImageDataset(num_classes=synthetic_classes, num_samples=synthetic_size, img_size=img_size,
                                     split='train' if split == 'train' else 'val', seed=synthetic_seed,
                                     superclasses=synthetic_superclasses, fraction=fraction)
    root = dataset_root(name, data_dir)
    if name in CIFAR_CLASSES:
        if not os.path.isdir(os.path.join(root, CIFAR_FOLDERS[name])):
            raise DatasetError(f'{name} is not under {root!r} (expected {root}/{CIFAR_FOLDERS[name]}); pass '
                               f'--data-dir with the folder that holds it')
        return _torchvision_cifar(name, root, 'train' if split == 'train' else 'validation', False)
    if name not in ('', 'imagefolder', 'folder'):
        return create_dataset(dataset, root=root, split=split)
    path = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
    if not os.path.isdir(path) or not _has_image(path):
        raise DatasetError(f'dataset folder {path!r} holds no images; expected {root}/{split}/<class>/<image>')
    return create_dataset('', root=path)
