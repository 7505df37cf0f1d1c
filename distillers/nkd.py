"""NKD: Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
Normalized Loss and Customized Soft Labels" (ICCV 2023), its teacher half. Spec: docs/methods/logit.md §4.

L_t weights the student's log-probability of the label by the teacher's target probability (tau = 1);
L_nt is the cross-entropy between the teacher's and the student's distributions renormalized over the
non-target classes.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from .base import Distiller, DistillerError, class_mask, float32_loss, hard_targets


def nkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float, gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L_t, L_nt) as scalars; gamma and tau^2 are inside L_nt."""
    t = float(temperature)
    with float32_loss(student_logits.device.type):
        zs = student_logits.float()
        zt = teacher_logits.float()
        index = target.long().unsqueeze(1)
        is_target = class_mask(index, zs.shape[1])

        log_ps_target = F.log_softmax(zs, dim=-1).gather(1, index)
        pt_target = F.softmax(zt, dim=-1).gather(1, index)
        loss_target = -(pt_target * log_ps_target).mean()

        # softmax over the non-target classes = p_i / (1 - p_y): the target column is taken out of the normalizer
        # by a -inf fill and weighted by 0 (boolean indexing to delete it would wait for the GPU)
        zs_rest = zs.masked_fill(is_target, float('-inf')) / t
        log_ps_rest = zs / t - torch.logsumexp(zs_rest, dim=-1, keepdim=True)
        pt_rest = F.softmax(zt.masked_fill(is_target, float('-inf')) / t, dim=-1)
        loss_non_target = -gamma * (t * t) * (pt_rest * log_ps_rest).sum(dim=-1).mean()
        return loss_target, loss_non_target


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             temperature: float, gamma: float) -> torch.Tensor:
    """L_t + L_nt; `target` holds class indices (B,)."""
    loss_target, loss_non_target = nkd_terms(student_logits, teacher_logits, target, temperature, gamma)
    return loss_target + loss_non_target


class NKD(Distiller):
    """Total = CE + kd_loss_weight * (L_t + L_nt), logged as loss_nkd_target and loss_nkd_nontarget."""
    teacher_logits_only = True
    name = 'nkd'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--nkd-gamma', type=float, default=1.5, metavar='G',
                            help='nkd: weight of the non-target term (default: 1.5; DeiT configs use 1.0)')
        parser.add_argument('--nkd-temperature', type=float, default=1.0, metavar='T',
                            help='nkd: temperature of the non-target term; the target term is always '
                                 'at 1 (default: 1)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.gamma = float(args.nkd_gamma)
        self.temperature = float(args.nkd_temperature)
        if self.temperature <= 0:
            raise DistillerError(f'--nkd-temperature must be positive, got {self.temperature}')

    def forward(self, images, labels, epoch=0):
        teacher_logits = self.teacher_forward(images).logits
        student_logits = self.student(images)
        loss_target, loss_non_target = nkd_terms(student_logits, teacher_logits, hard_targets(labels),
                                                 self.temperature, self.gamma)
        losses = {
            'loss_gt': self.gt_loss(student_logits, labels),
            'loss_nkd_target': self.kd_loss_weight * loss_target,
            'loss_nkd_nontarget': self.kd_loss_weight * loss_non_target,
        }
        return student_logits, losses
