"""The strong view's augmentation of MLKD (docs/methods/logit2.md §2): the FixMatch-style RandAugment its code
ships, which is not timm's RandAugment (other ops, other magnitudes; `rand-m10-n2` must not stand in for it).

Per image: `num_ops` operations picked uniformly with replacement, each with a magnitude drawn uniformly from its
range (every op draws one, those without a magnitude included), then a square cutout of up to half the width,
filled with grey (125, 123, 114). Randomness comes from Python's `random` and NumPy's global generator, which
data/loader.py's SeededTransformDataset seeds per sample, so a view is a function of (seed, epoch, sample).
"""
import random

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

CUTOUT_FILL = (125, 123, 114)


def _auto_contrast(img, v):
    return ImageOps.autocontrast(img)


def _brightness(img, v):
    return ImageEnhance.Brightness(img).enhance(v)


def _color(img, v):
    return ImageEnhance.Color(img).enhance(v)


def _contrast(img, v):
    return ImageEnhance.Contrast(img).enhance(v)


def _equalize(img, v):
    return ImageOps.equalize(img)


def _identity(img, v):
    return img


def _posterize(img, v):
    return ImageOps.posterize(img, max(1, int(v)))


def _rotate(img, v):
    return img.rotate(v)


def _sharpness(img, v):
    return ImageEnhance.Sharpness(img).enhance(v)


def _shear_x(img, v):
    return img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0))


def _shear_y(img, v):
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0))


def _solarize(img, v):
    return ImageOps.solarize(img, v)


def _translate_x(img, v):
    return img.transform(img.size, Image.AFFINE, (1, 0, v * img.size[0], 0, 1, 0))


def _translate_y(img, v):
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * img.size[1]))


# (op, low, high) of the magnitude; ops without a magnitude still draw one, as the original does
OPS = (
    (_auto_contrast, 0.0, 1.0),
    (_brightness, 0.05, 0.95),
    (_color, 0.05, 0.95),
    (_contrast, 0.05, 0.95),
    (_equalize, 0.0, 1.0),
    (_identity, 0.0, 1.0),
    (_posterize, 4.0, 8.0),
    (_rotate, -30.0, 30.0),
    (_sharpness, 0.05, 0.95),
    (_shear_x, -0.3, 0.3),
    (_shear_y, -0.3, 0.3),
    (_solarize, 0.0, 256.0),
    (_translate_x, -0.3, 0.3),
    (_translate_y, -0.3, 0.3),
)


def cutout(img, fraction):
    """Fill a square of side fraction * width, centred at a uniform point and clipped to the image."""
    if fraction <= 0:
        return img
    width, height = img.size
    side = fraction * width
    x0, y0 = np.random.uniform(0, width), np.random.uniform(0, height)
    x0, y0 = int(max(0, x0 - side / 2.0)), int(max(0, y0 - side / 2.0))
    x1, y1 = min(width, x0 + side), min(height, y0 + side)
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), fill=CUTOUT_FILL)
    return img


class MLKDRandAugment:
    """`num_ops` random ops then a random cutout, on an RGB PIL image."""

    def __init__(self, num_ops: int = 2):
        self.num_ops = int(num_ops)

    def __call__(self, img):
        for op, low, high in random.choices(OPS, k=self.num_ops):
            img = op(img, low + (high - low) * random.random())
        return cutout(img, 0.5 * random.random())

    def __repr__(self):
        return f'{type(self).__name__}(num_ops={self.num_ops})'
