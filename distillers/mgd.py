"""MGD: Yang et al., "Masked Generative Distillation" (ECCV 2022), as cls_KD applies it to classification.
Spec: docs/methods/feature.md §1."""
from typing import Optional

import torch
import torch.nn as nn

from models.features import FeatureRequest

from .base import Distiller, DistillerError, float32_loss
from .kernels.squared_error import squared_error_sum


def mgd_loss(generated: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over every element of the maps, divided by the batch size (sum-SE / B)."""
    with float32_loss(generated.device.type):
        return squared_error_sum(generated, teacher_feat) / generated.shape[0]


class Generator(nn.Sequential):
    """Conv3x3 -> ReLU -> Conv3x3 at constant width: the generation block of MGD (and of ViTKD)."""

    def __init__(self, channels: int):
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )


class MGD(Distiller):
    """Total = CE + alpha * mgd_loss(G(align(f_s) * M), f_t), M a fresh per-sample channel mask."""
    name = 'mgd'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--mgd-alpha', type=float, default=7e-5, metavar='A',
                            help='weight of the mgd generation loss (default: 7e-5)')
        parser.add_argument('--mgd-lambda', type=float, default=0.15, metavar='L',
                            help='fraction of teacher channels masked per sample (default: 0.15)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.alpha = float(args.mgd_alpha)
        self.lam = float(args.mgd_lambda)
        if not 0.0 <= self.lam <= 1.0:
            raise DistillerError(f'--mgd-lambda is a fraction of channels and must lie in [0, 1], not {self.lam}')
        # the last-stage map before pooling (for a CNN, forward_features = its last stage)
        self.request = FeatureRequest(final=True)
        self.check_features(self.request)
        student_map, teacher_map = self.final_maps_on_one_grid(
            '{name} compares the last-stage maps position by position, but at input size {size} the student map is '
            '{student} and the teacher map {teacher}; pick a pair with equal grids')
        self.teacher_channels = teacher_map.channels
        if student_map.channels == teacher_map.channels:
            self.align = nn.Identity()
        else:
            self.align = nn.Conv2d(student_map.channels, teacher_map.channels, kernel_size=1)
        self.generation = Generator(teacher_map.channels)

    def draw_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, C_t, 1, 1): 0 for a dropped channel (probability lambda), 1 otherwise."""
        return (torch.rand(batch, self.teacher_channels, 1, 1, device=device) >= self.lam).float()

    def forward(self, images, labels, epoch=0, mask: Optional[torch.Tensor] = None):
        teacher = self.teacher_forward(images, self.request)
        student = self.student_forward(images, self.request)
        aligned = self.align(student.final)
        if mask is None:
            mask = self.draw_mask(aligned.shape[0], aligned.device)
        generated = self.generation(aligned * mask.to(aligned.dtype))
        losses = {
            'loss_gt': self.gt_loss(student.logits, labels),
            'loss_mgd': self.alpha * mgd_loss(generated, teacher.final),
        }
        return student.logits, losses
