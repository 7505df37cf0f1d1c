"""MLKD: Jin, Wang, Lin, "Multi-Level Logit Distillation" (CVPR 2023). Spec: docs/methods/logit2.md §2.

Logit distillation at three levels, each summed over several temperatures: per sample (KL), per class (class
Gram matrices of the predictions) and per batch (sample Gram matrices), on a weak and a strong view of each
image. The two-view batch is declared by `two_view = True` (distillers/base.py); its strong view is the training
transform plus the RandAugment of data/mlkd_augment.py.

As in the published code, the teacher-confidence masks act as scalars: each level is multiplied by the fraction
m (samples) or c (classes) of confidences at or below their median, not restricted to those samples or classes.
The strong pair enters the instance level at the first `strong_count` temperatures only; at the others the weak
pair enters a second time (the original's choice, reproduced by the default 3 of 5).
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from data.mixup import mixup_requested

from .base import Distiller, DistillerError, float32_loss
from .kd import kd_loss
from .logit_standardization import add_logit_standardize_arg, standardize_logits

DEFAULT_TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)


def mlkd_confidence(teacher_logits_weak: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(m, c): the fractions of samples and of classes whose teacher confidence is at or below the median.

    Sample confidence: the largest softmax probability of the raw teacher logits (temperature 1); class
    confidence: the sum of a class's probabilities over the batch. Medians interpolate linearly (numpy's
    percentile 50), on the device."""
    with float32_loss(teacher_logits_weak.device.type):
        q = F.softmax(teacher_logits_weak.detach().float(), dim=-1)
        sample = q.amax(dim=-1)
        per_class = q.sum(dim=0)
        m = (sample <= torch.quantile(sample, 0.5)).float().mean()
        c = (per_class <= torch.quantile(per_class, 0.5)).float().mean()
        return m, c


def _prediction_gram_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                          over_classes: bool) -> torch.Tensor:
    """||G_t - G_s||_F^2 / n for the Gram matrices G of the predictions P = softmax(z / T) (B x K): P^T P (n = K)
    over classes, P P^T (n = B) over samples. No T^2."""
    t = float(temperature)
    with float32_loss(student_logits.device.type):
        ps = F.softmax(student_logits.float() / t, dim=-1)
        pt = F.softmax(teacher_logits.float() / t, dim=-1)
        if over_classes:
            ps, pt = ps.t(), pt.t()
        return (pt @ pt.t() - ps @ ps.t()).pow(2).sum() / ps.shape[0]


def class_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """||P_t^T P_t - P_s^T P_s||_F^2 / K for P = softmax(z / T) (B x K): class Gram matrices, no T^2."""
    return _prediction_gram_loss(student_logits, teacher_logits, temperature, over_classes=True)


def batch_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """||P_t P_t^T - P_s P_s^T||_F^2 / B for P = softmax(z / T) (B x K): sample Gram matrices, no T^2."""
    return _prediction_gram_loss(student_logits, teacher_logits, temperature, over_classes=False)


