"""RKD: Park, Kim, Lu, Cho, "Relational Knowledge Distillation" (CVPR 2019), as OFAKD (and RepDistiller) compute it
on the pooled pre-logits features: distances between samples and angles between sample triples.
Spec: docs/methods/others.md §8."""
import argparse
from typing import Tuple

import torch
import torch.nn.functional as F

from models.features import FeatureRequest

from .base import Distiller, DistillerError, float32_loss


def normalized_distances(feats: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """(B, B) Euclidean distances (squared if asked), each clamped below at eps before the root, the diagonal
    set to 0, divided by the mean of the positive entries."""
    sq_norms = feats.pow(2).sum(dim=1)
    d = (sq_norms.unsqueeze(1) + sq_norms.unsqueeze(0) - 2.0 * feats @ feats.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    eye = torch.eye(d.shape[0], dtype=torch.bool, device=d.device)
    d = d.masked_fill(eye, 0.0)
    # the mean of the positive entries without boolean indexing (which waits for the device): every entry is >= 0
    positive = (d > 0).sum().clamp(min=1)
    return d / (d.sum() / positive)


def triplet_angles(feats: torch.Tensor) -> torch.Tensor:
    """(B, B, B): entry (i, j, k) is the cosine of the angle at sample i between samples j and k; 0 where j or k
    is i (F.normalize maps the zero difference to 0)."""
    directions = F.normalize(feats.unsqueeze(0) - feats.unsqueeze(1), p=2, dim=2)  # [i, j] = n(f_j - f_i)
    return torch.bmm(directions, directions.transpose(1, 2))


def rkd_terms(student_feats: torch.Tensor, teacher_feats: torch.Tensor, squared: bool = False,
              eps: float = 1e-12) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L_D, L_A): SmoothL1 (beta 1, mean) between the models' normalized distance matrices and their angle
    tensors. The teacher side carries no gradient."""
    if student_feats.shape[0] != teacher_feats.shape[0]:
        raise ValueError(f'rkd needs one feature row per sample from both models, got {student_feats.shape[0]} and '
                         f'{teacher_feats.shape[0]} rows')
    with float32_loss(student_feats.device.type):
        fs = student_feats.float().flatten(1)
        with torch.no_grad():
            ft = teacher_feats.float().flatten(1)
            teacher_distances = normalized_distances(ft, squared, eps)
            teacher_angles = triplet_angles(ft)
        distance = F.smooth_l1_loss(normalized_distances(fs, squared, eps), teacher_distances)
        angle = F.smooth_l1_loss(triplet_angles(fs), teacher_angles)
        return distance, angle


def rkd_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, distance_weight: float, angle_weight: float,
             squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """w_D * L_D + w_A * L_A on pooled features (B, D_s) and (B, D_t)."""
    distance, angle = rkd_terms(student_feats, teacher_feats, squared, eps)
    return distance_weight * distance + angle_weight * angle


class RKD(Distiller):
    """Total = w_gt * CE + w_kd * (w_D * L_D + w_A * L_A), logged as loss_rkd_distance and loss_rkd_angle."""
    name = 'rkd'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--rkd-distance-weight', type=float, default=25.0, metavar='W',
                            help='rkd: weight of the distance term (default: 25)')
        parser.add_argument('--rkd-angle-weight', type=float, default=50.0, metavar='W',
                            help='rkd: weight of the angle term (default: 50)')
        parser.add_argument('--rkd-squared', action=argparse.BooleanOptionalAction, default=False,
                            help='rkd: squared distances instead of distances (default: off)')
        parser.add_argument('--rkd-eps', type=float, default=1e-12, metavar='EPS',
                            help='rkd: lower clamp of the squared distances (default: 1e-12)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.distance_weight = float(args.rkd_distance_weight)
        self.angle_weight = float(args.rkd_angle_weight)
        self.squared = bool(args.rkd_squared)
        self.eps = float(args.rkd_eps)
        if self.eps < 0:
            raise DistillerError(f'--rkd-eps must be 0 or positive, got {self.eps:g}')
        self.request = FeatureRequest(pre_logits=True)
        self.check_features(self.request)

    def forward(self, images, labels, epoch=0):
        teacher = self.teacher_forward(images, self.request)
        student = self.student_forward(images, self.request)
        distance, angle = rkd_terms(student.pre_logits, teacher.pre_logits, self.squared, self.eps)
        losses = {
            'loss_gt': self.gt_loss(student.logits, labels),
            'loss_rkd_distance': self.kd_loss_weight * self.distance_weight * distance,
            'loss_rkd_angle': self.kd_loss_weight * self.angle_weight * angle,
        }
        return student.logits, losses
