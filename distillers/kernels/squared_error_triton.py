"""Fused GPU kernels for `squared_error_sum` of kernels/squared_error.py: sum((s - t)^2) in one pass over both
maps, and its gradient in one more.

Why: the eager form writes the float32 difference, reads it back for the sum and again for the gradient. For a
bf16 student map against the teacher's float32 map that is 20 bytes of memory traffic per element; here the
forward reads each map once and writes one float32 partial sum per block (6 bytes per element), and the backward
reads them again and writes the gradient in the student's dtype (8 bytes): 14. FitNet's hints on ResNet-50 ->
ResNet-18 at batch 128 cover 193M elements, so that is about 2.7 instead of 3.9 GB per step, which on a GPU is
the larger part of what FitNet adds beyond its regressors. The maps are saved for the backward instead of the
difference (6 bytes per element instead of 4).

The gain is unmeasured: those figures count bytes, and no GPU has been available to time the kernels against
the eager form (unlike the frequency kernels, whose H100/H200 timings are in the README's Performance section). Setting
`distillers.kernels.FUSED_KERNELS = False` runs the eager form for such a comparison.

The math is the eager form's: both maps widened to float32 in registers, the difference, its square; only the
order of the float32 additions differs (a tree within each block of BLOCK elements, then PyTorch's sum over the
blocks). The gradient 2 g (s - t) is the eager form's to the bit. squared_error.py uses these kernels for CUDA
maps of one dense layout (the same strides) when Triton imports and the code is not being traced by torch.compile
(`squared_error_kernels` in kernels/__init__.py); everything else takes the eager path. Under TRITON_INTERPRET=1
the kernels run on CPU tensors, which is how the tests check them without a GPU.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import on_device

BLOCK = 4096


@triton.jit
def _load_difference(s_ptr, t_ptr, n, BLOCK: tl.constexpr):
    """The block's float32 differences (0 past the end), and which offsets are inside the maps."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    student = tl.load(s_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    teacher = tl.load(t_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    return student - teacher, offsets, inside


@triton.jit
def _partial_sums_kernel(s_ptr, t_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    difference, _, _ = _load_difference(s_ptr, t_ptr, n, BLOCK)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(difference * difference, axis=0))


@triton.jit
def _gradient_kernel(s_ptr, t_ptr, grad_ptr, grad_s_ptr, grad_t_ptr, n, WRITE_S: tl.constexpr,
                     WRITE_T: tl.constexpr, BLOCK: tl.constexpr):
    difference, offsets, inside = _load_difference(s_ptr, t_ptr, n, BLOCK)
    twice_grad = 2.0 * tl.load(grad_ptr).to(tl.float32)
    if WRITE_S:
        tl.store(grad_s_ptr + offsets, (difference * twice_grad).to(grad_s_ptr.dtype.element_ty), mask=inside)
    if WRITE_T:
        tl.store(grad_t_ptr + offsets, (difference * -twice_grad).to(grad_t_ptr.dtype.element_ty), mask=inside)


def squared_error_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum((student - teacher)^2) as a float32 scalar tensor, for two maps of one shape and one dense layout
    (see `same_dense_layout`), of float32, bfloat16 or float16."""
    n = student.numel()
    partials = torch.empty(triton.cdiv(n, BLOCK), device=student.device, dtype=torch.float32)
    with on_device(student.device):
        _partial_sums_kernel[(partials.numel(),)](student, teacher, partials, n, BLOCK=BLOCK, num_warps=8)
    return partials.sum()


def squared_error_gradients(student: torch.Tensor, teacher: torch.Tensor, grad: torch.Tensor, student_grad: bool,
                            teacher_grad: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """2 grad (student - teacher) for the student and its negative for the teacher, each where asked, in its map's
    dtype and layout. `grad` (a scalar tensor) stays on the device: nothing waits for the GPU."""
    grad_student = torch.empty_like(student) if student_grad else None
    grad_teacher = torch.empty_like(teacher) if teacher_grad else None
    if student_grad or teacher_grad:
        first = grad_student if student_grad else grad_teacher  # a pointer for the slot that is not written
        with on_device(student.device):
            _gradient_kernel[(triton.cdiv(student.numel(), BLOCK),)](
                student, teacher, grad, first, grad_teacher if teacher_grad else first, student.numel(),
                WRITE_S=student_grad, WRITE_T=teacher_grad, BLOCK=BLOCK, num_warps=8)
    return grad_student, grad_teacher
