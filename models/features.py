"""One adapter that gives the stage features of any timm model through `forward_intermediates()`.

Distillers never touch a model's internals: they state what they need as a `FeatureRequest`, and the
`FeatureAdapter` of the model returns it as `Features` from a single forward pass. The shapes of everything
the adapter can return are known before training from `describe()`, a dry forward at the training input
size, so projectors are sized from the models themselves and not from tables of names.

Stage rule (the one of OFA, docs/methods/ofa.md §2, which the other specs share):
- Hierarchical models (CNNs, Swin, ConvNeXt, ...): `feature_info` lists taps at growing reductions. Stage s
  is the *last* tap at the s-th distinct reduction, keeping the last four reductions (the stride-2 stem of an
  ImageNet CNN is dropped; the CIFAR ResNets, with three reductions, have three stages). For models whose
  native layout is an NCHW map, the last stage is the final pre-pooling map (`forward_features`), which for
  MobileNetV2 includes the 320->1280 head conv. Token models (Swin) keep the raw last-stage output (no final
  norm).
- Plain token models (ViT, DeiT, Mixer, ResMLP: every tap at one reduction): D blocks split like a Swin
  2-2-(D-6)-2 pattern, so the stages end after blocks 2, 4, D-2 and D (1-based), raw (no final norm). Models
  of fewer than 8 blocks end their stages at the quarters of their depth instead (6 blocks: 2, 3, 5, 6).

Every stage is returned as an NCHW map (prefix tokens dropped, tokens in raster order); `to_tokens()` turns
a map into (B, H*W, C) tokens. `final` is the normalized `forward_features` output as an NCHW map.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


@dataclass(frozen=True)
class FeatureRequest:
    """What a distiller needs from one model's forward pass. Stage numbers are 1-based; -1 is the last."""
    stages: Tuple[int, ...] = ()
    blocks: Tuple[int, ...] = ()  # raw block indices (0-based), plain token models only
    final: bool = False  # normalized forward_features output as an NCHW map
    pre_logits: bool = False  # the pooled vector that enters the classifier
    prefix_tokens: bool = False  # also return the prefix (class/distillation) tokens of each stage

    def merge(self, other: 'FeatureRequest') -> 'FeatureRequest':
        return FeatureRequest(
            stages=tuple(sorted(set(self.stages) | set(other.stages))),
            blocks=tuple(sorted(set(self.blocks) | set(other.blocks))),
            final=self.final or other.final,
            pre_logits=self.pre_logits or other.pre_logits,
            prefix_tokens=self.prefix_tokens or other.prefix_tokens,
        )


@dataclass
class Features:
    logits: torch.Tensor
    stages: Dict[int, torch.Tensor] = field(default_factory=dict)
    blocks: Dict[int, torch.Tensor] = field(default_factory=dict)
    prefix: Dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> (B, P, C) prefix tokens
    final: Optional[torch.Tensor] = None
    pre_logits: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class TapInfo:
    channels: int
    grid: Tuple[int, int]  # (H, W) at the described input size
    reduction: int
    index: int  # index into model.feature_info / forward_intermediates; -1 = forward_features


@dataclass(frozen=True)
class ModelDescription:
    layout: str  # 'map' (native NCHW) or 'tokens' (NLC / NHWC: ViT, Swin, Mixer)
    plain_tokens: bool  # one reduction for every tap (ViT, Mixer)
    stages: Dict[int, TapInfo]
    final: TapInfo
    pre_logits_dim: int
    num_classes: int
    num_prefix_tokens: int
    num_blocks: int  # taps in feature_info (blocks for plain token models)
    input_size: Tuple[int, int, int]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage(self, s: int) -> TapInfo:
        return self.stages[self.resolve_stage(s)]

    def resolve_stage(self, s: int) -> int:
        n = self.num_stages
        resolved = n + 1 + s if s < 0 else s
        if not 1 <= resolved <= n:
            raise ValueError(f'stage {s} does not exist: this model has stages 1..{n} (or -1 for the last)')
        return resolved


def to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), raster order (token r = h*W + w)."""
    return feature_map.flatten(2).transpose(1, 2)


def to_map(tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W), raster order."""
    b, n, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1])


def _plain_token_stage_indices(num_blocks: int) -> List[int]:
    """0-based block indices that end the stages of a plain token model."""
    if num_blocks >= 8:
        return [1, 3, num_blocks - 3, num_blocks - 1]  # blocks 2, 4, D-2, D (1-based)
    # too shallow for the 2-2-(D-6)-2 split: end the stages at the quarters instead, each block once
    return sorted({math.ceil(num_blocks * k / 4) - 1 for k in range(1, 5)})


