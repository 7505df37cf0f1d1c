"""The distiller interface every method implements (see README "Writing a distiller").

A distiller is an nn.Module that owns the student and the method's own trainable modules (projectors,
heads), so that DDP, the optimizer and the checkpoint see exactly the trainable parts. The teacher is held
outside the module tree: it is not a submodule, so it is never wrapped by DDP, never optimized, never
saved, and `.to()`/`.train()` on the distiller do not reach it (train.py moves it; `train()` below keeps it
in eval mode).

`forward(images, labels, epoch)` returns `(student_logits, losses)`, where `losses` maps names to scalar
tensors that are already weighted, the task term `loss_gt` included. train.py sums them and never
re-weights.

What a batch carries beyond (images, labels) is declared by class attributes, which train.py reads to build the
training loader (data/loader.py) without naming any method:
- `needs_sample_indices`: forward also receives `sample_index`, the (B,) int64 dataset index of every sample
  (global under DDP: each rank gets its own samples' indices), and train.py calls `set_train_targets` once,
  before training and before a resume loads the distiller state, with the class of every training sample.
- `two_view`: `images` holds two views of each sample, (2B, C, H, W): rows 0..B-1 the ordinary training view,
  rows B..2B-1 a strong view (the same timm steps drawn again, plus data/mlkd_augment.py's RandAugment); `labels`
  stays (B,). Both views are a function of (seed, epoch, sample), as the single view is.
"""
import contextlib
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from models.features import FeatureAdapter, FeatureRequest, Features


def hard_targets(labels: torch.Tensor) -> torch.Tensor:
    """Class indices from hard (B,) or soft (B, K) labels; ties go to the first maximal index."""
    if labels.ndim == 1:
        return labels.long()
    return labels.argmax(dim=-1)


def class_mask(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K) boolean, True at the classes of `index` (B, J) in each row. Loss math masks classes with it
    (`masked_fill`, `where`) rather than deleting them by boolean indexing, which waits for the GPU."""
    mask = torch.zeros(index.shape[0], num_classes, dtype=torch.bool, device=index.device)
    return mask.scatter_(1, index, True)


@contextlib.contextmanager
def float32_loss(device_type: str):
    """Loss math runs in float32 even inside an autocast region."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


class DistillerError(ValueError):
    """The distiller cannot serve this student/teacher pair or these settings (raised before training)."""


