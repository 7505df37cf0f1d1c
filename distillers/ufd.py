"""UFD: Unified Frequency Decoupling Knowledge Distillation for Computer Vision (UFD-KD). Spec: ufd.md.

The student's last-stage map goes through two cross-attention projectors (ScaleKD's CAP, shared with
distillers/scalekd.py) into the teacher's last-stage layout. One feeds a spatial DC/AC pair of terms, the other a
channel DC/AC pair. The DCT of the paper is never run: masking the DC coefficient and inverting is exactly
subtracting the mean along that axis (ufd.md §4.2), so each term is means, differences and L2 normalizations.
`decoupled_losses` gives all four terms: on a GPU through the fused Triton kernels of distillers/ufd_triton.py
(the same math in two launches, forward and backward), elsewhere through the eager functions below.

Teacher tap: the normalized last stage (ufd.md §2). `final` of the adapter is `forward_features`, which already
ends with the final norm for Swin, ViT/DeiT (with token pooling) and Mixer. Some teachers normalize only the
*pooled* vector instead: timm's ConvNeXt head (`head.norm` of a NormMlpClassifierHead, pool -> LayerNorm2d -> fc)
and ViTs pooled by average (`fc_norm`). For those, that same norm is applied to every position of the final
map, as if each position were a pooled vector; see `head_norm_on_map`.
"""
import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import NormMlpClassifierHead, trunc_normal_

from models.features import FeatureRequest, to_map
from .base import Distiller, DistillerError, float32_loss, kernel_ready
from .kd import kd_loss


# ---------------------------------------------------------------------------------------------- loss math
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
    It then counts as the zero vector (n(0) = 0, a term of 1 against any nonzero vector, ufd.md F5) and passes no
    gradient. Normalizing the residue instead would give a unit vector of arbitrary direction and, since
    d n(v)/dv ~ 1/||v||, gradients of 1e5-1e12: one such step fills AdamW's second moments and freezes the student
    for thousands of steps. A projector whose attention saturates on one student position for every query
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


# False sends every call of `decoupled_losses` down the eager path (benchmark.py times both)
FUSED_KERNELS = True


def fused_kernels(*maps: torch.Tensor):
    """distillers/ufd_triton.py where its kernels can run on these (B, C, H, W) maps: CUDA tensors of a float
    dtype on one device (`kernel_ready`) whose H*W positions form one strided axis, with Triton importable. None
    otherwise."""
    if not FUSED_KERNELS or not kernel_ready(*maps):
        return None
    try:
        from . import ufd_triton
    except ImportError:  # a CUDA build of torch without Triton (Windows, some source builds)
        return None
    return ufd_triton if all(ufd_triton.map_strides(m) is not None for m in maps) else None


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
    """Both branches' terms in one Triton launch forward and one backward (distillers/ufd_triton.py). The teacher's
    map gets no gradient; `decoupled_losses` sends a teacher that needs one down the eager path. Each term is its
    own output, so the backward hands the kernel the incoming gradients as they are, with no op to gather them."""

    @staticmethod
    def forward(ctx, spatial, channel, teacher, kernels):
        terms, work = kernels.decoupled_terms(spatial, channel, teacher, with_gradients=True)
        ctx.kernels = kernels
        ctx.save_for_backward(spatial, channel, teacher, work)
        return terms

    @staticmethod
    def backward(ctx, *term_grads):
        spatial, channel, teacher, work = ctx.saved_tensors
        grad_spatial, grad_channel = ctx.kernels.decoupled_gradients(spatial, channel, teacher, work, *term_grads)
        return grad_spatial, grad_channel, None, None


