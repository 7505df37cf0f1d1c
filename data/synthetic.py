"""A deterministic, learnable synthetic image-classification dataset, generated in memory.

Why it exists: datasets and weights cannot be downloaded everywhere this project is tested, and
distillation needs a task on which a good teacher clearly beats a weak student. A class here is a small
set of "modes", each a colored texture made of a few oriented sinusoids. A sample is one mode of its class,
shifted by a random circular translation, scaled in contrast, overlaid with a weaker texture of a random
other class (a distractor), and corrupted with Gaussian noise. Telling classes apart therefore needs
translation-invariant frequency and color features that must be separated from the distractor: a small CNN
learns it within a few epochs, while a much smaller one saturates well below.

With `superclasses` S > 0 the classes fall into S contiguous groups of visually related classes (as CIFAR-100's
100 classes fall into 20 superclasses of 5): the classes of one group share all but the last wave of each mode
(frequency and phase; their colors lean toward the group's) and differ in that last wave. A classifier then
confuses classes within a group more than across groups, which is what a teacher's soft labels can pass on to
a student and a one-hot label cannot. With `fraction` F < 1 the dataset keeps a deterministic, class-balanced
F of its samples (the first of each class, round-robin over the classes): a student can train on less data than
its teacher saw, on images its teacher saw too.

Everything is drawn from one torch.Generator seeded by `seed`, so a (seed, split) pair always gives the
same images; the train and val splits share the class definitions and differ in their samples. The defaults
(no superclasses, the whole set) give the images this dataset has always given.
"""
import math
import os

import torch
from PIL import Image
from torch.utils.data import Dataset


