"""Fused GPU kernels for the frequency-decoupled terms: `decoupled_losses` of distillers/frequency.py (UFD's four
terms, ScaleKD's frequency view) in one Triton launch forward and one backward.

Why: at UFD's shapes (B=64, C=768, 7x7 or 14x14) the eager closed form dispatches
about 110 small operations forward and 200 forward+backward, and on a GPU their host cost, not arithmetic, sets
the time: it was barely faster than the DCT it replaces. The math here is that of `squared_errors_and_gradients`
(same floor, clamp, rounding guard and gradient coefficients); only the order of float32 additions differs.
frequency.py uses these kernels for CUDA maps (float32, bfloat16 or float16, read as they are, math in float32)
when Triton imports, the teacher's map needs no gradient and the code is not being traced by torch.compile
(`frequency_kernels` in kernels/__init__.py); everything else takes the eager path. This module imports Triton at
the top, so it is imported only when a CUDA map arrives.

Layout: a branch sees each sample as an (M, K) matrix read through strides, M vectors of length K, straight from
the (B, C, H, W) map (any layout whose H*W positions form one strided axis; no copy is made). The spatial branch
normalizes over channels (K = C) and averages over positions (M = H*W); the channel branch is the same with the
two axes swapped.

    forward kernel  grid (B, branches): one program per sample and branch computes the mean vector, then every
                    row's three reductions (|s - mu_s|^2, |t - mu_t|^2, their dot product), its AC term and
                    gradient coefficients, and the DC term; it writes the sample's share of the terms, and the
                    means and coefficients to one work buffer.
    gradient kernel grid (B, column blocks, branches): per column, the mean over rows of the AC gradient (the
                    adjoint of subtracting the mean), then every element's gradient, in the student map's dtype
                    and layout.

The incoming gradients stay on the device and the kernels read them, so nothing waits for the GPU. Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors; the tests check them that way against the eager path,
and on a GPU when there is one.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..frequency import AC_RELATIVE_TOLERANCE, SQUARED_NORM_FLOOR
from . import on_device


@triton.jit
def _term_and_coefficients(ss, tt, st, live_s, live_t, floor):
    """squared_errors_and_gradients of frequency.py for reduced sums: the clamped term and a_s, a_t, b."""
    ss = ss * live_s
    tt = tt * live_t
    st = st * live_s * live_t
    # maximum must keep NaN as the eager clamp_min does: a non-finite map has to give a non-finite loss, which the
    # training loop's check sees
    ss_m = tl.maximum(ss, floor, propagate_nan=tl.PropagateNan.ALL)
    tt_m = tl.maximum(tt, floor, propagate_nan=tl.PropagateNan.ALL)
    inverse_norms = (1.0 / tl.sqrt(ss_m)) * (1.0 / tl.sqrt(tt_m))
    cos = st * inverse_norms
    term = ss / ss_m + tt / tt_m - 2.0 * cos
    twice_live = tl.where(term >= 0, 2.0, 0.0)
    b = -twice_live * inverse_norms * live_s * live_t
    cos_part = cos * twice_live
    a_s = tl.where(ss < floor, twice_live, cos_part) / ss_m * live_s
    a_t = tl.where(tt < floor, twice_live, cos_part) / tt_m * live_t
    return tl.maximum(term, 0.0, propagate_nan=tl.PropagateNan.ALL), a_s, a_t, b


@triton.jit
def _load_tile(ptr, rows, cols, ok, row_stride, col_stride):
    """A (rows x cols) tile of one sample's map in float32, 0 where `ok` is false."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=ok, other=0.0).to(tl.float32)


# The work buffer, per branch: the mean vectors of the student's and the teacher's map for every sample (B x K
# each), then 3 gradient coefficients per row (B x M x 3), then 3 per sample for the DC term (B x 3). The spatial
# branch's part comes first, the channel branch's after it, at the offset `work_size` gives the kernels.
@triton.jit
def _work_pointers(work_ptr, b, batch, M, K):
    """Where sample b's mean vectors, row coefficients and DC coefficients lie in one branch's part."""
    return (work_ptr + b * K, work_ptr + batch * K + b * K, work_ptr + 2 * batch * K + b * M * 3,
            work_ptr + 2 * batch * K + 3 * batch * M + b * 3)


