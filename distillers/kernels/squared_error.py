"""`squared_error_sum`: sum((s - t)^2) over two maps, in float32, with a hand-written backward (FitNet's hints,
MGD's generation loss, ViTKD's mimic term)."""
import torch
from torch.autograd.function import once_differentiable

from .. import kernels


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


class _SquaredErrorSum(torch.autograd.Function):
    """sum((s - t)^2) in float32 at least, for maps of any float dtype, with a hand-written backward.

    Autograd of the plain expression `(s.float() - t.float()).pow(2).sum()` writes a float32 copy of each
    low-precision input, the difference and the squares, and its backward reads them again: on a bf16 map of
    100M elements (FitNet's first stage at batch 128) that is about 4 GB of memory traffic per step. Here the
    difference is the one float32 temporary (saved for the backward): when either map is float32 already (the
    teacher's are: `teacher_forward` returns float32), the subtraction widens the other inside its own kernel;
    two low-precision maps cost one float32 copy of the student. The sum of squares reads the difference
    without writing squares, and each gradient 2 g (s - t) is written once, in its input's dtype: about half the
    traffic, and the same float32 math. On a GPU the kernels of squared_error_triton.py go further: one pass
    over both maps forward, one backward, and no difference written at all."""

    @staticmethod
    def forward(ctx, student, teacher):
        ctx.kernels = kernels.squared_error_kernels(student, teacher)
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
