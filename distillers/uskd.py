"""USKD: Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
Normalized Loss and Customized Soft Labels" (ICCV 2023), its teacher-free half. Spec: docs/methods/logit.md §5.

No teacher. A weak linear head on a mid-level student feature supplies (with the student's own
prediction) the ranking of the non-target classes, which get Zipf-law soft labels 1/rank; the target
term is re-weighted by the student's squared target probability.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.features import FeatureRequest

from .base import Distiller, DistillerError, class_mask, float32_loss, hard_targets

RANK_MODES = ('prob', 'logprob')


def zipf_values(num_classes: int, device=None) -> torch.Tensor:
    """(1, 1/2, ..., 1/K) as float32."""
    return 1.0 / torch.arange(1, num_classes + 1, device=device, dtype=torch.float32)


def label_sets(target: torch.Tensor, soft_labels: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices Y, values v), both (B, J): J = 1 for class indices, J = 2 for soft labels (two largest)."""
    if soft_labels is None:
        index = target.long().view(-1, 1)
        return index, torch.ones(index.shape, device=index.device, dtype=torch.float32)
    # stable: on ties the lowest class index comes first, so a one-class row gets a fixed second index
    value, index = soft_labels.float().sort(dim=-1, descending=True, stable=True)
    return index[:, :2], value[:, :2]


def customized_target_weights(student_log_probs: torch.Tensor, index: torch.Tensor,
                              value: torch.Tensor) -> torch.Tensor:
    """s_hat = s^2 + v - batch mean of s^2 per label column, zero where v = 0; detached (B, J)."""
    s_squared = student_log_probs.detach().gather(1, index).exp().pow(2)
    weights = s_squared + value - s_squared.mean(dim=0, keepdim=True)
    return torch.where(value > 0, weights, torch.zeros_like(weights))


