"""Reading and writing model checkpoints: teacher weights in any common layout, atomic run checkpoints.

A run checkpoint (written by train.py) holds:
  state_dict         the student alone (timm.create_model(name, checkpoint_path=...) and validate.py load it)
  state_dict_ema     the student's EMA weights (when --model-ema)
  distiller_state    the method's own modules (projectors, heads), without the student
  optimizer, scheduler, scaler, epoch, step (updates done), batch_idx (batches done in `epoch`; -1 = epoch end)
  metric, best_metric, best_epoch, args (a plain dict), arch, teacher (name/checkpoint/sha256, no weights),
  rng (every RNG state of the rank(s)), version
"""
import hashlib
import os
import shutil
from typing import Dict, Optional

import torch
import torch.nn as nn

STRIPPED_PREFIXES = ('module.', '_orig_mod.', 'model.', 'student.')
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit; the message names the file."""


def load_checkpoint_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist')
    try:
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            if 'weights_only' not in str(e) and 'Unsupported global' not in str(e):
                raise
            # timm's own checkpoints pickle an argparse.Namespace under 'args'
            obj = torch.load(path, map_location='cpu', weights_only=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f'checkpoint {path!r} is truncated or corrupt and cannot be read '
                              f'({type(e).__name__}: {str(e).splitlines()[0][:120]})') from None
    if not isinstance(obj, dict):
        raise CheckpointError(f'checkpoint {path!r} holds a {type(obj).__name__}, not a state dict or a '
                              f'checkpoint dictionary')
    return obj


def clean_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip wrapper prefixes (DDP's module., torch.compile's _orig_mod., model., student.)."""
    cleaned = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIPPED_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        cleaned[key] = value
    return cleaned


def select_state_dict(checkpoint: dict, use_ema: bool = False, path: str = '') -> Dict[str, torch.Tensor]:
    """The model weights inside a checkpoint: this project's, timm's, or a bare state_dict."""
    keys = ('state_dict_ema', 'model_ema') if use_ema else ('state_dict', 'model', 'module')
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            return clean_state_dict(checkpoint[key])
    if use_ema:
        raise CheckpointError(f'checkpoint {path!r} has no EMA weights (state_dict_ema or model_ema); drop '
                              f'the EMA flag to use its regular weights')
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return clean_state_dict(checkpoint)
    raise CheckpointError(f'checkpoint {path!r} has no model weights: expected a state_dict, model or '
                          f'state_dict_ema entry, or a bare state dict')


def load_model_weights(model: nn.Module, path: str, use_ema: bool = False, who: str = 'model',
                       checkpoint: Optional[dict] = None, classes_hint: str = ''):
    """Strictly load `path` (or its already loaded `checkpoint`) into `model`; a mismatch names the missing and
    unexpected keys, or the class counts when only the classifier differs (then `classes_hint` says what works,
    by default a checkpoint trained on as many classes as the model has)."""
    state = select_state_dict(checkpoint if checkpoint is not None else load_checkpoint_file(path),
                              use_ema=use_ema, path=path)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong_shape = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    classifier_keys = _classifier_keys(model)
    if wrong_shape and not missing and not unexpected and set(wrong_shape) <= classifier_keys:
        weight = next(k for k in wrong_shape if state[k].ndim >= 1)
        classes = own[weight].shape[0]
        raise CheckpointError(f'checkpoint {path!r} has {state[weight].shape[0]} classes, but the {who} is built '
                              f'for {classes}; ' + (classes_hint or f'use a {who} checkpoint trained on {classes} '
                                                                     f'classes'))
    if missing or unexpected or wrong_shape:
        def show(keys):
            return f'{keys[:6]}{" and %d more" % (len(keys) - 6) if len(keys) > 6 else ""}'
        detail = []
        if missing:
            detail.append(f'missing keys {show(missing)}')
        if unexpected:
            detail.append(f'unexpected keys {show(unexpected)}')
        if wrong_shape:
            detail.append('shape mismatch for ' + ', '.join(
                f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in wrong_shape[:4]))
        raise CheckpointError(f'checkpoint {path!r} does not fit the {who} {type(model).__name__}: '
                              + '; '.join(detail))
    model.load_state_dict(state, strict=True)


def _classifier_keys(model: nn.Module):
    get = getattr(model, 'get_classifier', None)
    classifier = get() if callable(get) else None
    if not isinstance(classifier, nn.Module):
        return set()
    ids = {id(p) for p in classifier.parameters()}
    return {k for k, p in model.named_parameters() if id(p) in ids}


def file_sha256(path: str, limit: Optional[int] = None) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()[:limit] if limit else digest.hexdigest()


def atomic_save(obj, path: str):
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str, dst: str):
    with open(src, 'rb') as source:
        _atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 22))


def _atomic_write(path: str, write):
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp.{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