def decoupled_losses(spatial_student: torch.Tensor, channel_student: Optional[torch.Tensor],
                     teacher: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """UFD's terms for (B, C, H, W) maps: (DC, AC) of the spatial branch for `spatial_student`, then (DC, AC) of
    the channel branch for `channel_student` when it is given; both against `teacher`. What the distillers call.

    The values are `spatial_decoupled_loss` and `channel_decoupled_loss`, in float32 whatever the input dtype. On
    a GPU both branches run as two fused Triton kernels, one forward and one backward: at UFD's shapes the eager
    form's hundred-odd small operations, not arithmetic, set the time. There the terms are views of one tensor,
    so scale or add them out of place (`w * term`), as autograd refuses in-place changes to such outputs.
    """
    maps = (spatial_student,) if channel_student is None else (spatial_student, channel_student)
    for student in maps:
        check_feature_maps(student, teacher)
    kernels = fused_kernels(*maps, teacher)
    if kernels is not None and not _needs_gradient(teacher):
        if _needs_gradient(*maps):
            return _FusedDecoupledTerms.apply(spatial_student, channel_student, teacher, kernels)
        return kernels.decoupled_terms(spatial_student, channel_student, teacher, with_gradients=False)[0]
    terms = spatial_decoupled_loss(spatial_student, teacher)
    if channel_student is not None:
        terms += channel_decoupled_loss(channel_student, teacher)
    return terms


def check_feature_maps(student: torch.Tensor, teacher: torch.Tensor):
    if student.ndim != 4 or student.shape != teacher.shape:
        raise ValueError(f'expected two (B, C, H, W) maps of one shape, got {tuple(student.shape)} and '
                         f'{tuple(teacher.shape)}')


def spatial_decoupled_loss(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L_dc, L_ac) of the spatial branch, unweighted, for (B, C, H, W) maps (ufd.md §4.2).

    DC: the spatial mean (GAP) vector, normalized over C, counted once per position (H*W copies).
    AC: each position's channel vector minus the spatial mean, normalized over C (zero up to rounding = zero,
    see `squared_errors_and_gradients`).
    """
    check_feature_maps(student, teacher)
    with float32_loss(student.device.type):
        return decoupled_squared_errors(student.float().flatten(2), teacher.float().flatten(2), dim=1, mean_dim=2)


def channel_decoupled_loss(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L_dc, L_ac) of the channel branch, unweighted, for (B, C, H, W) maps (ufd.md §4.2).

    DC: the per-position channel mean (an H*W vector), normalized over positions, counted once per channel.
    AC: each channel's H*W map minus the per-position channel mean, normalized over positions (zero up to
    rounding = zero, see `squared_errors_and_gradients`).
    """
    check_feature_maps(student, teacher)
    with float32_loss(student.device.type):
        return decoupled_squared_errors(student.float().flatten(2), teacher.float().flatten(2), dim=2, mean_dim=1)


# ---------------------------------------------------------------------------------------------- projector
def default_num_heads(width: int) -> int:
    """Heads for a CAP of output width `width`: the largest divisor of `width` not above width / 64 (at least 1).

    This is ScaleKD's rule for the pairs it ships no config for (scalekd.md §7): 768 -> 12, 1536 -> 24,
    384 -> 6, 2048 -> 32. Recipes that shipped other counts set them explicitly.
    """
    target = max(1, round(width / 64))
    return max(h for h in range(1, target + 1) if width % h == 0)