def zipf_rank_values(weak_logits: torch.Tensor, student_log_probs: torch.Tensor, index: torch.Tensor,
                     rank_by: str = 'prob', zipf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1/rank of every class (targets included) by the detached rank score r; (B, K)."""
    if rank_by not in RANK_MODES:
        raise ValueError(f'rank_by must be one of {RANK_MODES}, got {rank_by!r}')
    b, k = student_log_probs.shape
    if zipf is None:
        zipf = zipf_values(k, student_log_probs.device)
    weak_probs = F.softmax(weak_logits.detach().float(), dim=-1)
    student_scores = student_log_probs.detach()
    if rank_by == 'prob':
        student_scores = student_scores.exp()

    def share_outside_labels(x):
        return x / (1.0 - x.gather(1, index).sum(dim=1, keepdim=True) + 1e-6)

    score = share_outside_labels(weak_probs) + share_outside_labels(student_scores)
    order = score.argsort(dim=-1, descending=True, stable=True)
    return torch.zeros_like(score).scatter_(1, order, zipf.to(score).expand(b, k))


def non_target_mask(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K) boolean, False at the J label classes of each row."""
    return ~class_mask(index, num_classes)


def uskd_terms(weak_logits: torch.Tensor, student_logits: torch.Tensor, target: torch.Tensor, mu: float,
               rank_by: str = 'prob', soft_labels: Optional[torch.Tensor] = None,
               zipf: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_t, L_nt, L_weak) as scalars; mu is inside L_weak. `soft_labels` (B, K), when given, must be the
    unsmoothed mixture and defines the two-label set; otherwise `target` (B,) does."""
    with float32_loss(student_logits.device.type):
        logits = student_logits.float()
        k = logits.shape[1]
        index, value = label_sets(target, soft_labels)
        log_probs = F.log_softmax(logits, dim=-1)

        target_weights = customized_target_weights(log_probs, index, value)
        loss_target = -(target_weights * log_probs.gather(1, index)).sum(dim=1).mean()

        if soft_labels is None:
            weak_target = 0.9 * F.one_hot(target.long(), k).float() + 0.1 / k
        else:
            weak_target = 0.9 * soft_labels.float() + 0.1 / k
        loss_weak = mu * -(weak_target * F.log_softmax(weak_logits.float(), dim=-1)).sum(dim=1).mean()

        # the label columns are not deleted (boolean indexing would wait for the GPU): they are weighted by 0 and
        # taken out of the non-target normalizer by a -inf fill, which is the same distribution over the rest
        keep = non_target_mask(index, k)
        ranked = zipf_rank_values(weak_logits, log_probs, index, rank_by, zipf).masked_fill(~keep, 0.0)
        soft_non_target = ranked / ranked.sum(dim=1, keepdim=True)
        log_probs_rest = logits - torch.logsumexp(logits.masked_fill(~keep, float('-inf')), dim=-1, keepdim=True)
        loss_non_target = -(soft_non_target * log_probs_rest).sum(dim=1).mean()
        return loss_target, loss_non_target, loss_weak


def uskd_loss(weak_logits: torch.Tensor, student_logits: torch.Tensor, target: torch.Tensor, alpha: float,
              beta: float, mu: float, rank_by: str = 'prob', soft_labels: Optional[torch.Tensor] = None,
              zipf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """alpha * L_t + beta * L_nt + L_weak (mu inside L_weak)."""
    loss_target, loss_non_target, loss_weak = uskd_terms(weak_logits, student_logits, target, mu, rank_by,
                                                         soft_labels, zipf)
    return alpha * loss_target + beta * loss_non_target + loss_weak


def unsmoothed_mixup_labels(labels: torch.Tensor) -> torch.Tensor:
    """The mixture of at most two one-hot labels under timm's mixup/cutmix targets, smoothing removed.

    timm builds Y = (1 - eps) * (lam * e_a + (1 - lam) * e_b) + eps / K, so with K >= 3 every row's minimum
    is the smoothing floor eps / K (0 when unsmoothed); subtracting it and renormalizing recovers the
    mixture exactly, whether or not smoothing was applied.
    """
    mass = labels.float() - labels.float().min(dim=-1, keepdim=True).values
    return mass / mass.sum(dim=-1, keepdim=True).clamp(min=1e-12)


class USKD(Distiller):
    """Total = CE + kd_loss_weight * (alpha * L_t + beta * L_nt + L_weak), logged as loss_uskd_target,
    loss_uskd_nontarget and loss_uskd_weak.

    Mid-level tap f: hierarchical models take the second-to-last adapter stage (stage 3 of 4), GAP;
    token-layout hierarchical models (Swin) first get a LayerNorm owned here, as mmcls had a per-stage
    norm. Plain token models (ViT/DeiT) take block floor(L/2) - 1; the adapter returns block taps without
    their prefix tokens, so the patch tokens of that block are averaged in place of the spec's class token.
    """
    name = 'uskd'
    needs_teacher = False

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--uskd-alpha', type=float, default=1.0, metavar='A',
                            help='uskd: weight of the customized target term (default: 1)')
        parser.add_argument('--uskd-beta', type=float, default=0.1, metavar='B',
                            help='uskd: weight of the Zipf non-target term (default: 0.1)')
        parser.add_argument('--uskd-mu', type=float, default=0.005, metavar='M',
                            help='uskd: weight of the weak head\'s supervision (default: 0.005)')
        parser.add_argument('--uskd-rank-by', default='prob', choices=RANK_MODES,
                            help='uskd: rank non-target classes by probability (published) or log-probability '
                                 '(cls_KD HEAD) (default: prob)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.alpha = float(args.uskd_alpha)
        self.beta = float(args.uskd_beta)
        self.mu = float(args.uskd_mu)
        self.rank_by = args.uskd_rank_by
        if self.rank_by not in RANK_MODES:
            raise DistillerError(f'--uskd-rank-by must be one of {RANK_MODES}, got {self.rank_by!r}')
        try:
            description = self.student_adapter.description
        except ValueError as e:
            raise DistillerError(f'uskd needs a mid-level student feature: {e}') from None
        if description.num_classes < 3:
            raise DistillerError(f'uskd needs at least 3 classes (two labels plus a non-target class), '
                                 f'the student has {description.num_classes}')
        if description.plain_tokens:
            self.mid_block = description.num_blocks // 2 - 1
            if self.mid_block < 0:
                raise DistillerError('uskd needs a token model with at least 2 blocks for its mid-level tap')
            self.mid_stage = None
            self.request = FeatureRequest(blocks=(self.mid_block,))
            channels = int(self.student_adapter.feature_info[self.mid_block]['num_chs'])
        else:
            if description.num_stages < 2:
                raise DistillerError(f'uskd needs a student with at least 2 stages for its mid-level tap, '
                                     f'{type(student).__name__} has {description.num_stages}')
            self.mid_block = None
            self.mid_stage = description.num_stages - 1
            self.request = FeatureRequest(stages=(self.mid_stage,))
            channels = description.stages[self.mid_stage].channels
        token_hierarchy = description.layout == 'tokens' and not description.plain_tokens
        self.mid_norm = nn.LayerNorm(channels) if token_hierarchy else None
        self.weak_head = nn.Linear(channels, description.num_classes)
        self.register_buffer('zipf', zipf_values(description.num_classes), persistent=False)

    def weak_logits(self, features) -> torch.Tensor:
        if self.mid_block is not None:
            mid = features.blocks[self.mid_block]
        else:
            mid = features.stages[self.mid_stage]
        if self.mid_norm is not None:
            pooled = self.mid_norm(mid.permute(0, 2, 3, 1)).mean(dim=(1, 2))
        else:
            pooled = mid.mean(dim=(2, 3))
        return self.weak_head(pooled)

    def forward(self, images, labels, epoch=0):
        features = self.student_forward(images, self.request)
        student_logits = features.logits
        weak_logits = self.weak_logits(features)
        # smoothing belongs to CE only: the label set and the weak head's target use the bare mixture
        soft_labels = unsmoothed_mixup_labels(labels) if labels.ndim == 2 else None
        loss_target, loss_non_target, loss_weak = uskd_terms(
            weak_logits, student_logits, hard_targets(labels), self.mu, self.rank_by, soft_labels, self.zipf)
        w = self.kd_loss_weight
        losses = {
            'loss_gt': self.gt_loss(student_logits, labels),
            'loss_uskd_target': w * self.alpha * loss_target,
            'loss_uskd_nontarget': w * self.beta * loss_non_target,
            'loss_uskd_weak': w * loss_weak,
        }
        return student_logits, losses
