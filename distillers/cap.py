"""ScaleKD's cross-attention projector (CAP): a student map in, tokens in the layout of a teacher map out
(docs/methods/scalekd.md §3, docs/methods/ufd.md §3). UFD and ScaleKD project the student with it.
"""
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .base import Distiller


def default_num_heads(width: int) -> int:
    """Heads for a CAP of output width `width`: the largest divisor of `width` not above width / 64 (at least 1).

    This is ScaleKD's rule for the pairs it ships no config for (docs/methods/scalekd.md §7): 768 -> 12, 1536 -> 24,
    384 -> 6, 2048 -> 32. Recipes that shipped other counts set them explicitly.
    """
    target = max(1, round(width / 64))
    return max(h for h in range(1, target + 1) if width % h == 0)


class CrossAttentionProjector(nn.Module):
    """ScaleKD's cross-attention projector (CAP): docs/methods/ufd.md §3, docs/methods/scalekd.md §3.

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
