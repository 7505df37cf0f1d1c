"""WSLD: Zhou et al., "Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff
Perspective" (ICLR 2021). Spec: docs/methods/logit.md §3.

Soft-label cross-entropy at temperature tau, weighted per sample by how much worse the student fits the
label than the teacher does.
"""
import torch
import torch.nn.functional as F

from .base import Distiller, DistillerError, float32_loss, hard_targets


def wsld_sample_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        target: torch.Tensor) -> torch.Tensor:
    """w_b = 1 - exp(-max(CE^s_b / (CE^t_b + 1e-7), 0)) at tau = 1, detached: a (B,) tensor in [0, 1)."""
    with float32_loss(student_logits.device.type):
        index = target.long().view(-1, 1)
        ce_s = -F.log_softmax(student_logits.detach().float(), dim=-1).gather(1, index).squeeze(1)
        ce_t = -F.log_softmax(teacher_logits.detach().float(), dim=-1).gather(1, index).squeeze(1)
        ratio = ce_s / (ce_t + 1e-7)
        # -expm1(-r) = 1 - exp(-r), exact near r = 0; it reaches 1.0 only by float32 rounding (r > ~17)
        return -torch.expm1(-ratio.clamp(min=0.0))


def wsld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float, alpha: float) -> torch.Tensor:
    """alpha * tau^2 * mean_b w_b * (-sum_i p^t_i log p^s_i) at temperature tau (the paper's CE form)."""
    t = float(temperature)
    with float32_loss(student_logits.device.type):
        log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
        pt = F.softmax(teacher_logits.float() / t, dim=-1)
        soft_ce = -(pt * log_ps).sum(dim=-1)
        weights = wsld_sample_weights(student_logits, teacher_logits, target)
        return alpha * (t * t) * (weights * soft_ce).mean()


class WSLD(Distiller):
    """Total = CE + kd_loss_weight * wsld_loss, logged as loss_wsld."""
    teacher_logits_only = True
    name = 'wsld'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--wsld-alpha', type=float, default=2.25, metavar='A',
                            help='wsld: loss weight (default: 2.25, cls_KD; its ImageNet configs use 2.5)')
        parser.add_argument('--wsld-temperature', type=float, default=4.0, metavar='T',
                            help='wsld: softmax temperature (default: 4; cls_KD ImageNet configs use 2)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.alpha = float(args.wsld_alpha)
        self.temperature = float(args.wsld_temperature)
        if self.temperature <= 0:
            raise DistillerError(f'--wsld-temperature must be positive, got {self.temperature}')

    def forward(self, images, labels, epoch=0):
        teacher_logits = self.teacher_forward(images).logits
        student_logits = self.student(images)
        wsld = wsld_loss(student_logits, teacher_logits, hard_targets(labels), self.temperature, self.alpha)
        losses = {
            'loss_gt': self.gt_loss(student_logits, labels),
            'loss_wsld': self.kd_loss_weight * wsld,
        }
        return student_logits, losses
