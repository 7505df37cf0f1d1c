"""Building students and teachers by timm name at a given input size."""
import os
import urllib.parse
from typing import Optional, Sequence

import timm
import torch
import torch.nn as nn

from network import unreachable


class ModelError(ValueError):
    """A model that cannot be built as asked; the message names the value and what would be accepted."""


def create_model_at_size(name: str, img_size: Optional[Sequence[int]] = None, weights_hint: str = '',
                         **kwargs) -> nn.Module:
    """timm.create_model, passing `img_size` to the models whose layers depend on it (ViT, Swin, Mixer...).

    A CNN takes any input size and has no img_size argument; a patch model fixes its position embeddings and
    windows at construction, so it must be built at the training size. With `pretrained=True`, weights that can be
    neither found in the local cache nor downloaded are a ModelError at once (ending with `weights_hint`), rather
    than after the hub client's minute of retries.
    """
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:5] if name else []
        hint = f'; similar names: {", ".join(close)}' if close else ''
        raise ModelError(f'unknown model {name!r}: not in the timm registry nor in models/{hint}')
    if kwargs.get('pretrained') and not (kwargs.get('pretrained_cfg_overlay') or {}).get('file'):
        reason = pretrained_weights_unavailable(name)
        if reason:
            raise ModelError(f'timm pretrained weights of {name!r} cannot be had here: {reason}'
                             + (f'; {weights_hint}' if weights_hint else ''))
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


# the names timm's hub loader tries, in its order
_HUB_WEIGHT_FILES = ('model.safetensors', 'open_clip_model.safetensors', 'pytorch_model.bin',
                     'open_clip_pytorch_model.bin')


def pretrained_weights_unavailable(name: str, timeout: float = 3.0) -> str:
    """Why timm cannot load the pretrained weights of `name` now, or '' when it can (or may: the host answers).

    Weights in the local cache (the Hugging Face hub's or torch.hub's) are available. Otherwise the hub must be
    online (HF_HUB_OFFLINE unset) and its host must accept a connection within `timeout` seconds.
    """
    import huggingface_hub
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or cfg.file or cfg.state_dict:
        return ''
    hub_id = cfg.hf_hub_id
    if hub_id:
        repo, _, revision = hub_id.partition('@')
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_WEIGHT_FILES
        for filename in names:
            if isinstance(huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None), str):
                return ''
        url = huggingface_hub.constants.ENDPOINT
    elif cfg.url:
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urllib.parse.urlparse(cfg.url).path))
        if os.path.isfile(cached):
            return ''
        url = cfg.url
    else:
        return ''  # timm has no weights to fetch and says so itself
    if hub_id and huggingface_hub.constants.HF_HUB_OFFLINE:
        return 'they are not in the local cache and the hub is offline (HF_HUB_OFFLINE)'
    reason = unreachable(url, timeout)
    return f'they are not in the local cache and {reason}' if reason else ''