@triton.jit
def _branch_forward(s_ptr, t_ptr, work_ptr, terms_ptr, b, batch, M, K, s_sm, s_sk, t_sm, t_sk, tolerance_sq, floor,
                    WITH_GRADIENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One sample of one branch: the mean vectors, then every row's AC term and the DC term. Writes the sample's
    share of (DC, AC) to terms_ptr[0:2] and, for the backward, the means and coefficients to the work buffer."""
    mu_s_ptr, mu_t_ptr, ac_coef_ptr, dc_coef_ptr = _work_pointers(work_ptr, b, batch, M, K)
    # first pass: the column means, kept in the work buffer
    mu_ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    mu_tt = tl.zeros([BLOCK_K], dtype=tl.float32)
    mu_st = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        sum_s = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        sum_t = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            ok = (rows < M)[:, None] & col_ok[None, :]
            sum_s += _load_tile(s_ptr, rows, cols, ok, s_sm, s_sk)
            sum_t += _load_tile(t_ptr, rows, cols, ok, t_sm, t_sk)
        mu_s = tl.sum(sum_s, axis=0) / M
        mu_t = tl.sum(sum_t, axis=0) / M
        tl.store(mu_s_ptr + cols, mu_s, mask=col_ok)
        tl.store(mu_t_ptr + cols, mu_t, mask=col_ok)
        mu_ss += mu_s * mu_s
        mu_tt += mu_t * mu_t
        mu_st += mu_s * mu_t
    mu_ss_sum = tl.sum(mu_ss, axis=0)
    mu_tt_sum = tl.sum(mu_tt, axis=0)
    dc, dc_a_s, dc_a_t, dc_b = _term_and_coefficients(mu_ss_sum, mu_tt_sum, tl.sum(mu_st, axis=0), 1.0, 1.0, floor)
    # the means were written by other threads of this program
    tl.debug_barrier()
    # second pass: each row minus the means, its three reductions, its term and coefficients
    ac_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ss = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        tt = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        st = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            ok = row_ok[:, None] & col_ok[None, :]
            mu_s = tl.load(mu_s_ptr + cols, mask=col_ok, other=0.0)
            mu_t = tl.load(mu_t_ptr + cols, mask=col_ok, other=0.0)
            s = _load_tile(s_ptr, rows, cols, ok, s_sm, s_sk)
            t = _load_tile(t_ptr, rows, cols, ok, t_sm, t_sk)
            s_ac = tl.where(ok, s - mu_s[None, :], 0.0)
            t_ac = tl.where(ok, t - mu_t[None, :], 0.0)
            ss += s_ac * s_ac
            tt += t_ac * t_ac
            st += s_ac * t_ac
        ss_rows = tl.sum(ss, axis=1)
        tt_rows = tl.sum(tt, axis=1)
        # the rounding guard of frequency.py: an AC row this small next to its mean vector is an exact zero
        live_s = tl.where(ss_rows > tolerance_sq * mu_ss_sum, 1.0, 0.0)
        live_t = tl.where(tt_rows > tolerance_sq * mu_tt_sum, 1.0, 0.0)
        term, a_s, a_t, coef_b = _term_and_coefficients(ss_rows, tt_rows, tl.sum(st, axis=1), live_s, live_t,
                                                         floor)
        ac_sum += tl.where(row_ok, term, 0.0)
        if WITH_GRADIENTS:
            tl.store(ac_coef_ptr + rows * 3, a_s, mask=row_ok)
            tl.store(ac_coef_ptr + rows * 3 + 1, a_t, mask=row_ok)
            tl.store(ac_coef_ptr + rows * 3 + 2, coef_b, mask=row_ok)
    if WITH_GRADIENTS:
        tl.store(dc_coef_ptr, dc_a_s)
        tl.store(dc_coef_ptr + 1, dc_a_t)
        tl.store(dc_coef_ptr + 2, dc_b)
    # sum-SE / B, the DC term counted once per row
    tl.store(terms_ptr, dc * M / batch)
    tl.store(terms_ptr + 1, tl.sum(ac_sum, axis=0) / batch)


@triton.jit
def _forward_kernel(sp_ptr, ch_ptr, t_ptr, work_ptr, terms_ptr, channel_work_offset, batch, C, N,
                    sp_sb, sp_sc, sp_sn, ch_sb, ch_sc, ch_sn, t_sb, t_sc, t_sn, tolerance_sq, floor,
                    WITH_GRADIENTS: tl.constexpr, SP_BLOCK_M: tl.constexpr, SP_BLOCK_K: tl.constexpr,
                    CH_BLOCK_M: tl.constexpr, CH_BLOCK_K: tl.constexpr):
    """Program (b, branch): branch 0 is the spatial one (rows are positions, vectors run over channels), branch
    1 the channel one (rows are channels, vectors run over positions)."""
    b = tl.program_id(0)
    num_terms = 2 * tl.num_programs(1)
    if tl.program_id(1) == 0:
        _branch_forward(sp_ptr + b * sp_sb, t_ptr + b * t_sb, work_ptr, terms_ptr + b * num_terms, b, batch, N, C,
                        sp_sn, sp_sc, t_sn, t_sc, tolerance_sq, floor, WITH_GRADIENTS, SP_BLOCK_M, SP_BLOCK_K)
    else:
        _branch_forward(ch_ptr + b * ch_sb, t_ptr + b * t_sb, work_ptr + channel_work_offset,
                        terms_ptr + b * num_terms + 2, b, batch, C, N, ch_sc, ch_sn, t_sc, t_sn, tolerance_sq, floor,
                        WITH_GRADIENTS, CH_BLOCK_M, CH_BLOCK_K)


@triton.jit
def _ac_gradient_rows(s_ptr, t_ptr, ac_coef_ptr, mu_s, mu_t, m0, cols, col_ok, M, s_sm, s_sk, t_sm, t_sk,
                      BLOCK_M: tl.constexpr):
    """a_s * (s - mu_s) + b * (t - mu_t), the AC gradient before scaling, for BLOCK_M rows from m0 (0 outside the
    map); also the rows and the mask."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ok = row_ok[:, None] & col_ok[None, :]
    a_s = tl.load(ac_coef_ptr + rows * 3, mask=row_ok, other=0.0)[:, None]
    coef_b = tl.load(ac_coef_ptr + rows * 3 + 2, mask=row_ok, other=0.0)[:, None]
    s = _load_tile(s_ptr, rows, cols, ok, s_sm, s_sk)
    t = _load_tile(t_ptr, rows, cols, ok, t_sm, t_sk)
    return tl.where(ok, a_s * (s - mu_s) + coef_b * (t - mu_t), 0.0), rows, ok


@triton.jit
def _branch_gradient(s_ptr, t_ptr, work_ptr, grad_dc_ptr, grad_ac_ptr, g_ptr, b, cols, batch, M, K,
                     s_sm, s_sk, t_sm, t_sk, g_sm, g_sk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One block of columns of one sample's student gradient."""
    col_ok = cols < K
    mu_s_ptr, mu_t_ptr, ac_coef_ptr, dc_coef_ptr = _work_pointers(work_ptr, b, batch, M, K)
    dc_scale = tl.load(grad_dc_ptr) / batch
    ac_scale = tl.load(grad_ac_ptr) / batch
    mu_s = tl.load(mu_s_ptr + cols, mask=col_ok, other=0.0)
    mu_t = tl.load(mu_t_ptr + cols, mask=col_ok, other=0.0)
    # first pass: the column means of the AC gradient, whose subtraction is the adjoint of subtracting the mean
    col_sum = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        ac_gradient, rows, ok = _ac_gradient_rows(s_ptr, t_ptr, ac_coef_ptr, mu_s, mu_t, m0, cols, col_ok, M,
                                                  s_sm, s_sk, t_sm, t_sk, BLOCK_M)
        col_sum += ac_gradient
    # what every element of a column loses: its AC mean, less the DC gradient spread evenly over the M rows
    dc_gradient = tl.load(dc_coef_ptr) * mu_s + tl.load(dc_coef_ptr + 2) * mu_t
    shift = ac_scale * tl.sum(col_sum, axis=0) / M - dc_scale * dc_gradient
    for m0 in range(0, M, BLOCK_M):
        ac_gradient, rows, ok = _ac_gradient_rows(s_ptr, t_ptr, ac_coef_ptr, mu_s, mu_t, m0, cols, col_ok, M,
                                                  s_sm, s_sk, t_sm, t_sk, BLOCK_M)
        tl.store(g_ptr + rows[:, None] * g_sm + cols[None, :] * g_sk, ac_scale * ac_gradient - shift[None, :],
                 mask=ok)


@triton.jit
def _gradient_kernel(sp_ptr, ch_ptr, t_ptr, work_ptr, sp_dc_grad_ptr, sp_ac_grad_ptr, ch_dc_grad_ptr, ch_ac_grad_ptr,
                     gsp_ptr, gch_ptr, channel_work_offset, batch, C, N,
                     sp_sb, sp_sc, sp_sn, ch_sb, ch_sc, ch_sn, t_sb, t_sc, t_sn,
                     gsp_sb, gsp_sc, gsp_sn, gch_sb, gch_sc, gch_sn,
                     SP_BLOCK_M: tl.constexpr, SP_BLOCK_K: tl.constexpr,
                     CH_BLOCK_M: tl.constexpr, CH_BLOCK_K: tl.constexpr):
    """Program (b, column block, branch); the *_grad pointers hold the incoming gradients of the terms."""
    b = tl.program_id(0)
    block = tl.program_id(1)
    if tl.program_id(2) == 0:
        if block * SP_BLOCK_K < C:
            _branch_gradient(sp_ptr + b * sp_sb, t_ptr + b * t_sb, work_ptr, sp_dc_grad_ptr, sp_ac_grad_ptr,
                             gsp_ptr + b * gsp_sb, b, block * SP_BLOCK_K + tl.arange(0, SP_BLOCK_K), batch, N, C,
                             sp_sn, sp_sc, t_sn, t_sc, gsp_sn, gsp_sc, SP_BLOCK_M, SP_BLOCK_K)
    else:
        if block * CH_BLOCK_K < N:
            _branch_gradient(ch_ptr + b * ch_sb, t_ptr + b * t_sb, work_ptr + channel_work_offset,
                             ch_dc_grad_ptr, ch_ac_grad_ptr, gch_ptr + b * gch_sb, b,
                             block * CH_BLOCK_K + tl.arange(0, CH_BLOCK_K), batch, C, N,
                             ch_sc, ch_sn, t_sc, t_sn, gch_sc, gch_sn, CH_BLOCK_M, CH_BLOCK_K)


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


# (BLOCK_M, BLOCK_K) caps of each branch, the best of a sweep on an H100 at B=64, C=768, 7x7 and 14x14
SPATIAL_BLOCKS, CHANNEL_BLOCKS = (32, 128), (128, 32)
GRADIENT_BLOCKS = (64, 64)


def map_strides(x: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """(batch, channel, position) strides of a (B, C, H, W) map whose H*W positions are one strided axis
    (contiguous, channels_last, a transposed token tensor), else None."""
    _, _, h, w = x.shape
    if h == 1 or w == 1:
        return x.stride(0), x.stride(1), x.stride(3) if h == 1 else x.stride(2)
    if x.stride(2) != w * x.stride(3):
        return None
    return x.stride(0), x.stride(1), x.stride(3)


def work_size(batch: int, c: int, n: int, branches: int) -> Tuple[int, int]:
    """Floats in the work buffer (its layout is above `_work_pointers`), and where the channel branch's part
    starts: the spatial branch's part has K = C and M = N, the channel branch's K = N and M = C."""
    spatial = batch * (2 * c + 3 * n + 3)
    return (spatial if branches == 1 else spatial + batch * (2 * n + 3 * c + 3)), spatial


def _blocks(c: int, n: int, sp_caps, ch_caps):
    return dict(SP_BLOCK_M=_block(n, sp_caps[0]), SP_BLOCK_K=_block(c, sp_caps[1]),
                CH_BLOCK_M=_block(c, ch_caps[0]), CH_BLOCK_K=_block(n, ch_caps[1]))


def decoupled_terms(spatial: torch.Tensor, channel: Optional[torch.Tensor], teacher: torch.Tensor,
                    with_gradients: bool):
    """The (DC, AC) terms of the spatial branch, then those of the channel branch when `channel` is given, as float32
    scalar tensors, for (B, C, H, W) maps (float32, bfloat16 or float16; the math is float32), and the work buffer
    the backward reads (None without gradients).

    One launch and one sum, and one buffer for the means and coefficients (per branch: means of both maps, 3
    coefficients per row, 3 per sample): at UFD's shapes the host's cost per operation sets the time."""
    batch, c, h, w = teacher.shape
    n, branches = h * w, 1 if channel is None else 2
    channel_or_spatial = spatial if channel is None else channel  # the kernel takes a pointer either way
    size, channel_work_offset = work_size(batch, c, n, branches)
    work = torch.empty(size, device=teacher.device, dtype=torch.float32)
    terms_per_sample = torch.empty(batch, 2 * branches, device=teacher.device, dtype=torch.float32)
    with on_device(teacher.device):
        _forward_kernel[(batch, branches)](
            spatial, channel_or_spatial, teacher, work, terms_per_sample, channel_work_offset, batch, c, n,
            *map_strides(spatial), *map_strides(channel_or_spatial), *map_strides(teacher),
            AC_RELATIVE_TOLERANCE ** 2, SQUARED_NORM_FLOOR, WITH_GRADIENTS=with_gradients,
            **_blocks(c, n, SPATIAL_BLOCKS, CHANNEL_BLOCKS), num_warps=8)
    return terms_per_sample.sum(0).unbind(), (work if with_gradients else None)


def decoupled_gradients(spatial: torch.Tensor, channel: Optional[torch.Tensor], teacher: torch.Tensor,
                        work: torch.Tensor, *term_grads: torch.Tensor):
    """The gradients of sum(terms * term_grads) (one float32 scalar tensor per term) with respect to the spatial and
    the channel student maps, in their dtype and memory format (the teacher's map gets none)."""
    batch, c, h, w = teacher.shape
    n, branches = h * w, 1 if channel is None else 2
    channel_or_spatial = spatial if channel is None else channel
    grad_spatial = torch.empty_like(spatial)
    grad_channel = torch.empty_like(channel) if channel is not None else grad_spatial
    blocks = _blocks(c, n, GRADIENT_BLOCKS, GRADIENT_BLOCKS)
    column_blocks = max(triton.cdiv(c, blocks['SP_BLOCK_K']),
                        triton.cdiv(n, blocks['CH_BLOCK_K']) if channel is not None else 0)
    # with the spatial branch alone, its two gradients fill the channel branch's unused pointers too
    with on_device(teacher.device):
        _gradient_kernel[(batch, column_blocks, branches)](
            spatial, channel_or_spatial, teacher, work, *(term_grads * (4 // len(term_grads))),
            grad_spatial, grad_channel, work_size(batch, c, n, branches)[1], batch, c, n,
            *map_strides(spatial), *map_strides(channel_or_spatial), *map_strides(teacher),
            *map_strides(grad_spatial), *map_strides(grad_channel), **blocks)
    return grad_spatial, (grad_channel if channel is not None else None)
