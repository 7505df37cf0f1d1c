"""CRD: Tian, Krishnan, Isola, "Contrastive Representation Distillation" (ICLR 2020), as OFAKD runs it.
Spec: docs/methods/others.md §7.

Each model's pooled pre-logits feature is embedded (a trainable linear map per model, L2-normalized) and scored
against a memory bank of the other model's embeddings of every training sample: the sample's own row is the
positive, K rows of samples of other classes are the negatives, and a noise-contrastive loss separates them. The
banks follow the embeddings with momentum.

What the distiller declares (distillers/base.py): `needs_sample_indices`. train.py then hands it the training
labels once (`set_train_targets`, which sizes the banks) and each batch's dataset indices (`sample_index`).

Decisions:
- The negatives are drawn on the device, not in the loader: a batch of 64 carries 1M of them, and the draw is a
  counter-based hash of (data seed, epoch, sample index, slot), so it is a pure function of the step, like the
  augmentation, and a resumed run draws what the uninterrupted one drew. Each sample gets new negatives every epoch.
- Under DDP every rank all-gathers the embeddings and indices of the step and applies the same bank update, so the
  banks stay identical without DDP re-broadcasting them (they are excluded from its buffer broadcast); the
  normalizing constants come from the gathered first batch.
- The banks and constants change only in a step whose total loss is finite on every rank (train.py keeps no other
  step), decided on the device: train.py's NaN check therefore need not back them up before every step
  (`rollback_buffers`), which on ImageNet would copy 1.3 GB per step.
- Banks and constants are buffers: they are in the checkpoint's distiller state, and --resume continues them.
"""
import logging
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data.mixup import mixup_requested
from models.features import FeatureRequest

from .base import Distiller, DistillerError, float32_loss

_logger = logging.getLogger(__name__)


def crd_nce_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The NCE loss of one score matrix (B, K + 1), positive first, scores already divided by their constant Z.

    -(1/B) [sum_b log(x_b0 / (x_b0 + K/N + 1e-7)) + sum_b sum_{j>=1} log((K/N) / (x_bj + K/N + 1e-7))], with
    N = num_samples. The positives are summed over the batch and the negatives as one flat sum, in float32."""
    with float32_loss(scores.device.type):
        x = scores.float()
        noise = (x.shape[1] - 1) * (1.0 / num_samples)  # m * P_n, in the reference's order
        offset = noise + 1e-7  # one float32 constant, as the reference adds it
        positive = x[:, :1]
        negative = x[:, 1:]
        log_positive = torch.log(positive / (positive + offset))
        log_negative = torch.log(torch.full_like(negative, noise) / (negative + offset))
        return -(log_positive.sum(0) + log_negative.reshape(-1, 1).sum(0))[0] / x.shape[0]


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_SPLITMIX_STEP = _signed64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = _signed64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = _signed64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors (wrapping arithmetic): distinct inputs give uncorrelated outputs."""
    x = (x ^ _shift_right(x, 30)) * _SPLITMIX_MUL1
    x = (x ^ _shift_right(x, 27)) * _SPLITMIX_MUL2
    return x ^ _shift_right(x, 31)


def uniform_draws(keys: torch.Tensor, count: int, bound: torch.Tensor) -> torch.Tensor:
    """(len(keys), count) integers, row b uniform in [0, bound[b]), a pure function of (keys[b], column)."""
    slots = torch.arange(1, count + 1, device=keys.device, dtype=torch.int64) * _SPLITMIX_STEP
    bits = _shift_right(mix64(keys[:, None] + slots), 11)  # 53 random bits: modulo bias below 1e-9 for N < 10^7
    return bits % bound[:, None]


