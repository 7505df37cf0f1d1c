"""Mixup and cutmix (timm's flags and modes) whose every draw is a function of (data seed, epoch, global position).

timm's Mixup pairs each image with its mirror in the process's own batch and draws lambda from the process's
global NumPy RNG, so the image a sample becomes depends on the number of processes and on the training RNG. Here:
- the partner of the sample at offset o of a global batch of G samples is the one at offset (o + G/2) mod G.
  EpochSampler deals global position p to rank p mod W, so with an even per-process batch B the partner always
  lives in the same process's batch, at local row (j + B/2) mod B: no communication, whatever W;
- lambda, the mixup/cutmix switch and the cutmix box come from a generator seeded with (data seed, epoch, global
  batch), drawn for the whole global batch and read at each sample's offset ('elem'), pair ('pair': the pair's
  first offset) or once ('batch').
The image a sample becomes is then the same under 1 or N processes with the same global batch, and a run's
data stream (what a teacher cache stores, data/teacher_cache.py) does not depend on the initialization seed.
"""
import numpy as np
import torch


def mixup_requested(args) -> bool:
    """Whether the flags turn mixup or cutmix on (timm's rule; a namespace without them means off)."""
    return (getattr(args, 'mixup', 0) > 0 or getattr(args, 'cutmix', 0) > 0
            or getattr(args, 'cutmix_minmax', None) is not None)


def smoothed_one_hot(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((target.shape[0], num_classes), off, device=target.device, dtype=torch.float32)
    return out.scatter_(1, target.long().view(-1, 1), 1.0 - smoothing + off)


class GlobalBatchMixup:
    """Mixup/cutmix of a process's batch, given the global positions of its samples in the epoch's order
    (EpochSampler.batch_positions). Modes as timm's: 'batch' (one draw per global batch), 'pair' (one per pair),
    'elem' (one per sample). The targets are smoothed one-hot vectors mixed with the same lambdas."""

    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, cutmix_minmax=None, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = 'batch', correct_lam: bool = True,
                 label_smoothing: float = 0.1, num_classes: int = 1000, seed: int = 0, global_batch: int = 2):
        if mode not in ('batch', 'pair', 'elem'):
            raise ValueError(f'mixup mode {mode!r} is not one of batch, pair, elem')
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = 1.0 if cutmix_minmax is not None else cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        self.mix_prob = prob
        self.switch_prob = switch_prob
        self.mode = mode
        self.correct_lam = correct_lam
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.seed = int(seed)
        self.global_batch = int(global_batch)
        self.mixup_enabled = True  # train.py turns it off after --mixup-off-epoch

    def _generator(self, epoch: int, batch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % (1 << 63), 0x6d697875, int(epoch), int(batch)])

    def _draw(self, rng: np.random.Generator, count: int, height: int, width: int):
        """(lam, use_cutmix, boxes (count, 4) as yl, yh, xl, xh) for `count` mixing units, all drawn in one fixed
        order whatever is used, so that a unit's values do not depend on the others'."""
        apply = rng.random(count) < self.mix_prob
        switch = rng.random(count) < self.switch_prob
        lam_cut = rng.beta(self.cutmix_alpha, self.cutmix_alpha, count) if self.cutmix_alpha > 0 else np.ones(count)
        lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha, count) if self.mixup_alpha > 0 else np.ones(count)
        centre_or_corner = rng.random((count, 2))
        cut_fraction = rng.random((count, 2))
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = switch
        else:
            use_cutmix = np.full(count, self.cutmix_alpha > 0)
        lam = np.where(use_cutmix, lam_cut, lam_mix)
        if not self.mixup_enabled:
            apply = np.zeros(count, dtype=bool)
        lam = np.where(apply, lam, 1.0)
        use_cutmix &= apply
        boxes = np.zeros((count, 4), dtype=np.int64)
        for k in np.flatnonzero(use_cutmix):
            if self.cutmix_minmax is not None:
                low, high = self.cutmix_minmax
                cut_h = int(height * low) + int(cut_fraction[k, 0] * max(int(height * high) - int(height * low), 1))
                cut_w = int(width * low) + int(cut_fraction[k, 1] * max(int(width * high) - int(width * low), 1))
                yl = int(centre_or_corner[k, 0] * (height - cut_h + 1))
                xl = int(centre_or_corner[k, 1] * (width - cut_w + 1))
                box = (yl, yl + cut_h, xl, xl + cut_w)
            else:
                ratio = np.sqrt(1.0 - lam[k])
                cut_h, cut_w = int(height * ratio), int(width * ratio)
                cy, cx = int(centre_or_corner[k, 0] * height), int(centre_or_corner[k, 1] * width)
                box = (max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height),
                       max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width))
            boxes[k] = box
            if self.correct_lam or self.cutmix_minmax is not None:
                lam[k] = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(height * width)
        return lam, use_cutmix, boxes

    def __call__(self, x: torch.Tensor, target: torch.Tensor, positions: torch.Tensor, epoch: int):
        batch = x.shape[0]
        if batch % 2:
            raise ValueError(f'mixup/cutmix pair the samples of a batch: the batch of {batch} must be even')
        positions = positions.cpu().numpy() if isinstance(positions, torch.Tensor) else np.asarray(positions)
        global_batch = self.global_batch
        batch_index = int(positions[0]) // global_batch
        offsets = positions - batch_index * global_batch
        rng = self._generator(epoch, batch_index)
        height, width = x.shape[-2:]
        if self.mode == 'batch':
            lam, use_cutmix, boxes = self._draw(rng, 1, height, width)
            unit = np.zeros(batch, dtype=np.int64)
        else:
            half = global_batch // 2
            lam, use_cutmix, boxes = self._draw(rng, global_batch if self.mode == 'elem' else half, height, width)
            unit = offsets if self.mode == 'elem' else offsets % half
        partner = x.roll(batch // 2, dims=0)
        if self.mode == 'batch':
            if lam[0] != 1.0:
                if use_cutmix[0]:
                    yl, yh, xl, xh = boxes[0].tolist()
                    x[:, :, yl:yh, xl:xh] = partner[:, :, yl:yh, xl:xh]
                else:
                    x.mul_(float(lam[0])).add_(partner.mul_(1.0 - float(lam[0])))
            lam_rows = torch.full((batch, 1), float(lam[0]), device=x.device)
        else:
            for row, k in enumerate(unit.tolist()):
                if lam[k] == 1.0:
                    continue
                if use_cutmix[k]:
                    yl, yh, xl, xh = boxes[k].tolist()
                    x[row, :, yl:yh, xl:xh] = partner[row, :, yl:yh, xl:xh]
                else:
                    x[row] = x[row] * float(lam[k]) + partner[row] * (1.0 - float(lam[k]))
            lam_rows = torch.tensor(lam[unit], dtype=torch.float32, device=x.device).view(-1, 1)
        own = smoothed_one_hot(target, self.num_classes, self.label_smoothing)
        mixed = own * lam_rows + own.roll(batch // 2, dims=0) * (1.0 - lam_rows)
        return x, mixed