def broadcast_values(values, count: int, flag: str) -> list:
    """A flag that takes one value or one per item (stage, projector): that value repeated `count` times, or
    exactly `count` values."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise DistillerError(f'{flag} takes one value or {count}, got {len(values)}')
    return values


def add_stage_arg(parser, flag: str, what: str, as_in: str = ''):
    """Declare `flag`: the student stages (1-based) a method distils, None (every stage) unless given; `as_in`
    names a reference whose default is the same."""
    same_as = f', as {as_in}' if as_in else ''
    parser.add_argument(flag, type=int, nargs='+', default=None, metavar='S',
                        help=f'{what} (default: every stage of the student{same_as}: 1 2 3 4 on four-stage models, '
                             f'1 2 3 on the CIFAR ResNets and WRNs)')


class Distiller(nn.Module):
    name = ''
    needs_teacher = True
    # True where the method reads nothing of the teacher but its logits (the logit methods): such a method can
    # run from stored teacher outputs, and benchmark.py prices it without feature taps
    teacher_logits_only = False
    # weights applied when --gt-loss-weight / --kd-loss-weight are not given (the method's own spec values)
    default_gt_loss_weight = 1.0
    default_kd_loss_weight = 1.0
    # KD-style objectives weigh the task loss by 1 - alpha when --gt-loss-weight is not given
    # (docs/methods/logit.md §1)
    gt_complements_kd = False
    # True where the method has a logit-standardized form (--logit-standardize, distillers/logit_standardization.py);
    # every other distiller refuses the flag rather than ignore it
    accepts_logit_standardize = False
    # set where some trainable parameters legitimately get no gradient in a step
    find_unused_parameters = False
    # the teacher forward runs under torch.inference_mode (no autograd bookkeeping at all); its float32 outputs
    # are then cloned into normal tensors, which autograd may save. A method that needs the teacher's autograd
    # graph sets this to False (no_grad is used then). benchmark.py measures both.
    teacher_inference_mode = True
    # batch extras (module docstring): the dataset index of each sample, and a second (strong) view of each image
    needs_sample_indices = False
    two_view = False

    @classmethod
    def add_args(cls, parser):
        """Add the method's namespaced flags (e.g. --dkd-alpha) to `parser` (an argparse group)."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], criterion: nn.Module, args,
                 input_size: Sequence[int]):
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise DistillerError(f'distiller {self.name!r} needs a teacher; pass --teacher NAME')
        self.student = student
        object.__setattr__(self, 'teacher', teacher)  # not a submodule, see module docstring
        self.criterion = criterion
        self.input_size = tuple(input_size)
        gt = getattr(args, 'gt_loss_weight', None)
        kd = getattr(args, 'kd_loss_weight', None)
        self.kd_loss_weight = self.default_kd_loss_weight if kd is None else float(kd)
        self.gt_loss_weight = self.resolve_gt_loss_weight() if gt is None else float(gt)
        self.logit_standardize = bool(getattr(args, 'logit_standardize', False))
        if self.logit_standardize and not self.accepts_logit_standardize:
            raise DistillerError(f'distiller {self.name!r} has no logit-standardized form; drop --logit-standardize '
                                 f'(it applies to kd, dkd, mlkd and ctkd)')
        self.teacher_train_mode = bool(getattr(args, 'teacher_train_mode', False))
        self._student_adapter = None
        self._teacher_adapter = None
        # teacher input re-normalization when its mean/std differ from the student's (set by train.py)
        self.teacher_norm = None
        self._teacher_norm_on_device = None  # (device, dtype, scale, shift): moved once, not every step
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.train(self.teacher_train_mode)

    def resolve_gt_loss_weight(self) -> float:
        if not self.gt_complements_kd:
            return self.default_gt_loss_weight
        if self.kd_loss_weight > 1.0:  # 1 - alpha would be a negative task weight (docs/methods/logit2.md §1)
            raise DistillerError(f'--kd-loss-weight {self.kd_loss_weight:g} is above 1, so the task weight cannot be '
                                 f'1 - alpha; set --gt-loss-weight as well (e.g. 0.1 with --kd-loss-weight 9)')
        return 1.0 - self.kd_loss_weight

    # ---------------------------------------------------------------- features
    @property
    def student_adapter(self) -> FeatureAdapter:
        if self._student_adapter is None:
            self._student_adapter = FeatureAdapter(self.student, self.input_size)
        return self._student_adapter

    @property
    def teacher_adapter(self) -> FeatureAdapter:
        if self._teacher_adapter is None:
            self._teacher_adapter = FeatureAdapter(self.teacher, self.input_size)
        return self._teacher_adapter

    def check_features(self, request: FeatureRequest):
        """Raise DistillerError, before training, when the student or the teacher cannot serve `request`."""
        for who in ('student', 'teacher'):
            try:
                getattr(self, f'{who}_adapter').check(request, who)
            except ValueError as e:
                raise DistillerError(f'{self.name}: {e}') from None

    def final_maps_on_one_grid(self, mismatch: str):
        """The final-map descriptions of the student and the teacher, for a method that compares them position by
        position. Where their grids differ, DistillerError with `mismatch` formatted with {name}, {size} (the
        input size), {student} and {teacher} (the two grids)."""
        student = self.student_adapter.description.final
        teacher = self.teacher_adapter.description.final
        if student.grid != teacher.grid:
            raise DistillerError(mismatch.format(name=self.name, size=self.input_size, student=student.grid,
                                                 teacher=teacher.grid))
        return student, teacher

    def set_teacher_normalization(self, student_mean, student_std, teacher_mean, teacher_std):
        """Re-normalize the teacher's input when it was trained with another mean/std (as timm's task does)."""
        if tuple(student_mean) == tuple(teacher_mean) and tuple(student_std) == tuple(teacher_std):
            self.teacher_norm = None
            return
        s_mean, s_std, t_mean, t_std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                        for v in (student_mean, student_std, teacher_mean, teacher_std))
        # x_t = (x_s * s_std + s_mean - t_mean) / t_std = x_s * scale + shift
        self.teacher_norm = (s_std / t_std, (s_mean - t_mean) / t_std)
        self._teacher_norm_on_device = None

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        if self.teacher_norm is None:
            return images
        cached = self._teacher_norm_on_device
        if cached is None or cached[0] != images.device or cached[1] != images.dtype:
            scale, shift = (v.to(device=images.device, dtype=images.dtype) for v in self.teacher_norm)
            cached = self._teacher_norm_on_device = (images.device, images.dtype, scale, shift)
        return torch.addcmul(cached[3], images, cached[2])

    def teacher_forward(self, images: torch.Tensor, request: Optional[FeatureRequest] = None) -> Features:
        """The frozen teacher's logits (and requested features), as float32 constants."""
        teacher = self.teacher
        if teacher.training != self.teacher_train_mode:
            teacher.train(self.teacher_train_mode)
        with torch.inference_mode() if self.teacher_inference_mode else torch.no_grad():
            x = self.teacher_input(images)
            if request is None:
                out = Features(logits=teacher(x))
            else:
                out = self.teacher_adapter(x, request)
        return _features_to_float(out)

    def student_forward(self, images: torch.Tensor, request: Optional[FeatureRequest] = None) -> Features:
        if request is None:
            return Features(logits=self.student(images))
        return self.student_adapter(images, request)

    def gt_loss(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with float32_loss(student_logits.device.type):
            return self.gt_loss_weight * self.criterion(student_logits.float(), labels)

    # ---------------------------------------------------------------- module state
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(self.teacher_train_mode)
        return self

    def distiller_state_dict(self) -> Dict[str, torch.Tensor]:
        """State of the method's own modules (projectors, heads), without the student."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith('student.')}

    def load_distiller_state_dict(self, state: Dict[str, torch.Tensor]):
        own = {k for k in self.state_dict() if not k.startswith('student.')}
        missing = sorted(own - set(state))
        unexpected = sorted(set(state) - own)
        if missing or unexpected:
            raise DistillerError(f'distiller state does not fit {self.name!r}: missing {missing[:8]}, '
                                 f'unexpected {unexpected[:8]}')
        self.load_state_dict({**state, **{f'student.{k}': v for k, v in self.student.state_dict().items()}})

    def no_weight_decay(self):
        names = set()
        if hasattr(self.student, 'no_weight_decay'):
            names |= {f'student.{n}' for n in self.student.no_weight_decay()}
        return names

    def extra_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith('student.'))

    def set_train_targets(self, targets: Sequence[int]):
        """The class of every training sample, in dataset order; called only where `needs_sample_indices`."""

    def rollback_buffers(self) -> list:
        """The floating buffers that train.py's NaN check copies before every step and puts back after a non-finite
        one (the forward has already moved BatchNorm statistics): all of them. A method that writes a large buffer
        only in steps whose total loss is finite on every rank leaves it out (distillers/crd.py's memory banks)."""
        return [b for b in self.buffers() if b.is_floating_point()]

    def forward(self, images: torch.Tensor, labels: torch.Tensor, epoch: int = 0
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError


def _features_to_float(f: Features) -> Features:
    """float32 copies usable by autograd: a low-precision tensor is cast (a new normal tensor, outside
    inference mode), a float32 inference tensor is cloned, anything else is returned as is."""
    def cast(t):
        if t is None or not t.is_floating_point():
            return t
        if t.dtype != torch.float32:
            return t.float()
        return t.clone() if t.is_inference() else t
    return Features(logits=cast(f.logits), stages={k: cast(v) for k, v in f.stages.items()},
                    blocks={k: cast(v) for k, v in f.blocks.items()},
                    prefix={k: cast(v) for k, v in f.prefix.items()},
                    final=cast(f.final), pre_logits=cast(f.pre_logits))
