"""Correlation ("CC"): Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019), in the form
RepDistiller and OFAKD compute it: linear embeddings of the pooled features of both models, and the products of
the absolute embedding differences of consecutive samples. Spec: docs/methods/others.md §9."""
import torch
import torch.nn as nn

from models.features import FeatureRequest

from .base import Distiller, DistillerError, float32_loss


def correlation_loss(student_embeds: torch.Tensor, teacher_embeds: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * mean over i < B of sum_j delta[i, j] * delta[i + 1, j], delta = |e_s - e_t| of shape (B, d).

    It couples consecutive samples, so it depends on the batch order (the original's definition)."""
    if student_embeds.shape != teacher_embeds.shape:
        raise ValueError(f'correlation needs embeddings of one shape, got {tuple(student_embeds.shape)} and '
                         f'{tuple(teacher_embeds.shape)}')
    if student_embeds.shape[0] < 2:
        raise ValueError(f'correlation couples consecutive samples and needs a batch of at least 2, got '
                         f'{student_embeds.shape[0]}')
    with float32_loss(student_embeds.device.type):
        delta = (student_embeds.float() - teacher_embeds.float()).abs()
        return scale * (delta[:-1] * delta[1:]).sum(dim=1).mean()


class Correlation(Distiller):
    """Total = w_gt * CE + w_kd * correlation_loss(W_s f_s + b_s, W_t f_t + b_t, c); both embeddings train."""
    name = 'correlation'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--correlation-feat-dim', type=int, default=128, metavar='D',
                            help='correlation: width of the two linear embeddings (default: 128)')
        parser.add_argument('--correlation-scale', type=float, default=0.02, metavar='C',
                            help='correlation: factor of the loss (default: 0.02)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.scale = float(args.correlation_scale)
        feat_dim = int(args.correlation_feat_dim)
        if feat_dim < 1:
            raise DistillerError(f'--correlation-feat-dim must be a positive width, got {feat_dim}')
        self.request = FeatureRequest(pre_logits=True)
        self.check_features(self.request)
        self.embed_student = nn.Linear(self.student_adapter.description.pre_logits_dim, feat_dim)
        # trained like the student's although the teacher is frozen: it sees the teacher's constant features
        self.embed_teacher = nn.Linear(self.teacher_adapter.description.pre_logits_dim, feat_dim)

    def forward(self, images, labels, epoch=0):
        teacher = self.teacher_forward(images, self.request)
        student = self.student_forward(images, self.request)
        embeds_student = self.embed_student(student.pre_logits.flatten(1))
        embeds_teacher = self.embed_teacher(teacher.pre_logits.flatten(1))
        losses = {
            'loss_gt': self.gt_loss(student.logits, labels),
            'loss_correlation': self.kd_loss_weight * correlation_loss(embeds_student, embeds_teacher, self.scale),
        }
        return student.logits, losses
