"""Frequency-decoupled feature losses: the squared error of L2-normalized vectors, split into the DC part (the mean
over one axis) and the AC part (the rest). UFD's four terms (docs/methods/ufd.md §4) and ScaleKD's two views
(docs/methods/scalekd.md §5) are built from these.

The DCT of the papers is never run: masking the DC coefficient and inverting is exactly subtracting the mean along
that axis (docs/methods/ufd.md §4.2), so each term is means, differences and L2 normalizations.
`decoupled_losses` gives a branch's (DC, AC) pair or both branches' four terms: on a GPU through the fused Triton
kernels of distillers/kernels/frequency_triton.py (the same math in two launches, forward and backward), elsewhere
through the eager functions below, whose backward passes are written by hand.
"""
from typing import Optional, Tuple

import torch

from . import kernels
from .base import float32_loss


# An AC vector this small next to the mean it was taken from is rounding noise of the subtraction (about 100
# float32 ulps): a map whose AC part is exactly 0 leaves a few ulps there (or exact zeros), never 1e-5 of the mean.
AC_RELATIVE_TOLERANCE = 1e-5
# F.normalize's rule n(v) = v / max(||v||, 1e-12), on the squared norm
SQUARED_NORM_FLOOR = 1e-24


def squared_errors_and_gradients(student: torch.Tensor, teacher: torch.Tensor, dim: int,
                                 student_mean: Optional[torch.Tensor] = None,
                                 teacher_mean: Optional[torch.Tensor] = None, with_gradients: bool = True):
    """||n(s) - n(t)||^2 of every vector along `dim` (kept as size 1), and the coefficients of its gradients.

    Expanded as |s|^2/m_s^2 + |t|^2/m_t^2 - 2 s.t/(m_s m_t) with m^2 = max(|v|^2, 1e-24): three reductions
    (`vector_norm` reads its input once and writes no elementwise temporary) and no normalized copies of the
    inputs. The gradients are per-vector combinations of the two inputs,
        d/ds = a_s * s + b * t,    d/dt = a_t * t + b * s,
    so a backward pass needs only these coefficients (the size of the per-vector terms) and the inputs. Where |s|
    is above the floor, a_s = 2 s.t / (m_t m_s^3) (the first term is the constant 1); below it m_s is the clamped
    constant and a_s = 2 / 1e-24: the values autograd gives the expansion, finite at zero vectors. A term that
    rounds below zero (equal directions, a few 1e-7) is clamped to 0, its exact value, where its gradient is 0.
    Without gradients the coefficients are None.

    AC parts: when `student` is a map minus `student_mean` (likewise the teacher; the mean keeps its reduced axes
    as size 1), a vector whose norm is below AC_RELATIVE_TOLERANCE of the mean vector's is an exact zero: its AC
    part is 0 (a map constant over space, whose every vector equals the mean) and what is left is rounding residue.
    It then counts as the zero vector (n(0) = 0, a term of 1 against any nonzero vector: docs/methods/ufd.md §9,
    F5) and passes no gradient. Normalizing the residue instead would give a unit vector of arbitrary direction
    and, since d n(v)/dv ~ 1/||v||, gradients of 1e5-1e12: one such step fills AdamW's second moments and freezes
    the student for thousands of steps. A projector whose attention saturates on one student position for every query
    produces exactly such a map (seen with ScaleKD's frequency CAP on a 2x2 grid). The test reads only the small
    mean tensors besides the norms.
    """
    ss = torch.linalg.vector_norm(student, dim=dim, keepdim=True).square()
    tt = torch.linalg.vector_norm(teacher, dim=dim, keepdim=True).square()
    st = torch.linalg.vecdot(student, teacher, dim=dim).unsqueeze(dim)
    live_s, live_t = _above_rounding(ss, student_mean, dim), _above_rounding(tt, teacher_mean, dim)
    if live_s is not None:
        ss, st = ss * live_s, st * live_s
    if live_t is not None:
        tt, st = tt * live_t, st * live_t
    ss_m, tt_m = ss.clamp_min(SQUARED_NORM_FLOOR), tt.clamp_min(SQUARED_NORM_FLOOR)
    inverse_norms = ss_m.rsqrt() * tt_m.rsqrt()  # the product of two floors would underflow float32
    cos = st * inverse_norms
    per_vector = ss / ss_m + tt / tt_m - 2 * cos
    if not with_gradients:
        return per_vector.clamp_min(0), None, None, None
    twice_live = 2.0 * (per_vector >= 0)
    b = -twice_live * inverse_norms
    cos_part = cos * twice_live
    a_s = torch.where(ss < SQUARED_NORM_FLOOR, twice_live, cos_part) / ss_m
    a_t = torch.where(tt < SQUARED_NORM_FLOOR, twice_live, cos_part) / tt_m
    if live_s is not None:
        a_s, b = a_s * live_s, b * live_s
    if live_t is not None:
        a_t, b = a_t * live_t, b * live_t
    return per_vector.clamp_min(0), a_s, a_t, b