class FeatureAdapter:
    """Stage features of one timm model. Holds a reference to the model; has no parameters of its own."""

    def __init__(self, model: nn.Module, input_size: Sequence[int]):
        if not hasattr(model, 'forward_intermediates') or not hasattr(model, 'feature_info'):
            raise ValueError(
                f'model {type(model).__name__} has no forward_intermediates()/feature_info, so its stage '
                f'features cannot be taken; use a timm model that supports forward_intermediates')
        self.model = model
        self.feature_info = list(model.feature_info)
        reductions = [int(f['reduction']) for f in self.feature_info]
        self.plain_tokens = len(set(reductions)) == 1
        self.num_prefix_tokens = int(getattr(model, 'num_prefix_tokens', 0) or 0)
        if self.plain_tokens:
            self._stage_index = _plain_token_stage_indices(len(self.feature_info))
        else:
            last_at = {}
            for i, r in enumerate(reductions):
                last_at[r] = i
            self._stage_index = [last_at[r] for r in sorted(last_at)][-4:]
        self.description = self.describe(input_size)

    # ---------------------------------------------------------------- description
    @torch.no_grad()
    def describe(self, input_size: Sequence[int]) -> ModelDescription:
        was_training = self.model.training
        self.model.eval()
        try:
            param = next(self.model.parameters())
            x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
            final_raw, inter = self.model.forward_intermediates(x, indices=self._stage_index, norm=False)
            pre_logits = self.model.forward_head(final_raw, pre_logits=True)
            logits = self.model.forward_head(final_raw)
        finally:
            self.model.train(was_training)
        last_grid = tuple(inter[-1].shape[-2:])
        if final_raw.ndim == 3:
            self._final_fmt = 'NLC'
        elif tuple(final_raw.shape[-2:]) == last_grid:
            self._final_fmt = 'NCHW'
        else:
            self._final_fmt = 'NHWC'
        layout = 'map' if self._final_fmt == 'NCHW' and not self.plain_tokens else 'tokens'
        self.layout = layout
        stages = {}
        for s, (idx, fmap) in enumerate(zip(self._stage_index, inter), start=1):
            stages[s] = TapInfo(int(fmap.shape[1]), (int(fmap.shape[2]), int(fmap.shape[3])),
                                int(self.feature_info[idx]['reduction']), idx)
        final_map = self._final_to_map(final_raw, x.shape[-2:])
        final = TapInfo(int(final_map.shape[1]), (int(final_map.shape[2]), int(final_map.shape[3])),
                        int(self.feature_info[-1]['reduction']), -1)
        if layout == 'map':
            stages[len(stages)] = final
        return ModelDescription(
            layout=layout, plain_tokens=self.plain_tokens, stages=stages, final=final,
            pre_logits_dim=int(pre_logits.shape[-1]), num_classes=int(logits.shape[-1]),
            num_prefix_tokens=self.num_prefix_tokens, num_blocks=len(self.feature_info),
            input_size=tuple(int(v) for v in input_size))

    def _token_grid(self, image_hw) -> Tuple[int, int]:
        r = int(self.feature_info[-1]['reduction'])
        return int(image_hw[0]) // r, int(image_hw[1]) // r

    def _final_to_map(self, final_raw: torch.Tensor, image_hw) -> torch.Tensor:
        if self._final_fmt == 'NLC':  # (B, P + N, C) tokens
            return to_map(final_raw[:, self.num_prefix_tokens:], self._token_grid(image_hw))
        if self._final_fmt == 'NHWC':  # Swin
            return final_raw.permute(0, 3, 1, 2)
        return final_raw

    # ---------------------------------------------------------------- forward
    def check(self, request: FeatureRequest, who: str = 'model'):
        """Raise ValueError, before any training, when `request` cannot be served by this model."""
        for s in request.stages:
            self.description.resolve_stage(s)
        if request.blocks:
            if not self.plain_tokens:
                raise ValueError(f'{who} {type(self.model).__name__} is hierarchical; block taps need a plain '
                                 f'token model (ViT, DeiT, Mixer)')
            bad = [b for b in request.blocks if not 0 <= b < len(self.feature_info)]
            if bad:
                raise ValueError(f'{who} has blocks 0..{len(self.feature_info) - 1}, not {bad}')

    def __call__(self, x: torch.Tensor, request: FeatureRequest = FeatureRequest()) -> Features:
        model = self.model
        d = self.description
        stage_ids = [d.resolve_stage(s) for s in request.stages]
        # stages served by forward_features (the last stage of a map model) need no intermediate
        wanted = {}
        for s in stage_ids:
            tap = d.stages[s]
            if tap.index >= 0:
                wanted.setdefault(tap.index, []).append(('stage', s))
        for b in request.blocks:
            wanted.setdefault(b, []).append(('block', b))
        if wanted:
            indices = sorted(wanted)
            kwargs = {}
            if request.prefix_tokens and self.num_prefix_tokens:
                kwargs['return_prefix_tokens'] = True
            final_raw, inter = model.forward_intermediates(x, indices=indices, norm=False, **kwargs)
        else:
            final_raw, inter, indices = model.forward_features(x), [], []
        out = Features(logits=None)
        for idx, fmap in zip(indices, inter):
            prefix = None
            if isinstance(fmap, (tuple, list)):
                fmap, prefix = fmap
            for kind, key in wanted[idx]:
                if kind == 'stage':
                    out.stages[key] = fmap
                    if prefix is not None:
                        out.prefix[key] = prefix
                else:
                    out.blocks[key] = fmap
        if request.final or any(d.stages[s].index < 0 for s in stage_ids):
            final_map = self._final_to_map(final_raw, x.shape[-2:])
            out.final = final_map
            for s in stage_ids:
                if d.stages[s].index < 0:
                    out.stages[s] = final_map
        if request.pre_logits:
            out.pre_logits = model.forward_head(final_raw, pre_logits=True)
        out.logits = model.forward_head(final_raw)
        # negative stage numbers are served under the number they were asked with as well
        for s in request.stages:
            if s < 0:
                out.stages[s] = out.stages[d.resolve_stage(s)]
                if d.resolve_stage(s) in out.prefix:
                    out.prefix[s] = out.prefix[d.resolve_stage(s)]
        return out
