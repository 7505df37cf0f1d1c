"""CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation" (AAAI 2023). Spec: docs/methods/logit2.md §3.

KD at a learned temperature. The temperature module is trained adversarially: a gradient reversal layer makes it
move so as to increase the distillation loss, with a strength lambda that grows over the first epochs (a cosine
curriculum). The module is a submodule of the distiller, so the student's optimizer trains it, DDP keeps it equal
on every rank, and the checkpoint's distiller state carries it through --resume.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Distiller, DistillerError, float32_loss
from .logit_standardization import add_logit_standardize_arg, distillation_logits


def ctkd_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature,
                 teacher_eps: float = 0.0) -> torch.Tensor:
    """Mean over the batch of tau_b^2 * sum_i (q_i + eps) * (log(q_i + eps) - log p_i), with q and p the teacher's
    and the student's softmax at tau_b. `temperature` is a tensor that may carry gradient, of shape () or (1,) (one
    value for the batch) or (B,) (one per sample); eps = 0 is the KL of KD."""
    with float32_loss(student_logits.device.type):
        zs, zt = student_logits.float(), teacher_logits.float()
        tau = torch.as_tensor(temperature, device=zs.device).float()
        if tau.numel() == 1:
            tau = tau.reshape(1, 1)
        elif tau.ndim == 1 and tau.shape[0] == zs.shape[0]:
            tau = tau.unsqueeze(1)
        else:
            raise ValueError(f'ctkd temperature must hold one value or one per sample ({zs.shape[0]}), got shape '
                             f'{tuple(tau.shape)}')
        log_p_s = F.log_softmax(zs / tau, dim=-1)
        if teacher_eps == 0:
            log_q = F.log_softmax(zt / tau, dim=-1)
            q = log_q.exp()
        else:
            q = F.softmax(zt / tau, dim=-1) + teacher_eps
            log_q = q.log()
        per_sample = (q * (log_q - log_p_s)).sum(dim=-1)
        return (tau.squeeze(1).square() * per_sample).mean()


def ctkd_temperature(raw: torch.Tensor, t_start: float = 1.0, t_range: float = 20.0) -> torch.Tensor:
    """t_start + t_range * sigmoid(raw): a temperature in (t_start, t_start + t_range), in float32."""
    return t_start + t_range * torch.sigmoid(raw.float())


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * -ctx.lambda_, None


def gradient_reversal(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    """x itself; the gradient that flows back through it is multiplied by -lambda_."""
    return _GradientReversal.apply(x, float(lambda_))


def ctkd_lambda(epoch: int, num_loops: int = 10, lambda_max: float = 1.0, lambda_min: float = 0.0) -> float:
    """Reversal strength of the 0-based `epoch`: a cosine ramp from lambda_min to lambda_max reached at epoch
    num_loops - 1, constant after (the original counts epochs from 1, hence epoch + 1)."""
    if num_loops < 1:
        raise ValueError(f'ctkd needs at least 1 curriculum epoch, got {num_loops}')
    progress = min(epoch + 1, num_loops) / num_loops
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * progress)) / 2.0


class GlobalTemperature(nn.Module):
    """One learned value for every sample (the released CTKD). Stored as a (1, 1) tensor so that timm's optimizer
    factory, which exempts 1-D parameters from weight decay, decays it as the original SGD did."""

    def __init__(self):
        super().__init__()
        self.raw = nn.Parameter(torch.ones(1, 1))

    def forward(self, teacher_logits, student_logits, lambda_):
        return gradient_reversal(self.raw, lambda_).reshape(1)


class InstanceTemperature(nn.Module):
    """One value per sample from the concatenated (detached) teacher and student logits through a two-layer MLP.
    The original module is not published; this reconstruction follows the paper's description."""

    def __init__(self, num_classes: int, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, teacher_logits, student_logits, lambda_):
        inputs = torch.cat([teacher_logits, student_logits], dim=1).detach().float()
        with float32_loss(inputs.device.type):
            raw = self.mlp(inputs).squeeze(1)
        return gradient_reversal(raw, lambda_)