class CrossAttentionProjector(nn.Module):
    """ScaleKD's cross-attention projector (CAP), ufd.md §3 / scalekd.md §3.

    Maps a student map (B, C_s, H_s, W_s) to tokens (B, H_q*W_q, C_t) in raster order of the query grid.
    Queries are a learned table at the query grid, or external (B, H_q*W_q, C_t) tokens (ScaleKD's stage chain);
    an external query always wins. Attention is global, so the query grid need not equal the student grid.
    """

    def __init__(self, in_channels: int, out_channels: int, student_hw: Sequence[int], query_hw: Sequence[int],
                 num_heads: int, softmax_scale: float = 1.0, upsample: bool = False, learned_query: bool = True,
                 pos_hw: Optional[Sequence[int]] = None, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if num_heads < 1 or out_channels % num_heads:
            raise ValueError(f'num_heads {num_heads} must divide the output width {out_channels}')
        self.student_hw = tuple(int(v) for v in student_hw)
        self.query_hw = tuple(int(v) for v in query_hw)
        factor = 2 if upsample else 1
        self.pos_hw = (self.student_hw[0] * factor, self.student_hw[1] * factor)
        if pos_hw is not None and tuple(pos_hw) != self.pos_hw:
            raise ValueError(f'pos_hw {tuple(pos_hw)} does not match the student grid {self.student_hw}'
                             f'{" upsampled x2" if upsample else ""} = {self.pos_hw}')
        self.out_channels = out_channels
        self.num_heads = num_heads
        head_dim = out_channels // num_heads
        self.attn_scale = head_dim ** -0.5 * float(softmax_scale)

        self.student_conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1), norm_layer(in_channels), nn.ReLU(inplace=True))
        self.upsample = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False) if upsample else None
        self.pos_embed = nn.Parameter(torch.zeros(1, in_channels, *self.pos_hw))
        trunc_normal_(self.pos_embed, std=0.02)
        num_queries = self.query_hw[0] * self.query_hw[1]
        self.query = nn.Embedding(num_queries, out_channels) if learned_query else None
        self.query_conv = nn.Sequential(nn.Conv2d(out_channels, out_channels, 1), nn.ReLU(inplace=True))
        self.q_proj = nn.Linear(out_channels, out_channels)
        self.k_proj = nn.Linear(in_channels, out_channels)
        self.v_proj = nn.Linear(in_channels, out_channels)
        self.out_proj = nn.Linear(out_channels, out_channels)
        self.norm = nn.LayerNorm(out_channels, eps=1e-5)
        self.mlp = nn.Sequential(
            nn.Linear(out_channels, 4 * out_channels), nn.ReLU(inplace=True), nn.Linear(4 * out_channels, out_channels))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, query: Optional[torch.Tensor] = None) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.student_hw:
            raise ValueError(f'projector built for a {self.student_hw} student grid got {tuple(x.shape[-2:])}; '
                             f'the training input size must match the one the distiller was built for')
        b = x.shape[0]
        kv = self.student_conv(x)
        if self.upsample is not None:
            kv = self.upsample(kv)
        kv = (kv + self.pos_embed).flatten(2).transpose(1, 2)

        hq, wq = self.query_hw
        if query is not None:
            if query.shape[1:] != (hq * wq, self.out_channels):
                raise ValueError(f'external query must be (B, {hq * wq}, {self.out_channels}), '
                                 f'got {tuple(query.shape)}')
            q_map = query.transpose(1, 2).reshape(b, self.out_channels, hq, wq)
        elif self.query is not None:
            # the table is the same for every sample: project it once and broadcast over the batch
            q_map = self.query.weight.t().reshape(1, self.out_channels, hq, wq)
        else:
            raise ValueError('this projector has no learned query table; pass an external query')
        q = self.q_proj(self.query_conv(q_map).flatten(2).transpose(1, 2))
        q = self._heads(q).expand(b, -1, -1, -1)
        k, v = self._heads(self.k_proj(kv)), self._heads(self.v_proj(kv))
        attn = F.scaled_dot_product_attention(q, k, v, scale=self.attn_scale)
        a = self.out_proj(attn.transpose(1, 2).reshape(b, hq * wq, self.out_channels))
        a = self.norm(a)
        return a + self.mlp(a)


# ---------------------------------------------------------------------------------------------- shared helpers
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


