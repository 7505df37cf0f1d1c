"""ViTKD: Yang et al., "ViTKD: Practical Guidelines for ViT Feature Knowledge Distillation" (arXiv 2022), the
official cls_KD method, and ViTKD + NKD, the combination every shipped cls_KD DeiT config trains. Spec: docs/methods/feature.md §3
(NKD: docs/methods/logit.md §4)."""
import math
from typing import Dict, Optional

import torch
import torch.nn as nn

from models.features import FeatureRequest, Features, to_map, to_tokens

from .base import Distiller, DistillerError, float32_loss, hard_targets
from .kernels.squared_error import squared_error_sum
from .mgd import Generator
from .nkd import nkd_loss

SHALLOW_BLOCKS = (0, 1)


def vitkd_mimic_loss(student_low: torch.Tensor, teacher_low: torch.Tensor) -> torch.Tensor:
    """Shallow-layer mimicking: aligned student vs teacher tokens (B, L, N, D), sum of squared errors / B."""
    with float32_loss(student_low.device.type):
        return squared_error_sum(student_low, teacher_low) / student_low.shape[0]


def vitkd_generation_loss(generated: torch.Tensor, teacher_high: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Deep-layer generation: squared error of the generated tokens (B, N, D) against the teacher's, summed over
    the masked tokens only (mask (B, N): 1 masked, 0 kept), divided by B."""
    with float32_loss(generated.device.type):
        per_token = (generated.float() - teacher_high.float()).pow(2).sum(dim=-1)
        return (per_token * mask.float()).sum() / generated.shape[0]


def random_token_mask(batch: int, num_tokens: int, masked_fraction: float, device=None) -> torch.Tensor:
    """(B, N) with exactly N - floor(N * (1 - masked_fraction)) ones (masked) per row, drawn independently per
    sample: the tokens with the smallest uniform noise are kept."""
    keep = math.floor(num_tokens * (1.0 - masked_fraction))
    noise = torch.rand(batch, num_tokens, device=device)
    kept = noise.argsort(dim=1)[:, :keep]
    return torch.ones(batch, num_tokens, device=device).scatter_(1, kept, 0.0)


def _linear_or_identity(in_features: int, out_features: int) -> nn.Module:
    return nn.Identity() if in_features == out_features else nn.Linear(in_features, out_features)


class ViTKD(Distiller):
    """Total = CE + alpha * L_mimic(blocks 0, 1) + (beta / lambda) * L_generation(last block, masked tokens)."""
    name = 'vitkd'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--vitkd-alpha', type=float, default=3e-5, metavar='A',
                            help='weight of the shallow-layer mimicking loss (default: 3e-5)')
        parser.add_argument('--vitkd-beta', type=float, default=3e-6, metavar='B',
                            help='weight of the deep-layer generation loss, divided by lambda (default: 3e-6)')
        parser.add_argument('--vitkd-lambda', type=float, default=0.5, metavar='L',
                            help='fraction of patch tokens masked per sample (default: 0.5)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.alpha = float(args.vitkd_alpha)
        self.beta = float(args.vitkd_beta)
        self.lam = float(args.vitkd_lambda)
        if not 0.0 < self.lam <= 1.0:
            raise DistillerError(f'--vitkd-lambda is a fraction of tokens and must lie in (0, 1], not {self.lam}')
        # block taps exist only on plain token models (ViT, DeiT, Mixer): the adapter refuses any other
        self.request = FeatureRequest(blocks=SHALLOW_BLOCKS, final=True)
        self.check_features(self.request)
        student_tokens, teacher_tokens = self.final_maps_on_one_grid(
            '{name} compares patch tokens one to one, but at input size {size} the student has a {student} patch '
            'grid and the teacher a {teacher} one; use the same patch size')
        self.grid = teacher_tokens.grid
        d_s, d_t = student_tokens.channels, teacher_tokens.channels
        self.align_low = nn.ModuleList([_linear_or_identity(d_s, d_t) for _ in SHALLOW_BLOCKS])
        self.align_high = _linear_or_identity(d_s, d_t)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_t))
        self.generation = Generator(d_t)

    def draw_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        return random_token_mask(batch, self.grid[0] * self.grid[1], self.lam, device)

    def generate(self, student_high: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Align (B, N, D_s) tokens, put the mask token at masked positions, regenerate through G: (B, N, D_t)."""
        aligned = self.align_high(student_high)
        masked = mask.unsqueeze(-1).to(aligned.dtype)
        tokens = aligned * (1.0 - masked) + self.mask_token.to(aligned.dtype) * masked
        return to_tokens(self.generation(to_map(tokens, self.grid)))

    def compute_losses(self, student: Features, teacher: Features, labels: torch.Tensor,
                       mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        student_low = torch.stack([align(to_tokens(student.blocks[b]))
                                   for align, b in zip(self.align_low, SHALLOW_BLOCKS)], dim=1)
        teacher_low = torch.stack([to_tokens(teacher.blocks[b]) for b in SHALLOW_BLOCKS], dim=1)
        generated = self.generate(to_tokens(student.final), mask)
        return {
            'loss_gt': self.gt_loss(student.logits, labels),
            'loss_vitkd_mimic': self.alpha * vitkd_mimic_loss(student_low, teacher_low),
            'loss_vitkd_gen': self.beta / self.lam * vitkd_generation_loss(generated, to_tokens(teacher.final), mask),
        }

    def forward(self, images, labels, epoch=0, mask: Optional[torch.Tensor] = None):
        teacher = self.teacher_forward(images, self.request)
        student = self.student_forward(images, self.request)
        if mask is None:
            mask = self.draw_mask(images.shape[0], images.device)
        return student.logits, self.compute_losses(student, teacher, labels, mask)


class ViTKDNKD(ViTKD):
    """ViTKD plus NKD's logit term (--nkd-temperature, --nkd-gamma, declared by NKD), weighted by --kd-loss-weight."""
    name = 'vitkd_nkd'

    @classmethod
    def add_args(cls, parser):
        """Every flag it reads is declared by ViTKD and NKD already."""

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.nkd_temperature = float(args.nkd_temperature)
        self.nkd_gamma = float(args.nkd_gamma)

    def compute_losses(self, student, teacher, labels, mask):
        losses = super().compute_losses(student, teacher, labels, mask)
        losses['loss_nkd'] = self.kd_loss_weight * nkd_loss(student.logits, teacher.logits, hard_targets(labels),
                                                            self.nkd_temperature, self.nkd_gamma)
        return losses
