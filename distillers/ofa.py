"""OFA: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
Distillation" (NeurIPS 2023). Spec: docs/methods/ofa.md.

Every chosen student stage gets a training-only branch that maps its features straight to K logits; each
branch and the student's own logits learn the teacher's logits through the OFA loss. The teacher gives
logits only, so any teacher/student pair works.

Where the spec leaves room, this file decides (README table of distillers repeats it):
- Branch depth comes from the stage grids read by the build-time dry forward, never from a table:
  - map branch (CNN-like students): one SepConv block per stride-2 halving (3x3, padding 1, so a side
    goes to ceil(side / 2)) that takes the stage grid down to the grid of the student's last stage, the
    grid its own head pools. That is 4 - s blocks at 224 px and at any size where the stages halve (ResNet
    at 160 px: 40 -> 20 -> 10 -> 5); a stage already at the last grid gets the 1x1 conv of stage 4. The
    global pool absorbs whatever grid remains.
  - token branch: m = floor(log2(g / g32)) patch merges, where g32 = ceil(side / 32) is the grid of a
    stride-32 network at this input size (7 at 224 px, as in OFAKD; 5 at 160 px), taken per side and the
    smaller m kept. An odd side is zero-padded at the bottom/right before a merge.
- Transformer blocks per token branch: max(4 - s, 1), as in the spec.
- Logged keys: `loss_gt`, `loss_kd` (OFA loss on the student's logits, last epsilon) and one
  `loss_ofa_s<stage>` per branch, each already multiplied by --ofa-loss-weight. OFAKD's single `loss_ofa`
  is their sum (train.py sums every key, so a summed key could not be logged next to them).
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from models.features import FeatureRequest, to_map, to_tokens

from .base import Distiller, DistillerError, add_stage_arg, float32_loss, hard_targets

# OFAKD's token branches end on the 7x7 grid of a stride-32 network at 224 px
TOKEN_BRANCH_REDUCTION = 32
TOKEN_BRANCH_HEADS = 4


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target_mask: torch.Tensor,
             eps: float, temperature: float) -> torch.Tensor:
    """sum_k -((p_t + y)^eps - y) * log p_s, mean over the batch, both at temperature T; no T^2 factor.

    `target_mask` is the one-hot (B, K) of the hard target. eps = 1 is the soft cross-entropy H(p_t, p_s).
    """
    t = float(temperature)
    with float32_loss(student_logits.device.type):
        log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
        p_t = F.softmax(teacher_logits.float() / t, dim=-1)
        y = target_mask.float()
        weights = (p_t + y).pow(float(eps)) - y
        return -(weights * log_p_s).sum(dim=-1).mean()


def halvings_to(grid: Sequence[int], target: Sequence[int]) -> int:
    """How many stride-2 3x3 convs (padding 1: side -> ceil(side / 2)) bring `grid` down to `target`."""
    h, w = int(grid[0]), int(grid[1])
    n = 0
    while h > target[0] or w > target[1]:
        h, w = -(-h // 2), -(-w // 2)
        n += 1
    return n


def merges_to(grid: Sequence[int], target: Sequence[int]) -> int:
    """floor(log2(grid / target)) on the tighter side, at least 0: merges that stay at or above `target`."""
    m = 0
    while all(g >= t * 2 ** (m + 1) for g, t in zip(grid, target)):
        m += 1
    return m


# ---------------------------------------------------------------- branches
class SepConv(nn.Sequential):
    """Depthwise-separable downsampling block: the first depthwise conv halves the grid."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class MapBranch(nn.Module):
    """CNN-like stage: SepConv blocks doubling the width (the last one to `width`), pool, linear head."""

    def __init__(self, channels: int, num_downsamples: int, width: int, num_classes: int):
        super().__init__()
        if num_downsamples == 0:
            self.body = nn.Conv2d(channels, width, 1)
        else:
            self.body = nn.Sequential(*[
                SepConv(channels * 2 ** j, width if j == num_downsamples - 1 else channels * 2 ** (j + 1))
                for j in range(num_downsamples)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, feature_map: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.body(feature_map).mean(dim=(2, 3)))


class PatchMerge(nn.Module):
    """2x2 neighbourhoods concatenated along channels, LayerNorm, bias-free linear, optional GELU."""

    def __init__(self, in_width: int, out_width: int, activate: bool):
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_width)
        self.reduction = nn.Linear(4 * in_width, out_width, bias=False)
        self.act = nn.GELU() if activate else nn.Identity()

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        h, w = feature_map.shape[-2:]
        # OFAKD asserts even sides; an odd side gets one zero row/column so that every token is kept
        x = F.pad(feature_map, (0, w % 2, 0, h % 2))
        # channel order of Swin's patch merging: (even, even), (odd, even), (even, odd), (odd, odd) as (row, col)
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        grid = tuple(x.shape[-2:])
        return to_map(self.act(self.reduction(self.norm(to_tokens(x)))), grid)