class CRD(Distiller):
    """Total = CE + kd_loss_weight * (nce(student scores) + nce(teacher scores)), logged as loss_crd."""
    name = 'crd'
    needs_sample_indices = True
    # the buffers of the contrastive state (set_train_targets), written only by _commit
    CONTRASTIVE_STATE = ('memory_student', 'memory_teacher', 'normalizers')

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--crd-feat-dim', type=int, default=128, metavar='D',
                            help='crd: width of the contrastive embedding (default: 128)')
        parser.add_argument('--crd-k', type=int, default=16384, metavar='K',
                            help='crd: negatives per sample, drawn from the other classes (default: 16384)')
        parser.add_argument('--crd-momentum', type=float, default=0.5, metavar='M',
                            help='crd: momentum of the memory bank update (default: 0.5)')
        parser.add_argument('--crd-temperature', type=float, default=0.07, metavar='T',
                            help='crd: temperature of the contrastive scores (default: 0.07)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.feat_dim = int(args.crd_feat_dim)
        self.num_negatives = int(args.crd_k)
        self.momentum = float(args.crd_momentum)
        self.temperature = float(args.crd_temperature)
        if self.feat_dim < 1:
            raise DistillerError(f'--crd-feat-dim must be a positive width, got {self.feat_dim}')
        if self.num_negatives < 1:
            raise DistillerError(f'--crd-k must be at least 1 negative, got {self.num_negatives}')
        if not 0 <= self.momentum < 1:
            raise DistillerError(f'--crd-momentum must be in [0, 1), got {self.momentum}')
        if self.temperature <= 0:
            raise DistillerError(f'--crd-temperature must be positive, got {self.temperature}')
        if mixup_requested(args):
            _logger.warning('WARNING: crd with mixup/cutmix: a mixed image is contrasted as its first sample '
                            '(the positive index no longer describes it), as in OFAKD')
        if (getattr(args, 'aug_repeats', 0) or 0) > 1:
            raise DistillerError(f'crd writes one memory row per sample and step, which --aug-repeats '
                                 f'{args.aug_repeats} would write several times at once; set --aug-repeats 0')
        self.seed = int(getattr(args, 'seed', 0))
        # the negatives belong to the data stream (sample order, augmentation): --data-seed where it is given
        data_seed = getattr(args, 'data_seed', None)
        self.draw_seed = self.seed if data_seed is None else int(data_seed)
        self.request = FeatureRequest(pre_logits=True)
        self.check_features(self.request)
        self.embed_student = nn.Linear(self.student_adapter.description.pre_logits_dim, self.feat_dim)
        self.embed_teacher = nn.Linear(self.teacher_adapter.description.pre_logits_dim, self.feat_dim)
        self.num_samples = 0
        self._normalizers_known = False

    # ---------------------------------------------------------------- training set
    def set_train_targets(self, targets):
        """The class of every training sample, in dataset order: sizes the banks and the negative pools."""
        targets = torch.as_tensor(targets, dtype=torch.int64).flatten().cpu()
        num_samples = targets.numel()
        if num_samples == 0 or int(targets.min()) < 0:
            raise DistillerError('crd needs the class of every training sample; the training set has unlabelled '
                                 'or no samples')
        counts = torch.bincount(targets)
        if int(counts.max()) == num_samples:
            raise DistillerError(f'crd draws its negatives from the other classes, but all {num_samples} training '
                                 f'samples are of class {int(targets[0])}')
        self.num_samples = num_samples
        device = self.embed_student.weight.device
        order = torch.sort(targets, stable=True).indices
        # the negatives of a class-c sample are drawn from `class_order` with the block of class c cut out
        self.register_buffer('train_targets', targets.to(device), persistent=False)
        self.register_buffer('class_order', order.to(device), persistent=False)
        self.register_buffer('class_start', (torch.cumsum(counts, 0) - counts).to(device), persistent=False)
        self.register_buffer('class_count', counts.to(device), persistent=False)
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        gen = torch.Generator().manual_seed(self.seed)
        banks = torch.rand(2, num_samples, self.feat_dim, generator=gen) * (2 * bound) - bound
        self.register_buffer('memory_student', banks[0].to(device))
        self.register_buffer('memory_teacher', banks[1].to(device))
        # Z of the student and teacher scores; negative = not yet set (fixed from the first batch)
        self.register_buffer('normalizers', torch.full((2,), -1.0, device=device))
        self._normalizers_known = False
        # identical on every rank by construction (gathered updates): DDP need not broadcast them every step
        self._ddp_params_and_buffers_to_ignore = ['train_targets', 'class_order', 'class_start', 'class_count',
                                                  *self.CONTRASTIVE_STATE]

    def rollback_buffers(self):
        # _commit leaves the contrastive state as it is in a step that train.py does not keep
        return [b for n, b in self.named_buffers() if b.is_floating_point() and n not in self.CONTRASTIVE_STATE]

    def load_distiller_state_dict(self, state):
        if self.num_samples == 0:
            raise DistillerError('crd: set_train_targets must come before its state is loaded')
        bank = state.get('memory_student')
        if bank is not None and bank.shape[0] != self.num_samples:
            raise DistillerError(f'distiller state does not fit {self.name!r}: its memory banks hold '
                                 f'{bank.shape[0]} samples, the training set {self.num_samples}')
        super().load_distiller_state_dict(state)
        self._normalizers_known = False

    def contrast_indices(self, sample_index: torch.Tensor, epoch: int) -> torch.Tensor:
        """(B, K + 1): each sample's own index, then K indices of samples of other classes, uniform with
        replacement, a pure function of (seed, epoch, sample index)."""
        epoch_key = int(mix64(torch.tensor([_signed64(self.draw_seed * 1000003 + int(epoch))]))[0])
        targets = self.train_targets[sample_index]
        start, count = self.class_start[targets], self.class_count[targets]
        draws = uniform_draws(mix64(sample_index + epoch_key), self.num_negatives, self.num_samples - count)
        position = draws + torch.where(draws >= start[:, None], count[:, None], 0)
        return torch.cat([sample_index[:, None], self.class_order[position]], dim=1)

    # ---------------------------------------------------------------- forward
    def _gather(self, *tensors):
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return tensors
        out = []
        for t in tensors:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, t.contiguous())
            out.append(torch.cat(parts))
        return out

    def _normalizers(self, exp_student, exp_teacher):
        """((Z_student, Z_teacher), new): the stored constants once set, else N x the mean unnormalized score of this
        batch (of all ranks), which _commit stores if the step is kept."""
        if not self._normalizers_known:  # a host read in each step until the first kept one, none after
            self._normalizers_known = bool((self.normalizers > 0).all())
        if self._normalizers_known:
            return self.normalizers, False
        with torch.no_grad():
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                totals = torch.stack([exp_student.sum(), exp_teacher.sum(),
                                      torch.tensor(float(exp_student.numel()), device=exp_student.device)])
                dist.all_reduce(totals)
                means = totals[:2] / totals[2]
            else:
                means = torch.stack([exp_student.mean(), exp_teacher.mean()])
            return means * self.num_samples, True

    def forward(self, images, labels, epoch=0, sample_index=None):
        if sample_index is None:
            raise ValueError('crd needs the dataset index of every sample of the batch (sample_index)')
        if self.num_samples == 0:
            raise DistillerError('crd: call set_train_targets with the training labels before training')
        teacher = self.teacher_forward(images, self.request)
        student = self.student_forward(images, self.request)
        sample_index = sample_index.to(self.memory_student.device, torch.int64)
        with float32_loss(images.device.type):
            embed_student = F.normalize(self.embed_student(student.pre_logits.float()), dim=1)
            embed_teacher = F.normalize(self.embed_teacher(teacher.pre_logits.float()), dim=1)
            contrast = self.contrast_indices(sample_index, epoch)
            # the student's embedding is scored against the teacher's bank, and the other way round
            rows_teacher = self.memory_teacher[contrast]
            rows_student = self.memory_student[contrast]
            exp_student = torch.exp(torch.bmm(rows_teacher, embed_student[:, :, None]).squeeze(2) / self.temperature)
            exp_teacher = torch.exp(torch.bmm(rows_student, embed_teacher[:, :, None]).squeeze(2) / self.temperature)
            normalizers, new_normalizers = self._normalizers(exp_student.detach(), exp_teacher.detach())
            loss = crd_nce_loss(exp_student / normalizers[0], self.num_samples) + \
                crd_nce_loss(exp_teacher / normalizers[1], self.num_samples)
        losses = {
            'loss_gt': self.gt_loss(student.logits, labels),
            'loss_crd': self.kd_loss_weight * loss,
        }
        # train.py keeps the step only if the sum of the losses is finite on every rank (else it stops, saving the
        # state before the step); the same sum decides here whether the step may move the contrastive state
        self._commit(sample_index, embed_student.detach(), embed_teacher.detach(),
                     normalizers if new_normalizers else None, torch.isfinite(sum(losses.values()).detach()))
        return student.logits, losses

    @torch.no_grad()
    def _commit(self, sample_index, embed_student, embed_teacher, new_normalizers, finite):
        """The momentum update of the batch's bank rows and, when given, the first constants: applied where `finite`
        holds on every rank, left out otherwise, without a host read."""
        flag = finite.float().expand(embed_student.shape[0], 1)
        sample_index, gathered = self._gather(sample_index, torch.cat([embed_student, embed_teacher, flag], dim=1))
        keep = gathered[:, -1].min() > 0
        width = self.feat_dim
        with float32_loss(gathered.device.type):
            for bank, embed in ((self.memory_student, gathered[:, :width]),
                                (self.memory_teacher, gathered[:, width:2 * width])):
                old = bank[sample_index]
                rows = F.normalize(old * self.momentum + embed * (1 - self.momentum), dim=1)
                bank.index_copy_(0, sample_index, torch.where(keep, rows, old))
        if new_normalizers is not None:
            self.normalizers.copy_(torch.where(keep, new_normalizers, self.normalizers))