class CTKD(Distiller):
    """Total = w_CE * CE + alpha * ctkd_kd_loss(z_s, z_t, tau), tau learned adversarially; alpha = --kd-loss-weight
    (default 0.9) also scales the temperature's gradient, w_CE = 1 - alpha unless given."""
    teacher_logits_only = True
    accepts_logit_standardize = True
    name = 'ctkd'
    default_kd_loss_weight = 0.9
    gt_complements_kd = True

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--ctkd-mode', default='global', choices=['global', 'instance'],
                            help='ctkd: one learned temperature (global, the released code) or one per sample from '
                                 'an MLP (instance, a reconstruction) (default: global)')
        parser.add_argument('--ctkd-t-start', type=float, default=1.0, metavar='T',
                            help='ctkd: lowest temperature (default: 1)')
        parser.add_argument('--ctkd-t-range', type=float, default=20.0, metavar='R',
                            help='ctkd: width of the temperature range, which is (t_start, t_start + range); the '
                                 'original calls it t_end (default: 20)')
        parser.add_argument('--ctkd-loops', type=int, default=10, metavar='N',
                            help='ctkd: epochs of the cosine curriculum of the reversal strength (default: 10; the '
                                 'ImageNet recipe uses 5)')
        parser.add_argument('--ctkd-lambda-max', type=float, default=1.0, metavar='L',
                            help='ctkd: reversal strength at the end of the curriculum (default: 1)')
        parser.add_argument('--ctkd-lambda-min', type=float, default=0.0, metavar='L',
                            help='ctkd: reversal strength at its start (default: 0)')
        parser.add_argument('--ctkd-instance-hidden', type=int, default=256, metavar='H',
                            help='ctkd: hidden width of the instance-mode MLP (default: 256)')
        add_logit_standardize_arg(parser)

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.t_start = float(args.ctkd_t_start)
        self.t_range = float(args.ctkd_t_range)
        self.loops = int(args.ctkd_loops)
        self.lambda_max = float(args.ctkd_lambda_max)
        self.lambda_min = float(args.ctkd_lambda_min)
        self.mode = args.ctkd_mode
        if self.t_start <= 0:
            raise DistillerError(f'--ctkd-t-start must be a positive temperature, got {self.t_start:g}')
        if self.t_range <= 0:
            raise DistillerError(f'--ctkd-t-range must be positive, got {self.t_range:g}')
        if self.loops < 1:
            raise DistillerError(f'--ctkd-loops must be at least 1 epoch, got {self.loops}')
        if self.mode == 'instance':
            hidden = int(args.ctkd_instance_hidden)
            if hidden < 1:
                raise DistillerError(f'--ctkd-instance-hidden must be a positive width, got {hidden}')
            self.temperature_module = InstanceTemperature(int(student.num_classes), hidden)
            # the instance loss as CTKD's README writes it: +1e-7 on the teacher probabilities
            self.teacher_eps = 1e-7
        elif self.mode == 'global':
            self.temperature_module = GlobalTemperature()
            self.teacher_eps = 0.0
        else:
            raise DistillerError(f'--ctkd-mode must be global or instance, got {self.mode!r}')
        self._last_temperature = None

    @property
    def current_temperature(self) -> float:
        """The temperature of the last step (its mean over the batch in instance mode), NaN before the first.
        Kept as a tensor and read only here, so that a training step never waits for the device."""
        if self._last_temperature is None:
            return float('nan')
        return float(self._last_temperature.mean())

    def forward(self, images, labels, epoch=0):
        lambda_ = ctkd_lambda(epoch, self.loops, self.lambda_max, self.lambda_min)
        teacher_logits = self.teacher_forward(images).logits
        student_logits = self.student(images)
        tau = ctkd_temperature(self.temperature_module(teacher_logits, student_logits, lambda_),
                               self.t_start, self.t_range)
        self._last_temperature = tau.detach()
        kd_student, kd_teacher = distillation_logits(student_logits, teacher_logits, self.logit_standardize)
        losses = {
            'loss_gt': self.gt_loss(student_logits, labels),
            'loss_kd': self.kd_loss_weight * ctkd_kd_loss(kd_student, kd_teacher, tau, self.teacher_eps),
        }
        return student_logits, losses
