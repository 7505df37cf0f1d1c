"""Logit standardization (LS): Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation"
(CVPR 2024). Spec: docs/methods/logit2.md §1.

A pre-process, not a loss: a logit method with `--logit-standardize` turns the student's and the teacher's logits
into per-row z-scores before its temperature softmax, so that its temperature becomes a base temperature tau_0 that
divides the z-scores. The task loss still sees the raw student logits.

The flag is declared in one place, `add_logit_standardize_arg(parser)`. Every distiller that honours it calls that
function from its own `add_args` and sets the class attribute `accepts_logit_standardize = True` (distillers/base.py
refuses the flag for every other distiller). The function declares the flag only when the parser does not hold it
yet, so the classes that call it can all add their arguments to one parser, as distillers/__init__.py does.
"""
import argparse

import torch

from .base import float32_loss

LOGIT_STANDARDIZE_FLAG = '--logit-standardize'


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(z - mean) / (eps + std) along the last (class) axis, with the unbiased std, in float32.

    Mean and std keep their gradient. A constant row gives zeros; fewer than two classes is a ValueError."""
    if logits.shape[-1] < 2:
        raise ValueError(f'standardize_logits needs at least 2 classes along the last axis, got shape '
                         f'{tuple(logits.shape)}')
    with float32_loss(logits.device.type):
        z = logits.float()
        mean = z.mean(dim=-1, keepdim=True)
        # unbiased (K - 1) as torch.std's default: the published runs used it, and the population form would
        # change the effective temperature by sqrt(K / (K - 1))
        std = z.std(dim=-1, keepdim=True)
        return (z - mean) / (eps + std)


def distillation_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, standardize: bool):
    """The (student, teacher) logits a distillation term compares: as given, or each standardized on its own
    (`--logit-standardize`)."""
    if not standardize:
        return student_logits, teacher_logits
    return standardize_logits(student_logits), standardize_logits(teacher_logits)


def add_logit_standardize_arg(parser):
    """Declare --logit-standardize / --no-logit-standardize on `parser` (a parser or an argument group) unless it
    is there already."""
    if LOGIT_STANDARDIZE_FLAG in parser._option_string_actions:
        return
    parser.add_argument(LOGIT_STANDARDIZE_FLAG, action=argparse.BooleanOptionalAction, default=False,
                        help='kd, dkd, mlkd, ctkd: z-score the student and teacher logits per sample before the '
                             'temperature softmax; the method\'s temperature becomes the base temperature '
                             '(default: off)')