def _above_rounding(squared_norm: torch.Tensor, mean: Optional[torch.Tensor], dim: int) -> Optional[torch.Tensor]:
    """Where a vector is more than rounding residue next to its mean vector (None without a mean)."""
    if mean is None:
        return None
    return squared_norm > AC_RELATIVE_TOLERANCE ** 2 * torch.linalg.vector_norm(mean, dim=dim, keepdim=True).square()


def _needs_gradient(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _NormalizedSquaredError(torch.autograd.Function):
    """Sum over the vectors along `dim` of ||n(s) - n(t)||^2, / B, with the backward of
    `squared_errors_and_gradients`: one multiply-add per input instead of autograd's chain through the norms and
    clamps (on a GPU, dozens of small kernels)."""

    @staticmethod
    def forward(ctx, student, teacher, dim):
        per_vector, a_s, a_t, b = squared_errors_and_gradients(student, teacher, dim)
        ctx.save_for_backward(student, teacher, a_s, a_t, b)
        return per_vector.sum() / student.shape[0]

    @staticmethod
    def backward(ctx, grad):
        student, teacher, a_s, a_t, b = ctx.saved_tensors
        scale = grad / student.shape[0]
        grad_s = torch.addcmul(student * (a_s * scale), teacher, b * scale) if ctx.needs_input_grad[0] else None
        grad_t = torch.addcmul(teacher * (a_t * scale), student, b * scale) if ctx.needs_input_grad[1] else None
        return grad_s, grad_t, None


def _decoupled_terms(student, teacher, dim, mean_dim, with_gradients):
    """(DC, AC) of one branch, and what its backward needs (see `_DecoupledSquaredErrors`)."""
    s_mean, t_mean = student.mean(mean_dim, keepdim=True), teacher.mean(mean_dim, keepdim=True)
    s_ac, t_ac = student - s_mean, teacher - t_mean
    dc, *dc_coefficients = squared_errors_and_gradients(s_mean, t_mean, dim, with_gradients=with_gradients)
    ac, *ac_coefficients = squared_errors_and_gradients(s_ac, t_ac, dim, s_mean, t_mean, with_gradients)
    batch = student.shape[0]
    terms = dc.sum() * (student.shape[mean_dim] / batch), ac.sum() / batch
    return terms, (s_mean, t_mean, s_ac, t_ac, *dc_coefficients, *ac_coefficients)


class _DecoupledSquaredErrors(torch.autograd.Function):
    """The (DC, AC) terms of one UFD branch, with a hand-written backward.

    `mean_dim`: the axis the DC part averages over; `dim`: the axis whose vectors are normalized. DC: the mean
    vectors' squared error, counted once per index of `mean_dim`. AC: the squared error of every vector minus its
    mean. Backward: the AC gradient (coefficients times the AC maps) minus its own mean over `mean_dim`, which is
    the adjoint of subtracting the mean, plus the DC gradient spread evenly over `mean_dim`. That is four passes
    over the map per input, where autograd's chain through the mean, the subtraction and the norms takes about ten.
    """

    @staticmethod
    def forward(ctx, student, teacher, dim, mean_dim):
        terms, saved = _decoupled_terms(student, teacher, dim, mean_dim, with_gradients=True)
        ctx.mean_dim = mean_dim
        ctx.save_for_backward(*saved)
        return terms

    @staticmethod
    def backward(ctx, grad_dc, grad_ac):
        s_mean, t_mean, s_ac, t_ac, dc_a_s, dc_a_t, dc_b, ac_a_s, ac_a_t, ac_b = ctx.saved_tensors
        batch = s_ac.shape[0]
        dc_scale, ac_scale = grad_dc / batch, grad_ac / batch

        def map_gradient(own_ac, other_ac, own_mean, other_mean, dc_a, ac_a):
            grad = own_ac * (ac_a * ac_scale)
            grad.addcmul_(other_ac, ac_b * ac_scale)
            dc_grad = torch.addcmul(own_mean * (dc_a * dc_scale), other_mean, dc_b * dc_scale)
            return grad.sub_(grad.mean(ctx.mean_dim, keepdim=True) - dc_grad)

        grad_s = map_gradient(s_ac, t_ac, s_mean, t_mean, dc_a_s, ac_a_s) if ctx.needs_input_grad[0] else None
        grad_t = map_gradient(t_ac, s_ac, t_mean, s_mean, dc_a_t, ac_a_t) if ctx.needs_input_grad[1] else None
        return grad_s, grad_t, None, None


def normalized_squared_error(student: torch.Tensor, teacher: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every vector along `dim` of ||n(s) - n(t)||^2, divided by the batch size (sum-SE / B).

    n(v) = v / max(||v||, 1e-12), F.normalize's rule; see `squared_errors_and_gradients`. Rounding: a term for two
    equal directions is 0 to about 1e-7 rather than exactly 0.
    """
    if _needs_gradient(student, teacher):
        return _NormalizedSquaredError.apply(student, teacher, dim)
    return squared_errors_and_gradients(student, teacher, dim, with_gradients=False)[0].sum() / student.shape[0]


def decoupled_squared_errors(student: torch.Tensor, teacher: torch.Tensor, dim: int,
                             mean_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(DC, AC): the mean over `mean_dim` and the rest, each as sum-SE / B of vectors along `dim` normalized; DC
    counted once per index of `mean_dim`. AC vectors zero up to rounding count as zero, with no gradient."""
    if _needs_gradient(student, teacher):
        return _DecoupledSquaredErrors.apply(student, teacher, dim, mean_dim)
    return _decoupled_terms(student, teacher, dim, mean_dim, with_gradients=False)[0]


class _FusedDecoupledTerms(torch.autograd.Function):
    """Both branches' terms in one Triton launch forward and one backward (kernels/frequency_triton.py). The
    teacher's map gets no gradient; `decoupled_losses` sends a teacher that needs one down the eager path. Each
    term is its own output, so the backward hands the kernel the incoming gradients as they are, with no op to
    gather them."""

    @staticmethod
    def forward(ctx, spatial, channel, teacher, fused):
        terms, work = fused.decoupled_terms(spatial, channel, teacher, with_gradients=True)
        ctx.fused = fused
        ctx.save_for_backward(spatial, channel, teacher, work)
        return terms

    @staticmethod
    def backward(ctx, *term_grads):
        spatial, channel, teacher, work = ctx.saved_tensors
        grad_spatial, grad_channel = ctx.fused.decoupled_gradients(spatial, channel, teacher, work, *term_grads)
        return grad_spatial, grad_channel, None, None


def decoupled_losses(spatial_student: torch.Tensor, channel_student: Optional[torch.Tensor],
                     teacher: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The decoupled terms of (B, C, H, W) maps: (DC, AC) of the spatial branch for `spatial_student`, then (DC,
    AC) of the channel branch for `channel_student` when it is given; both against `teacher`. What the distillers
    call (UFD both branches, ScaleKD's frequency view the spatial AC term).

    The values are `spatial_decoupled_loss` and `channel_decoupled_loss`, in float32 whatever the input dtype. On
    a GPU both branches run as two fused Triton kernels, one forward and one backward: at UFD's shapes the eager
    form's hundred-odd small operations, not arithmetic, set the time. There the terms are views of one tensor,
    so scale or add them out of place (`w * term`), as autograd refuses in-place changes to such outputs.
    """
    maps = (spatial_student,) if channel_student is None else (spatial_student, channel_student)
    for student in maps:
        check_feature_maps(student, teacher)
    fused = kernels.frequency_kernels(*maps, teacher)
    if fused is not None and not _needs_gradient(teacher):
        if _needs_gradient(*maps):
            return _FusedDecoupledTerms.apply(spatial_student, channel_student, teacher, fused)
        return fused.decoupled_terms(spatial_student, channel_student, teacher, with_gradients=False)[0]
    terms = spatial_decoupled_loss(spatial_student, teacher)
    if channel_student is not None:
        terms += channel_decoupled_loss(channel_student, teacher)
    return terms


def check_feature_maps(student: torch.Tensor, teacher: torch.Tensor):
    if student.ndim != 4 or student.shape != teacher.shape:
        raise ValueError(f'expected two (B, C, H, W) maps of one shape, got {tuple(student.shape)} and '
                         f'{tuple(teacher.shape)}')


def spatial_decoupled_loss(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L_dc, L_ac) of the spatial branch, unweighted, for (B, C, H, W) maps (docs/methods/ufd.md §4.2).

    DC: the spatial mean (GAP) vector, normalized over C, counted once per position (H*W copies).
    AC: each position's channel vector minus the spatial mean, normalized over C (zero up to rounding = zero,
    see `squared_errors_and_gradients`).
    """
    check_feature_maps(student, teacher)
    with float32_loss(student.device.type):
        return decoupled_squared_errors(student.float().flatten(2), teacher.float().flatten(2), dim=1, mean_dim=2)


def channel_decoupled_loss(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L_dc, L_ac) of the channel branch, unweighted, for (B, C, H, W) maps (docs/methods/ufd.md §4.2).

    DC: the per-position channel mean (an H*W vector), normalized over positions, counted once per channel.
    AC: each channel's H*W map minus the per-position channel mean, normalized over positions (zero up to
    rounding = zero, see `squared_errors_and_gradients`).
    """
    check_feature_maps(student, teacher)
    with float32_loss(student.device.type):
        return decoupled_squared_errors(student.float().flatten(2), teacher.float().flatten(2), dim=2, mean_dim=1)
