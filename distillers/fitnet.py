"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), as OFAKD computes it, generalized to
any student/teacher pair through the adapter's stage features. Spec: docs/methods/others.md §6."""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.features import FeatureRequest

from .base import Distiller, DistillerError, add_stage_arg, float32_loss
from .kernels.squared_error import squared_error_sum


def fitnet_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Mean squared error between a regressed student map (B, C, H, W) and the teacher's map (B, C, H', W').

    Where the grids differ, each map is average-pooled to the smaller of the two (the common grid); equal grids
    are compared as they are, which is OFAKD's CNN->CNN case."""
    with float32_loss(student_feat.device.type):
        student, teacher = student_feat, teacher_feat
        grid = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
        if tuple(student.shape[-2:]) != grid:
            student = F.adaptive_avg_pool2d(student.float(), grid)
        if tuple(teacher.shape[-2:]) != grid:
            teacher = F.adaptive_avg_pool2d(teacher.float(), grid)
        # the mean of float32 squared errors, without float32 copies of bf16 maps (see squared_error_sum)
        return squared_error_sum(student, teacher) / student.numel()


class Regressor(nn.Conv2d):
    """FitNet's hint regressor: a bias-free 1x1 conv from the student's to the teacher's channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.weight, mode='fan_out', nonlinearity='relu')


class FitNet(Distiller):
    """Total = w_gt * CE + w_fit * sum over the chosen stages of fitnet_loss(regressor(F_s), F_t)."""
    name = 'fitnet'

    @classmethod
    def add_args(cls, parser):
        add_stage_arg(parser, '--fitnet-stage', 'stages (1-based, -1 = last) whose maps the student regresses')
        parser.add_argument('--fitnet-loss-weight', type=float, default=1.0, metavar='W',
                            help='weight of the summed fitnet hint losses (default: 1)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        requested = getattr(args, 'fitnet_stage', None)
        if requested is None:
            try:
                requested = range(1, self.student_adapter.description.num_stages + 1)
            except ValueError as e:
                raise DistillerError(f'fitnet cannot read the student: {e}') from None
        self.stages: Tuple[int, ...] = tuple(dict.fromkeys(int(s) for s in requested))
        self.fitnet_loss_weight = float(args.fitnet_loss_weight)
        self.request = FeatureRequest(stages=self.stages)
        self.check_features(self.request)
        student_desc = self.student_adapter.description
        teacher_desc = self.teacher_adapter.description
        self.regressors = nn.ModuleDict({
            self._key(s): Regressor(student_desc.stage(s).channels, teacher_desc.stage(s).channels)
            for s in self.stages})

    @staticmethod
    def _key(stage: int) -> str:
        return f'stage{stage}'

    def forward(self, images, labels, epoch=0):
        teacher = self.teacher_forward(images, self.request)
        student = self.student_forward(images, self.request)
        hint = sum(fitnet_loss(self.regressors[self._key(s)](student.stages[s]), teacher.stages[s])
                   for s in self.stages)
        losses = {
            'loss_gt': self.gt_loss(student.logits, labels),
            'loss_fitnet': self.fitnet_loss_weight * hint,
        }
        return student.logits, losses
