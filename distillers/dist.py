"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022). Spec: docs/methods/others.md §5.

Matches relations instead of probabilities: the Pearson correlation between student and teacher
predictions of each sample across classes (inter-class) and of each class across the batch (intra-class).
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from .base import Distiller, DistillerError, float32_loss


def mean_pearson(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Pearson correlation of a and b along `dim` (1e-8 added to the product of the norms), averaged."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    # eps on the product as in the spec (F.cosine_similarity clamps each norm separately instead)
    norms = torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim)
    return ((a * b).sum(dim=dim) / (norms + 1e-8)).mean()


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra) relation distances, each 1 - mean Pearson correlation, in [0, 2], without tau^2."""
    t = float(temperature)
    with float32_loss(student_logits.device.type):
        ps = F.softmax(student_logits.float() / t, dim=-1)
        pt = F.softmax(teacher_logits.float() / t, dim=-1)
        inter = 1.0 - mean_pearson(ps, pt, dim=1)
        intra = 1.0 - mean_pearson(ps, pt, dim=0)
        return inter, intra


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float,
              temperature: float) -> torch.Tensor:
    """beta * tau^2 * inter + gamma * tau^2 * intra, over this process's batch."""
    t = float(temperature)
    inter, intra = dist_terms(student_logits, teacher_logits, t)
    return (t * t) * (beta * inter + gamma * intra)


class DIST(Distiller):
    """Total = CE + kd_loss_weight * dist_loss, logged as loss_dist_inter and loss_dist_intra."""
    teacher_logits_only = True
    name = 'dist'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--dist-beta', type=float, default=1.0, metavar='B',
                            help='dist: weight of the inter-class relation (default: 1)')
        parser.add_argument('--dist-gamma', type=float, default=1.0, metavar='G',
                            help='dist: weight of the intra-class relation (default: 1)')
        parser.add_argument('--dist-temperature', '--dist-tau', dest='dist_temperature', type=float,
                            default=1.0, metavar='T',
                            help='dist: softmax temperature; --dist-tau is the OFAKD spelling (default: 1)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.beta = float(args.dist_beta)
        self.gamma = float(args.dist_gamma)
        self.temperature = float(args.dist_temperature)
        if self.temperature <= 0:
            raise DistillerError(f'--dist-temperature must be positive, got {self.temperature}')

    def forward(self, images, labels, epoch=0):
        teacher_logits = self.teacher_forward(images).logits
        student_logits = self.student(images)
        inter, intra = dist_terms(student_logits, teacher_logits, self.temperature)
        scale = self.kd_loss_weight * self.temperature ** 2
        losses = {
            'loss_gt': self.gt_loss(student_logits, labels),
            'loss_dist_inter': scale * self.beta * inter,
            'loss_dist_intra': scale * self.gamma * intra,
        }
        return student_logits, losses
