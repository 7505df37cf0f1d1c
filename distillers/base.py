"""The distiller interface every method implements (see README "Writing a distiller").

A distiller is an nn.Module that owns the student and the method's own trainable modules (projectors,
heads), so that DDP, the optimizer and the checkpoint see exactly the trainable parts. The teacher is held
outside the module tree: it is not a submodule, so it is never wrapped by DDP, never optimized, never
saved, and `.to()`/`.train()` on the distiller do not reach it (train.py moves it; `train()` below keeps it
in eval mode).

`forward(images, labels, epoch)` returns `(student_logits, losses)`, where `losses` maps names to scalar
tensors that are already weighted, the task term `loss_gt` included. train.py sums them and never
re-weights.
"""
import contextlib
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

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


def _sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """sum(x^2) through `vector_norm`, which writes no squares, in two levels: the norms along the dimension that
    is contiguous in memory, then the sum of their squares. One `vector_norm` over 100M float32 elements on the
    CPU accumulates them in sequence and is off by about 1%; short rows and PyTorch's cascaded `sum` are
    accurate to float32 rounding."""
    dims = [d for d in range(x.ndim) if x.shape[d] > 1]
    if len(dims) < 2:  # one long row (not a map): the cascaded sum of written squares
        return x.pow(2).sum()
    inner = min(dims, key=lambda d: abs(x.stride(d)))
    return torch.linalg.vector_norm(x, dim=inner).square().sum()


# squared_error_sum runs on the kernels of distillers/base_triton.py where they can (set False to compare)
FUSED_KERNELS = True


def kernel_ready(*maps: torch.Tensor) -> bool:
    """Whether a fused Triton kernel (this project's: base_triton.py, ufd_triton.py) may take these maps: CUDA
    tensors on one device, of float32, bfloat16 or float16, and not inference tensors (the kernels' backward reads
    the maps, and autograd cannot save those), outside torch.compile's tracing (which fuses the eager form
    itself). Each caller adds its own layout condition."""
    if torch.compiler.is_compiling() or not all(
            m.is_cuda and m.dtype in (torch.float32, torch.bfloat16, torch.float16) and not m.is_inference()
            for m in maps):
        return False
    return len({m.device for m in maps}) == 1  # two devices: the eager path raises PyTorch's own error


def same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when both tensors' elements fill numel() consecutive memory slots in the same order (contiguous,
    channels_last, any permutation, as long as it is the same one): the element at one offset from one's start is
    the element at that offset from the other's, so a kernel can walk both as flat arrays."""
    sized = [(size, sa, sb) for size, sa, sb in zip(a.shape, a.stride(), b.stride()) if size > 1]
    expected = 1
    for size, stride_a, stride_b in sorted(sized, key=lambda d: d[1]):
        if stride_a != expected or stride_b != expected:
            return False
        expected *= size
    return True


def fused_squared_error_kernels(student: torch.Tensor, teacher: torch.Tensor):
    """distillers/base_triton.py where its kernels can run on these maps (`kernel_ready`, non-empty, in one dense
    layout) and Triton imports; None otherwise (the eager path, which saves only the maps' difference)."""
    if not FUSED_KERNELS or student.numel() == 0 or not kernel_ready(student, teacher):
        return None
    if not same_dense_layout(student, teacher):
        return None
    try:
        from . import base_triton
    except ImportError:  # a CUDA build of torch without Triton (Windows, some source builds)
        return None
    return base_triton


class _SquaredErrorSum(torch.autograd.Function):
    """sum((s - t)^2) in float32 at least, for maps of any float dtype, with a hand-written backward.

    Autograd of the plain expression `(s.float() - t.float()).pow(2).sum()` writes a float32 copy of each
    low-precision input, the difference and the squares, and its backward reads them again: on a bf16 map of
    100M elements (FitNet's first stage at batch 128) that is about 4 GB of memory traffic per step. Here the
    difference is the one float32 temporary (saved for the backward): when either map is float32 already (the
    teacher's are: `teacher_forward` returns float32), the subtraction widens the other inside its own kernel;
    two low-precision maps cost one float32 copy of the student. The sum of squares reads the difference
    without writing squares, and each gradient 2 g (s - t) is written once, in its input's dtype: about half the
    traffic, and the same float32 math. On a GPU the kernels of distillers/base_triton.py go further: one pass
    over both maps forward, one backward, and no difference written at all."""

    @staticmethod
    def forward(ctx, student, teacher):
        ctx.kernels = fused_squared_error_kernels(student, teacher)
        if ctx.kernels is not None:
            ctx.save_for_backward(student, teacher)
            return ctx.kernels.squared_error_sum(student, teacher)
        ctx.input_dtypes = (student.dtype, teacher.dtype)
        wide = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
        if student.dtype != wide and teacher.dtype != wide:
            student = student.to(wide)
        difference = student - teacher
        ctx.save_for_backward(difference)
        return _sum_of_squares(difference)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.kernels is not None:
            student, teacher = ctx.saved_tensors
            return ctx.kernels.squared_error_gradients(student, teacher, grad, *ctx.needs_input_grad)
        difference, = ctx.saved_tensors
        student_dtype, teacher_dtype = ctx.input_dtypes
        grad_student = grad_teacher = None
        if ctx.needs_input_grad[0]:
            grad_student = torch.mul(difference, 2 * grad, out=torch.empty_like(difference, dtype=student_dtype))
        if ctx.needs_input_grad[1]:
            grad_teacher = torch.mul(difference, -2 * grad, out=torch.empty_like(difference, dtype=teacher_dtype))
        return grad_student, grad_teacher


def squared_error_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum((student - teacher)^2) over every element of two maps of the same shape, in float32 (or wider) and
    without float32 copies of low-precision inputs; each gradient comes back in its input's dtype."""
    if student.shape != teacher.shape:
        raise ValueError(f'squared_error_sum needs maps of one shape, got {tuple(student.shape)} and '
                         f'{tuple(teacher.shape)}')
    return _SquaredErrorSum.apply(student, teacher)


class DistillerError(ValueError):
    """The distiller cannot serve this student/teacher pair or these settings (raised before training)."""


class Distiller(nn.Module):
    name = ''
    needs_teacher = True
    # True where the method reads nothing of the teacher but its logits (the logit methods): such a method can
    # run from stored teacher outputs, and benchmark.py prices it without feature taps
    teacher_logits_only = False
    # weights applied when --gt-loss-weight / --kd-loss-weight are not given (the method's own spec values)
    default_gt_loss_weight = 1.0
    default_kd_loss_weight = 1.0
    # KD-style objectives weigh the task loss by 1 - alpha when --gt-loss-weight is not given (logit.md §1)
    gt_complements_kd = False
    # set where some trainable parameters legitimately get no gradient in a step
    find_unused_parameters = False
    # the teacher forward runs under torch.inference_mode (no autograd bookkeeping at all); its float32 outputs
    # are then cloned into normal tensors, which autograd may save. A method that needs the teacher's autograd
    # graph sets this to False (no_grad is used then). benchmark.py measures both.
    teacher_inference_mode = True

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
        return 1.0 - self.kd_loss_weight if self.gt_complements_kd else self.default_gt_loss_weight

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