def mlkd_loss(student_logits_weak: torch.Tensor, student_logits_strong: torch.Tensor,
              teacher_logits_weak: torch.Tensor, teacher_logits_strong: torch.Tensor,
              temperatures: Sequence[float] = DEFAULT_TEMPERATURES, strong_count: int = 3,
              logit_standardize: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_ins, L_cls, L_bat), unweighted 0-dim float32 tensors.

    L_ins = m * sum_j KD_Tj(weak) + sum_{j <= s} KD_Tj(strong) + sum_{j > s} KD_Tj(weak)
    L_cls = c * sum_j CC_Tj(weak),  L_bat = m * sum_j BC_Tj(weak)
    KD_T is kd_loss (T^2 KL, batch mean), on z-scored logits when `logit_standardize`; the class and batch
    levels and the confidences m, c always use the raw logits."""
    temperatures = [float(t) for t in temperatures]
    if not temperatures:
        raise ValueError('mlkd_loss needs at least one temperature')
    teacher_logits_weak, teacher_logits_strong = teacher_logits_weak.detach(), teacher_logits_strong.detach()
    m, c = mlkd_confidence(teacher_logits_weak)
    kd_sw, kd_ss, kd_tw, kd_ts = student_logits_weak, student_logits_strong, teacher_logits_weak, teacher_logits_strong
    if logit_standardize:
        kd_sw, kd_ss, kd_tw, kd_ts = (standardize_logits(z) for z in (kd_sw, kd_ss, kd_tw, kd_ts))
    weak = [kd_loss(kd_sw, kd_tw, t) for t in temperatures]
    instance = m * sum(weak)
    for j, t in enumerate(temperatures):
        instance = instance + (kd_loss(kd_ss, kd_ts, t) if j < strong_count else weak[j])
    cls = c * sum(class_correlation_loss(student_logits_weak, teacher_logits_weak, t) for t in temperatures)
    bat = m * sum(batch_correlation_loss(student_logits_weak, teacher_logits_weak, t) for t in temperatures)
    return instance, cls, bat


class MLKD(Distiller):
    """Total = w_CE * (CE(weak) + CE(strong)) + alpha * (L_ins + L_cls + L_bat), alpha = --kd-loss-weight (0.9),
    w_CE = 1 - alpha unless --gt-loss-weight is given. Logged as loss_mlkd_instance, loss_mlkd_class and
    loss_mlkd_batch. The student runs twice per step, weak view first, so that BatchNorm sees each view's own batch
    statistics as in the original; the frozen teacher (eval mode) takes both views in one pass."""
    name = 'mlkd'
    teacher_logits_only = True
    accepts_logit_standardize = True
    two_view = True
    default_kd_loss_weight = 0.9
    gt_complements_kd = True

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--mlkd-temperatures', type=float, nargs='+', default=list(DEFAULT_TEMPERATURES),
                            metavar='T', help='mlkd: the temperatures every level sums over; with '
                                              '--logit-standardize the first is the base temperature '
                                              '(default: 4 3 5 2 6)')
        parser.add_argument('--mlkd-strong-count', type=int, default=3, metavar='S',
                            help='mlkd: the instance level takes the strong view at the first S temperatures and '
                                 'the weak view again at the others; S = the number of temperatures uses the '
                                 'strong view at every one (default: 3, as the original)')
        add_logit_standardize_arg(parser)

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.temperatures = tuple(float(t) for t in args.mlkd_temperatures)
        self.strong_count = int(args.mlkd_strong_count)
        if not self.temperatures or min(self.temperatures) <= 0:
            raise DistillerError(f'--mlkd-temperatures must be one or more positive numbers, got '
                                 f'{list(self.temperatures)}')
        if not 0 <= self.strong_count <= len(self.temperatures):
            raise DistillerError(f'--mlkd-strong-count must be between 0 and the {len(self.temperatures)} '
                                 f'temperatures, got {self.strong_count}')
        if mixup_requested(args):
            raise DistillerError('mlkd trains on a weak and a strong view of each image, which one mixup/cutmix '
                                 'cannot mix alike; set --mixup 0 --cutmix 0')

    def forward(self, images, labels, epoch=0):
        batch = labels.shape[0]
        if images.shape[0] != 2 * batch:
            raise ValueError(f'mlkd expects the two-view batch (weak views, then strong views): {2 * batch} images '
                             f'for {batch} labels, got {images.shape[0]}')
        weak, strong = images[:batch], images[batch:]
        if self.teacher_train_mode:  # batch statistics: each view its own pass, as the student
            teacher_weak, teacher_strong = self.teacher_forward(weak).logits, self.teacher_forward(strong).logits
        else:
            teacher_weak, teacher_strong = self.teacher_forward(images).logits.split(batch)
        student_weak = self.student(weak)
        student_strong = self.student(strong)
        instance, cls, bat = mlkd_loss(student_weak, student_strong, teacher_weak, teacher_strong,
                                       self.temperatures, self.strong_count, self.logit_standardize)
        losses = {
            'loss_gt': self.gt_loss(student_weak, labels) + self.gt_loss(student_strong, labels),
            'loss_mlkd_instance': self.kd_loss_weight * instance,
            'loss_mlkd_class': self.kd_loss_weight * cls,
            'loss_mlkd_batch': self.kd_loss_weight * bat,
        }
        return student_weak, losses
