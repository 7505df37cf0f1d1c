"""Building students and teachers by timm name at a given input size."""
from typing import Optional, Sequence

import timm
import torch.nn as nn


class ModelError(ValueError):
    """A model that cannot be built as asked; the message names the value and what would be accepted."""


def create_model_at_size(name: str, img_size: Optional[Sequence[int]] = None, **kwargs) -> nn.Module:
    """timm.create_model, passing `img_size` to the models whose layers depend on it (ViT, Swin, Mixer...).

    A CNN takes any input size and has no img_size argument; a patch model fixes its position embeddings and
    windows at construction, so it must be built at the training size.
    """
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:5] if name else []
        hint = f'; similar names: {", ".join(close)}' if close else ''
        raise ModelError(f'unknown model {name!r}: not in the timm registry nor in models/{hint}')
    if img_size is not None:
        size = tuple(int(v) for v in img_size[-2:])
        default = timm.get_pretrained_cfg_value(name, 'input_size')
        if default is None or tuple(default[-2:]) != size:
            try:
                return timm.create_model(name, img_size=size, **kwargs)
            except TypeError as e:
                if 'img_size' not in str(e):
                    raise
    return timm.create_model(name, **kwargs)
