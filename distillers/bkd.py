"""BKD (binary KD), as OFAKD ships it: every class is an independent yes/no problem whose target is the teacher's
softmax probability. Spec: docs/methods/others.md §3."""
import torch
import torch.nn.functional as F

from .base import Distiller, float32_loss


def bkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean over all B*K elements of softplus(z_s) - q * z_s, q = softmax(z_t): binary cross-entropy with logits
    against the teacher's softmax, no temperature."""
    with float32_loss(student_logits.device.type):
        target = F.softmax(teacher_logits.float(), dim=-1)
        return F.binary_cross_entropy_with_logits(student_logits.float(), target)


class BKD(Distiller):
    """Total = w_gt * CE + w_kd * bkd_loss (OFAKD's defaults: both weights 1)."""
    teacher_logits_only = True
    name = 'bkd'

    def forward(self, images, labels, epoch=0):
        teacher_logits = self.teacher_forward(images).logits
        student_logits = self.student(images)
        losses = {
            'loss_gt': self.gt_loss(student_logits, labels),
            'loss_bkd': self.kd_loss_weight * bkd_loss(student_logits, teacher_logits),
        }
        return student_logits, losses