class SyntheticImageDataset(Dataset):
    def __init__(self, num_classes: int = 10, num_samples: int = 1000, img_size: int = 32, split: str = 'train',
                 seed: int = 0, modes_per_class: int = 2, waves_per_mode: int = 3, noise_std: float = 0.35,
                 distractor_weight: float = 0.6, superclasses: int = 0, fraction: float = 1.0, transform=None):
        if num_classes < 2:
            raise ValueError(f'synthetic dataset needs at least 2 classes, got {num_classes}')
        if num_samples < 1:
            raise ValueError(f'synthetic dataset needs at least 1 sample, got {num_samples}')
        if img_size < 8:
            raise ValueError(f'synthetic image size must be at least 8 pixels, got {img_size}')
        if not 0 <= superclasses <= num_classes:
            raise ValueError(f'synthetic superclasses must be 0 (none) or between 1 and the {num_classes} classes, '
                             f'got {superclasses}')
        if superclasses and waves_per_mode < 2:
            raise ValueError(f'superclasses share all but one wave per mode: need at least 2 waves, got '
                             f'{waves_per_mode}')
        if not 0 < fraction <= 1 or round(fraction * num_samples) < 1:
            raise ValueError(f'synthetic fraction must be in (0, 1] and keep at least one of the {num_samples} '
                             f'samples, got {fraction}')
        self.num_classes = num_classes
        self.img_size = img_size
        self.split = split
        self.transform = transform
        self.target_transform = None
        self.superclasses = superclasses
        class_gen = torch.Generator().manual_seed(seed)
        self.modes = self._make_modes(class_gen, num_classes, modes_per_class, waves_per_mode, superclasses)
        # train and val samples come from different streams of the same seed
        sample_gen = torch.Generator().manual_seed(seed * 1000003 + (1 if split == 'train' else 2))
        self.images, self.targets = self._make_samples(
            sample_gen, self.modes, num_samples, img_size, noise_std, distractor_weight)
        if fraction < 1:
            keep = self.balanced_subset(self.targets, round(fraction * num_samples))
            self.images = self.images[keep.numpy()]
            self.targets = [self.targets[i] for i in keep.tolist()]

    @staticmethod
    def superclass_of(num_classes: int, superclasses: int) -> torch.Tensor:
        """The superclass of each class: S contiguous groups whose sizes differ by at most one."""
        return torch.arange(num_classes) * superclasses // num_classes

    @staticmethod
    def balanced_subset(targets, size: int) -> torch.Tensor:
        """Sorted indices of `size` samples, taken round-robin over the classes, each class's in index order: the
        class counts differ by at most one (as far as the classes have samples), and a smaller subset is part of a
        larger one."""
        targets = torch.as_tensor(targets)
        rank_in_class = torch.empty_like(targets)
        for c in targets.unique():
            where = (targets == c).nonzero().flatten()
            rank_in_class[where] = torch.arange(len(where))
        order = torch.argsort(rank_in_class * len(targets) + torch.arange(len(targets)))
        return order[:size].sort().values

    def class_textures(self, size: int = None) -> torch.Tensor:
        """The noiseless, unshifted texture of every class and mode, (K, M, 3, S, S) in [-1, 1]-ish units."""
        freq, phase, color = self.modes
        k, m, w = phase.shape
        flat = self._render(freq.reshape(k * m, w, 2), phase.reshape(k * m, w), color.reshape(k * m, w, 3),
                            torch.zeros(k * m, 2), size or self.img_size)
        return flat.reshape(k, m, *flat.shape[1:])

    @staticmethod
    def _draw_waves(gen, shape):
        # integer frequencies keep each texture periodic, so a circular shift is a change of phase
        freq = torch.randint(1, 5, shape + (2,), generator=gen).float()
        freq = freq * (torch.randint(0, 2, shape + (2,), generator=gen).float() * 2 - 1)
        phase = torch.rand(shape, generator=gen) * 2 * math.pi
        color = torch.randn(shape + (3,), generator=gen)
        color = color / color.norm(dim=-1, keepdim=True)
        return freq, phase, color

    @classmethod
    def _make_modes(cls, gen, num_classes, modes_per_class, waves_per_mode, superclasses=0, color_spread=0.5):
        """Per class and mode: integer frequencies (K, M, W, 2), phases (K, M, W) and unit colors (K, M, W, 3).

        With superclasses, waves 0..W-2 of a class's mode m are those of its superclass's mode m, with the color
        pulled `color_spread` of the way toward the class's own draw; wave W-1 stays the class's own."""
        freq, phase, color = cls._draw_waves(gen, (num_classes, modes_per_class, waves_per_mode))
        if not superclasses:
            return freq, phase, color
        group_freq, group_phase, group_color = cls._draw_waves(gen, (superclasses, modes_per_class,
                                                                     waves_per_mode - 1))
        group = cls.superclass_of(num_classes, superclasses)
        freq[:, :, :-1] = group_freq[group]
        phase[:, :, :-1] = group_phase[group]
        mixed = group_color[group] + color_spread * color[:, :, :-1]
        color[:, :, :-1] = mixed / mixed.norm(dim=-1, keepdim=True)
        return freq, phase, color

    @staticmethod
    def _render(freq, phase, color, shift, size):
        """Textures (N, 3, S, S) of N (mode, shift) pairs: freq (N, W, 2), phase (N, W), color (N, W, 3)."""
        coords = torch.arange(size, dtype=torch.float32) / size
        yy, xx = torch.meshgrid(coords, coords, indexing='ij')
        # shifting by (dy, dx) pixels moves each wave's phase by -2 pi (fx dx + fy dy) / S
        shifted = phase - 2 * math.pi * (freq[..., 0] * shift[:, None, 1] + freq[..., 1] * shift[:, None, 0]) / size
        arg = 2 * math.pi * (freq[..., 0, None, None] * xx + freq[..., 1, None, None] * yy) + shifted[..., None, None]
        return torch.einsum('nwc,nwhv->nchv', color, torch.sin(arg)) / math.sqrt(freq.shape[1])

    @classmethod
    def _make_samples(cls, gen, modes, n, size, noise_std, distractor_weight, chunk=512):
        freq, phase, color = modes
        num_classes, modes_per_class = freq.shape[:2]
        targets = torch.arange(n) % num_classes
        targets = targets[torch.randperm(n, generator=gen)]
        mode_idx = torch.randint(0, modes_per_class, (n,), generator=gen)
        other = (targets + torch.randint(1, num_classes, (n,), generator=gen)) % num_classes
        other_mode = torch.randint(0, modes_per_class, (n,), generator=gen)
        shifts = torch.randint(0, size, (n, 4), generator=gen).float()
        contrast = 0.6 + 0.6 * torch.rand(n, generator=gen)
        images = torch.empty(n, size, size, 3, dtype=torch.uint8)
        for lo in range(0, n, chunk):
            sl = slice(lo, min(lo + chunk, n))
            t, m, o, om = targets[sl], mode_idx[sl], other[sl], other_mode[sl]
            signal = cls._render(freq[t, m], phase[t, m], color[t, m], shifts[sl, :2], size)
            distractor = cls._render(freq[o, om], phase[o, om], color[o, om], shifts[sl, 2:], size)
            noise = torch.randn(signal.shape, generator=gen) * noise_std
            img = contrast[sl, None, None, None] * signal + distractor_weight * distractor + noise
            img = (img * 0.25 + 0.5).clamp(0, 1)
            images[sl] = (img.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
        return images.numpy(), targets.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index])
        target = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def filename(self, index, basename=False, absolute=False):
        return f'synthetic_{self.split}_{index:06d}.png'

    def filenames(self, basename=False, absolute=False):
        return [self.filename(i) for i in range(len(self))]


def write_jpeg_folder(root, train_images: int, val_images: int, num_classes: int = 4, size=(500, 375),
                      seed: int = 0, quality: int = 90):
    """Write an ImageNet-style folder (`root/train/<class>/*.jpg`, `root/val/<class>/*.jpg`) of smooth random JPEGs.

    For timing data loading when no dataset is at hand (benchmark_loader.py): what a real loader
    spends its time on is decoding JPEGs of ImageNet's typical size (500x375) and resizing them, so the images
    have that size and a photo-like file size (a bicubic upsampling of a coarse random image plus mild noise,
    about 60 KB at quality 90; pure noise would compress far worse than photos and decode slower)."""
    gen = torch.Generator().manual_seed(seed)
    width, height = size
    for split, count in (('train', train_images), ('val', val_images)):
        for i in range(count):
            folder = os.path.join(root, split, f'class{i % num_classes}')
            os.makedirs(folder, exist_ok=True)
            coarse = torch.rand(1, 3, max(height // 24, 1), max(width // 24, 1), generator=gen) * 255
            img = torch.nn.functional.interpolate(coarse, size=(height, width), mode='bicubic', align_corners=False)
            img = img[0] + 8 * torch.randn(3, height, width, generator=gen)
            pixels = img.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
            Image.fromarray(pixels).save(os.path.join(folder, f'{i:06d}.jpg'), quality=quality)