class TokenBranch(nn.Module):
    """Token stage: patch merges toward the stride-32 grid, pre-norm ViT blocks, class token or mean, head."""

    def __init__(self, channels: int, num_merges: int, width: int, num_blocks: int, num_classes: int,
                 num_prefix_tokens: int, class_token: bool):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.class_token = class_token
        self.merges = nn.Sequential(*[
            PatchMerge(channels if i == 0 else width, width, activate=num_merges == 1 or i < num_merges - 1)
            for i in range(num_merges)])
        # with no merge to change the width, a per-token linear does it
        self.token_proj = nn.Linear(channels, width, bias=False) if num_merges == 0 and channels != width else None
        self.blocks = nn.Sequential(*[
            Block(width, TOKEN_BRANCH_HEADS, mlp_ratio=4.0, qkv_bias=False, norm_layer=nn.LayerNorm)
            for _ in range(num_blocks)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, feature_map: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens = to_tokens(self.merges(feature_map))
        if self.token_proj is not None:
            tokens = self.token_proj(tokens)
        if self.num_prefix_tokens:
            if prefix is None:
                raise RuntimeError('the student has prefix tokens but the feature adapter returned none')
            tokens = torch.cat([prefix, tokens], dim=1)
        tokens = self.blocks(tokens)
        pooled = tokens[:, 0] if self.class_token else tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return self.head(pooled)


def init_branch(branch: nn.Module):
    for m in branch.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- distiller
def _as_list(value, kind, flag):
    """A YAML scalar arrives as a bare number; the command line gives a list."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        return [kind(v) for v in values]
    except (TypeError, ValueError):
        raise DistillerError(f'{flag} takes numbers, got {value!r}') from None


class OFA(Distiller):
    """L = w_gt * CE + w_kd * ofa(z_s, eps_last) + w_ofa * sum_s ofa(branch_s(F_s), eps_s)."""
    name = 'ofa'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--ofa-eps', type=float, nargs='+', default=[1.0], metavar='EPS',
                            help='target-enhancement exponent: one value for every term, or one per '
                                 '--ofa-stage followed by the one of the final logits (default: 1)')
        add_stage_arg(parser, '--ofa-stage', 'student stages (1-based) that get a branch', as_in='OFAKD')
        parser.add_argument('--ofa-loss-weight', type=float, default=1.0, metavar='W',
                            help='weight on the sum of the branch losses (default: 1)')
        parser.add_argument('--ofa-temperature', type=float, default=1.0, metavar='T',
                            help='temperature of every ofa term (default: 1)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        try:
            student_desc = self.student_adapter.description
            teacher_desc = self.teacher_adapter.description
        except ValueError as e:
            raise DistillerError(f'ofa cannot read this model: {e}') from None
        requested = getattr(args, 'ofa_stage', None)
        stages = _as_list(requested, int, '--ofa-stage') if requested is not None else \
            list(range(1, student_desc.num_stages + 1))
        eps = _as_list(getattr(args, 'ofa_eps', [1.0]), float, '--ofa-eps')
        self.ofa_loss_weight = float(getattr(args, 'ofa_loss_weight', 1.0))
        self.temperature = float(getattr(args, 'ofa_temperature', 1.0))
        student_name = type(student).__name__

        if not stages:
            raise DistillerError('--ofa-stage needs at least one stage')
        if len(set(stages)) != len(stages):
            raise DistillerError(f'--ofa-stage lists a stage twice: {stages}')
        if len(eps) not in (1, len(stages) + 1):
            raise DistillerError(
                f'--ofa-eps has {len(eps)} values; give 1, or {len(stages) + 1} (one per each of the '
                f'{len(stages)} stages of --ofa-stage, then one for the final logits)')
        if any(not e > 0 for e in eps):
            raise DistillerError(f'--ofa-eps values must be positive, got {eps}')
        if not self.temperature > 0:
            raise DistillerError(f'--ofa-temperature must be positive, got {self.temperature}')
        eps = eps * (len(stages) + 1) if len(eps) == 1 else eps
        self.stages = tuple(stages)
        self.stage_eps = tuple(eps[:-1])
        self.logit_eps = eps[-1]

        available = list(range(1, student_desc.num_stages + 1))
        missing = [s for s in stages if s not in available]
        if missing:
            raise DistillerError(
                f'--ofa-stage {" ".join(map(str, stages))} names stage(s) {missing} that the student '
                f'{student_name} does not have; it has stages {" ".join(map(str, available))}')
        num_classes = student_desc.num_classes
        if num_classes <= 0:
            raise DistillerError(f'ofa needs a student with a classifier, and {student_name} has none')
        if teacher_desc.num_classes != num_classes:
            raise DistillerError(f'the teacher predicts {teacher_desc.num_classes} classes and the student '
                                 f'{num_classes}; build both with the same --num-classes')

        student_width = student_desc.pre_logits_dim
        teacher_width = teacher_desc.pre_logits_dim
        num_prefix = student_desc.num_prefix_tokens if student_desc.layout == 'tokens' else 0
        class_token = num_prefix > 0 and getattr(student, 'cls_token', None) is not None
        final_grid = student_desc.stage(student_desc.num_stages).grid
        image_hw = student_desc.input_size[-2:]
        token_target = tuple(max(math.ceil(side / TOKEN_BRANCH_REDUCTION), 1) for side in image_hw)

        branches = {}
        for s in stages:
            tap = student_desc.stage(s)
            if student_desc.layout == 'tokens':
                if student_width % TOKEN_BRANCH_HEADS:
                    raise DistillerError(
                        f'ofa token branches run {TOKEN_BRANCH_HEADS}-head attention at the student width '
                        f'{student_width}, which {TOKEN_BRANCH_HEADS} does not divide')
                if num_prefix and tap.channels != student_width:
                    raise DistillerError(
                        f'stage {s} of {student_name} is {tap.channels} wide but its prefix tokens must '
                        f'enter the branch at the pre-logits width {student_width}')
                branch = TokenBranch(tap.channels, merges_to(tap.grid, token_target), student_width,
                                     max(4 - s, 1), num_classes, num_prefix, class_token)
            else:
                branch = MapBranch(tap.channels, halvings_to(tap.grid, final_grid),
                                   max(student_width, teacher_width), num_classes)
            init_branch(branch)
            branches[f'stage{s}'] = branch
        self.branches = nn.ModuleDict(branches)
        self.request = FeatureRequest(stages=self.stages, prefix_tokens=num_prefix > 0)

    def forward(self, images, labels, epoch=0):
        teacher_logits = self.teacher_forward(images).logits
        features = self.student_forward(images, self.request)
        student_logits = features.logits
        target_mask = F.one_hot(hard_targets(labels), student_logits.shape[-1])
        losses = {
            'loss_gt': self.gt_loss(student_logits, labels),
            'loss_kd': self.kd_loss_weight * ofa_loss(
                student_logits, teacher_logits, target_mask, self.logit_eps, self.temperature),
        }
        for s, eps in zip(self.stages, self.stage_eps):
            branch_logits = self.branches[f'stage{s}'](features.stages[s], features.prefix.get(s))
            losses[f'loss_ofa_s{s}'] = self.ofa_loss_weight * ofa_loss(
                branch_logits, teacher_logits, target_mask, eps, self.temperature)
        return student_logits, losses