def broadcast_values(values, count: int, flag: str) -> list:
    """One value repeated `count` times, or exactly `count` values."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise DistillerError(f'{flag} takes one value or {count}, got {len(values)}')
    return values


def warn_train_mode_batchnorm(distiller: Distiller):
    """A train-mode teacher with BatchNorm uses batch statistics and updates its running ones (ufd.md §10.1)."""
    if distiller.teacher_train_mode and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in distiller.teacher.modules()):
        warnings.warn('--teacher-train-mode with a BatchNorm teacher: its targets use batch statistics and its '
                      'running statistics drift during training')


def cap_no_weight_decay(distiller: Distiller) -> set:
    """The student's exemptions, plus every CAP pos_embed when the student exempts its own `pos_embed`.

    The recipes that exempt position embeddings (DeiT-style, mmcls custom key '.pos_embed') match the CAP's
    by name as well; CNN recipes decay it.
    """
    names = Distiller.no_weight_decay(distiller)
    student_exempt = distiller.student.no_weight_decay() if hasattr(distiller.student, 'no_weight_decay') else ()
    if 'pos_embed' in student_exempt:
        names |= {n for n, _ in distiller.named_parameters()
                  if not n.startswith('student.') and n.endswith('.pos_embed')}
    return names


# ---------------------------------------------------------------------------------------------- distiller
class UFD(Distiller):
    """Total = (1 - kd weight) * CE + kd weight * kd_loss(T) + the four weighted UFD terms (ufd.md §5)."""
    name = 'ufd'
    default_kd_loss_weight = 0.5
    gt_complements_kd = True

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--ufd-alpha', type=float, nargs=4, default=[0.03, 0.065, 0.003, 0.0065],
                            metavar=('DC_SP', 'AC_SP', 'DC_CH', 'AC_CH'),
                            help='weights of the spatial DC, spatial AC, channel DC and channel AC terms '
                                 '(default: 0.03 0.065 0.003 0.0065)')
        parser.add_argument('--ufd-softmax-scale', type=float, nargs='+', default=[5.0, 5.0],
                            help='attention softmax scale of the spatial and channel projectors; one value '
                                 'is used for both (default: 5 5)')
        parser.add_argument('--ufd-heads', type=int, default=None,
                            help='attention heads of both projectors; must divide the teacher width '
                                 '(default: the largest divisor of C_t not above C_t/64)')
        parser.add_argument('--ufd-upsample', default='auto', choices=('auto', 'on', 'off'),
                            help='x2 bilinear upsample of the student map in the projectors; auto: on when '
                                 'the student grid is half the teacher grid (default: auto)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.temperature = float(getattr(args, 'kd_temperature', 1.0))
        self.weights = [float(a) for a in args.ufd_alpha]
        if len(self.weights) != 4:
            raise DistillerError(f'--ufd-alpha takes 4 weights (dc, ac, dc channel, ac channel), '
                                 f'got {len(self.weights)}')
        scales = broadcast_values(args.ufd_softmax_scale, 2, '--ufd-softmax-scale')
        self.student_request = FeatureRequest(final=True)
        self.teacher_request = FeatureRequest(final=True)
        try:
            student_tap = self.student_adapter.description.final
            teacher_tap = self.teacher_adapter.description.final
        except ValueError as e:
            raise DistillerError(f'ufd needs the final feature map of both models: {e}') from None
        self.teacher_grid = teacher_tap.grid
        self.teacher_map_norm = head_norm_on_map(teacher)

        heads = args.ufd_heads if args.ufd_heads is not None else default_num_heads(teacher_tap.channels)
        if heads < 1 or teacher_tap.channels % heads:
            raise DistillerError(f'--ufd-heads {heads} does not divide the teacher width {teacher_tap.channels}')
        mode = getattr(args, 'ufd_upsample', 'auto')
        hs, ws = student_tap.grid
        upsample = mode == 'on' or (mode == 'auto' and (2 * hs, 2 * ws) == tuple(teacher_tap.grid))

        def projector(scale):
            return CrossAttentionProjector(
                student_tap.channels, teacher_tap.channels, student_tap.grid, teacher_tap.grid, heads,
                softmax_scale=scale, upsample=upsample)
        self.proj_spatial = projector(scales[0])
        self.proj_channel = projector(scales[1])
        warn_train_mode_batchnorm(self)


    def no_weight_decay(self):
        return cap_no_weight_decay(self)

    def forward(self, images, labels, epoch=0):
        teacher = self.teacher_forward(images, self.teacher_request)
        with torch.no_grad():
            target = self.teacher_map_norm(teacher.final).float()
        student = self.student_forward(images, self.student_request)
        logits = student.logits
        spatial = to_map(self.proj_spatial(student.final), self.teacher_grid)
        channel = to_map(self.proj_channel(student.final), self.teacher_grid)
        dc_sp, ac_sp, dc_ch, ac_ch = decoupled_losses(spatial, channel, target)
        w_dc_sp, w_ac_sp, w_dc_ch, w_ac_ch = self.weights
        losses = {'loss_gt': self.gt_loss(logits, labels)}
        if self.kd_loss_weight:
            losses['loss_kd'] = self.kd_loss_weight * kd_loss(logits, teacher.logits, self.temperature)
        losses.update({
            'loss_ufd_dc_spatial': w_dc_sp * dc_sp,
            'loss_ufd_ac_spatial': w_ac_sp * ac_sp,
            'loss_ufd_dc_channel': w_dc_ch * dc_ch,
            'loss_ufd_ac_channel': w_ac_ch * ac_ch,
        })
        return logits, losses
