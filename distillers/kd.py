"""KD: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015). Spec: logit.md §1."""
import torch
import torch.nn.functional as F

from .base import Distiller, float32_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(p_teacher || p_student) at temperature tau, summed over classes, mean over the batch."""
    t = float(temperature)
    with float32_loss(student_logits.device.type):
        log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
        return kl.mean() * (t * t)


class KD(Distiller):
    """Total = (1 - alpha) * CE + alpha * kd_loss, alpha = --kd-loss-weight (default 0.5)."""
    teacher_logits_only = True
    name = 'kd'
    default_kd_loss_weight = 0.5
    gt_complements_kd = True

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--kd-temperature', type=float, default=1.0, metavar='T',
                            help='temperature of kd (and of the logit term of ufd/scalekd) (default: 1)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.temperature = float(args.kd_temperature)


    def forward(self, images, labels, epoch=0):
        teacher_logits = self.teacher_forward(images).logits
        student_logits = self.student(images)
        losses = {
            'loss_gt': self.gt_loss(student_logits, labels),
            'loss_kd': self.kd_loss_weight * kd_loss(student_logits, teacher_logits, self.temperature),
        }
        return student_logits, losses
