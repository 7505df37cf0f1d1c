"""KD: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015). Spec: docs/methods/logit.md §1."""
import torch
import torch.nn.functional as F

from .base import Distiller, float32_loss
from .logit_standardization import add_logit_standardize_arg, distillation_logits


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(p_teacher || p_student) at temperature tau, summed over classes, mean over the batch."""
    t = float(temperature)
    with float32_loss(student_logits.device.type):
        log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
        return kl.mean() * (t * t)


class KD(Distiller):
    """Total = (1 - alpha) * CE + alpha * kd_loss, alpha = --kd-loss-weight (default 0.5).

    With --logit-standardize, kd_loss sees the z-scored logits of both models and --kd-temperature is the base
    temperature (docs/methods/logit2.md §1); the CE term keeps the raw logits."""
    teacher_logits_only = True
    accepts_logit_standardize = True
    name = 'kd'
    default_kd_loss_weight = 0.5
    gt_complements_kd = True

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--kd-temperature', type=float, default=1.0, metavar='T',
                            help='temperature of kd, and of the logit term of ufd/scalekd where '
                                 '--ufd-temperature/--scalekd-temperature is not given (default: 1)')
        add_logit_standardize_arg(parser)

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.temperature = float(args.kd_temperature)

    def forward(self, images, labels, epoch=0):
        teacher_logits = self.teacher_forward(images).logits
        student_logits = self.student(images)
        kd_student, kd_teacher = distillation_logits(student_logits, teacher_logits, self.logit_standardize)
        losses = {
            'loss_gt': self.gt_loss(student_logits, labels),
            'loss_kd': self.kd_loss_weight * kd_loss(kd_student, kd_teacher, self.temperature),
        }
        return student_logits, losses
