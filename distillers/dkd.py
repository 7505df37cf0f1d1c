"""DKD: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022). Spec: docs/methods/logit.md §2, flags:
docs/methods/others.md §4.

KD split into a target-vs-rest binary KL (TCKD) and a KL over the non-target classes only (NCKD).
"""
from typing import Tuple

import torch

from .base import Distiller, DistillerError, class_mask, float32_loss, hard_targets
from .logit_standardization import add_logit_standardize_arg, distillation_logits


def dkd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                   temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD_b, NCKD_b), each a (B,) float32 tensor that already carries tau^2."""
    t = float(temperature)
    with float32_loss(student_logits.device.type):
        zs = student_logits.float() / t
        zt = teacher_logits.float() / t
        index = target.long().unsqueeze(1)
        is_target = class_mask(index, zs.shape[1])

        def log_probs(z):
            # (log p_y, log(1 - p_y), non-target log-softmax) from logsumexps: no log of a sum that can underflow
            # to 0. The target column is not deleted (boolean indexing would wait for the GPU); it is taken out
            # of the non-target normalizer by a -inf fill, and its entry of the non-target log-softmax is unused.
            log_norm = torch.logsumexp(z, dim=-1, keepdim=True)
            log_norm_rest = torch.logsumexp(z.masked_fill(is_target, float('-inf')), dim=-1, keepdim=True)
            log_target = (z.gather(1, index) - log_norm).clamp(max=0.0)
            log_rest = (log_norm_rest - log_norm).clamp(max=0.0)
            return torch.cat([log_target, log_rest], dim=-1), z - log_norm_rest

        (log_bs, log_ps_rest), (log_bt, log_pt_rest) = log_probs(zs), log_probs(zt)
        tckd = (log_bt.exp() * (log_bt - log_bs)).sum(dim=-1)
        # the non-target distributions, with the target column weighted by 0: as if it were deleted
        pt_rest = log_pt_rest.exp().masked_fill(is_target, 0.0)
        nckd = (pt_rest * (log_pt_rest - log_ps_rest)).sum(dim=-1)
        return tckd * (t * t), nckd * (t * t)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD, each a batchmean KL times tau^2; `target` holds class indices (B,)."""
    tckd, nckd = dkd_per_sample(student_logits, teacher_logits, target, temperature)
    return alpha * tckd.mean() + beta * nckd.mean()


def dkd_warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """min(e / W, 1) with e = epoch + 1 (mdistiller counts epochs from 1); W = 0 disables the ramp."""
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)


class DKD(Distiller):
    """Total = CE + w(e) * kd_loss_weight * (alpha * TCKD + beta * NCKD), logged as loss_tckd and loss_nckd.

    With --logit-standardize both terms see the z-scored logits and --dkd-temperature is the base temperature
    (docs/methods/logit2.md §1); the target index and the CE term are unchanged."""
    teacher_logits_only = True
    accepts_logit_standardize = True
    name = 'dkd'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--dkd-alpha', type=float, default=1.0, metavar='A',
                            help='dkd: weight of the target-class term TCKD (default: 1)')
        parser.add_argument('--dkd-beta', type=float, default=2.0, metavar='B',
                            help='dkd: weight of the non-target term NCKD (default: 2, as OFAKD; '
                                 'mdistiller ImageNet R34->R18 uses 0.5)')
        parser.add_argument('--dkd-temperature', type=float, default=1.0, metavar='T',
                            help='dkd: softmax temperature (default: 1)')
        parser.add_argument('--dkd-warmup', type=int, default=0, metavar='W',
                            help='dkd: ramp the loss by min((epoch+1)/W, 1); 0 = no ramp (default: 0)')
        add_logit_standardize_arg(parser)

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.alpha = float(args.dkd_alpha)
        self.beta = float(args.dkd_beta)
        self.temperature = float(args.dkd_temperature)
        self.warmup_epochs = int(args.dkd_warmup)
        if self.temperature <= 0:
            raise DistillerError(f'--dkd-temperature must be positive, got {self.temperature}')
        if self.warmup_epochs < 0:
            raise DistillerError(f'--dkd-warmup must be 0 (off) or a positive number of epochs, '
                                 f'got {self.warmup_epochs}')

    def forward(self, images, labels, epoch=0):
        teacher_logits = self.teacher_forward(images).logits
        student_logits = self.student(images)
        dkd_student, dkd_teacher = distillation_logits(student_logits, teacher_logits, self.logit_standardize)
        tckd, nckd = dkd_per_sample(dkd_student, dkd_teacher, hard_targets(labels), self.temperature)
        scale = self.kd_loss_weight * dkd_warmup_factor(epoch, self.warmup_epochs)
        losses = {
            'loss_gt': self.gt_loss(student_logits, labels),
            'loss_tckd': scale * self.alpha * tckd.mean(),
            'loss_nckd': scale * self.beta * nckd.mean(),
        }
        return student_logits, losses
