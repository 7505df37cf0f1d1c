"""The teacher's normalized final feature map as the target of a feature loss, beside the task loss and KD's logit
term: what UFD and ScaleKD share around their own terms.

Teacher tap: the normalized last stage (docs/methods/ufd.md §2, docs/methods/scalekd.md §2). `final` of the
adapter is `forward_features`, which already ends with the final norm for Swin, ViT/DeiT (with token pooling) and
Mixer. Some teachers normalize only the *pooled* vector instead: timm's ConvNeXt head (`head.norm` of a
NormMlpClassifierHead, pool -> LayerNorm2d -> fc) and ViTs pooled by average (`fc_norm`). For those, that same norm
is applied to every position of the final map, as if each position were a pooled vector; see `head_norm_on_map`.
"""
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import NormMlpClassifierHead

from models.features import FeatureRequest, Features
from .base import Distiller, DistillerError
from .kd import kd_loss


def head_norm_on_map(teacher: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm the teacher's head applies to its pooled vector, as a function on its (B, C, H, W) final map.

    The identity when `forward_features` is already normalized (no active `head.norm` / `fc_norm`). The result
    is a plain function, so the teacher's norm never becomes a submodule of the distiller.
    """
    head = getattr(teacher, 'head', None)
    norm = getattr(head, 'norm', None)
    pooled_is_map = isinstance(head, NormMlpClassifierHead)  # it pools to (N, C, 1, 1) before the norm
    if not isinstance(norm, nn.Module) or isinstance(norm, nn.Identity):
        norm, pooled_is_map = getattr(teacher, 'fc_norm', None), False
    if not isinstance(norm, nn.Module) or isinstance(norm, nn.Identity):
        return lambda feature_map: feature_map

    def apply(feature_map: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feature_map.shape
        vectors = feature_map.permute(0, 2, 3, 1).reshape(b * h * w, c)
        vectors = norm(vectors[..., None, None] if pooled_is_map else vectors)
        return vectors.reshape(b, h, w, c).permute(0, 3, 1, 2)
    return apply


def warn_train_mode_batchnorm(distiller: Distiller):
    """A train-mode teacher with BatchNorm uses batch statistics and updates its running ones
    (docs/methods/ufd.md §10.1)."""
    if distiller.teacher_train_mode and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in distiller.teacher.modules()):
        warnings.warn('--teacher-train-mode with a BatchNorm teacher: its targets use batch statistics and its '
                      'running statistics drift during training')


def add_temperature_arg(parser, method: str):
    """`--METHOD-temperature`, the temperature of a FinalMapDistiller's logit term (see its docstring)."""
    parser.add_argument(f'--{method}-temperature', type=float, default=None, metavar='T',
                        help=f'temperature of the KD logit term of {method} (default: the value of --kd-temperature, '
                             f'which is 1 unless set)')


class FinalMapDistiller(Distiller):
    """Total = (1 - kd weight) * CE + kd weight * kd_loss(T) + the method's weighted feature terms, each comparing a
    projection of the student with the teacher's normalized final map (docs/methods/ufd.md §5,
    docs/methods/scalekd.md §6).

    T is the method's own `--METHOD-temperature` (`add_temperature_arg`). Left unset, it is `--kd-temperature`:
    the released UFD and ScaleKD configs set their logit term's temperature under that key (`kd_temperature`), so
    they and existing command lines keep their meaning, and a config that sets both gets the method's own value.

    `student_request` and `teacher_request` ask for the final maps; a subclass that reads more features widens
    them in its `__init__`. Its `forward` starts with `final_map_forward`.
    """
    default_kd_loss_weight = 0.5
    gt_complements_kd = True

    def __init__(self, student, teacher, criterion, args, input_size, temperature: Optional[float]):
        super().__init__(student, teacher, criterion, args, input_size)
        flag = f'--{self.name}-temperature'
        if temperature is None:
            temperature, flag = args.kd_temperature, '--kd-temperature'
        self.temperature = float(temperature)
        if not self.temperature > 0:
            raise DistillerError(f'{flag} must be positive for {self.name}, got {self.temperature:g}')
        self.teacher_map_norm = head_norm_on_map(teacher)
        warn_train_mode_batchnorm(self)
        self.student_request = FeatureRequest(final=True)
        self.teacher_request = FeatureRequest(final=True)

    def final_map_forward(self, images: torch.Tensor, labels: torch.Tensor
                          ) -> Tuple[Features, Features, torch.Tensor, Dict[str, torch.Tensor]]:
        """Both models' features, the teacher's normalized final map in float32 (the target), and the task and
        logit terms (`loss_gt`, and `loss_kd` unless its weight is 0)."""
        teacher = self.teacher_forward(images, self.teacher_request)
        with torch.no_grad():
            target = self.teacher_map_norm(teacher.final).float()
        student = self.student_forward(images, self.student_request)
        losses = {'loss_gt': self.gt_loss(student.logits, labels)}
        if self.kd_loss_weight:
            losses['loss_kd'] = self.kd_loss_weight * kd_loss(student.logits, teacher.logits, self.temperature)
        return student, teacher, target, losses
