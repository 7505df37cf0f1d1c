"""MLKD (docs/methods/logit2.md §2): the golden values of the original code, properties M1-M10, the two-view loader
and one run of each shipped recipe's distiller, and train.py end to end on the synthetic dataset."""
import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import models  # noqa: F401  (the CIFAR models of the recipes)
from data.loader import (SeededTransformDataset, TwoViewTransform, build_strong_train_transform,
                         build_train_transform, collate_train_batch, create_train_loader)
from data.mlkd_augment import CUTOUT_FILL, OPS, MLKDRandAugment, cutout
from distillers import DISTILLERS, DistillerError
from distillers.kd import kd_loss
from distillers.mlkd import (MLKD, batch_correlation_loss, class_correlation_loss, mlkd_confidence, mlkd_loss)

from .helpers import REPO, distiller_args, read_summary, run_train

TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)


def golden_logits():
    torch.manual_seed(1)
    return [torch.randn(4, 5) * 3 for _ in range(4)]  # student weak, student strong, teacher weak, teacher strong


def close(actual, expected, rel=1e-5):
    return actual == pytest.approx(expected, rel=rel)


# ------------------------------------------------------------------------------------------------ golden values
def test_golden_confidences():
    _, _, tw, _ = golden_logits()
    m, c = mlkd_confidence(tw)
    q = torch.softmax(tw, dim=-1)
    assert q.amax(-1).tolist() == pytest.approx([0.6038383, 0.7915735, 0.5251573, 0.8784476], rel=1e-5)
    assert q.sum(0).tolist() == pytest.approx([0.7560239, 1.0803856, 0.1275423, 0.6227253, 1.4133228], rel=1e-5)
    assert float(torch.quantile(q.amax(-1), 0.5)) == pytest.approx(0.6977059, rel=1e-6)
    assert m.item() == 0.5 and c.item() == pytest.approx(0.6)


@pytest.mark.parametrize('t,kd_w,kd_s,cc_w,bc_w', [
    (4, 4.7098894, 10.1879759, 0.0535813, 0.0129243),
    (3, 4.5416913, 8.9264193, 0.1121152, 0.0455333),
    (5, 4.7929482, 11.0036879, 0.0309312, 0.0046292),
    (2, 4.1189547, 6.8882771, 0.2930070, 0.1953706),
    (6, 4.8396707, 11.5603523, 0.0201675, 0.0019948),
])
def test_golden_pieces(t, kd_w, kd_s, cc_w, bc_w):
    sw, ss, tw, ts = golden_logits()
    assert close(kd_loss(sw, tw, t).item(), kd_w)
    assert close(kd_loss(ss, ts, t).item(), kd_s)
    assert close(class_correlation_loss(sw, tw, t).item(), cc_w, rel=2e-5)
    assert close(batch_correlation_loss(sw, tw, t).item(), bc_w, rel=5e-5)  # 8 digits given: 2.5e-5 rounding


@pytest.mark.parametrize('temperatures,standardize,expected', [
    (TEMPERATURES, False, (50.5782852, 0.3058813, 0.1302261)),
    ((1.0, 3.0, 5.0, 2.0, 6.0), False, (43.1415405, 0.6534155, 0.4556980)),
    ((2.0, 3.0, 5.0, 2.0, 6.0), True, (6.1566067, 0.4495367, 0.2214493)),
])
def test_golden_terms(temperatures, standardize, expected):
    terms = mlkd_loss(*golden_logits(), temperatures=temperatures, strong_count=3, logit_standardize=standardize)
    for value, want in zip(terms, expected):
        assert value.ndim == 0 and value.dtype == torch.float32
        assert close(value.item(), want)


# ------------------------------------------------------------------------------------------------ properties
def test_m1_confidence_fractions():
    gen = torch.Generator().manual_seed(3)
    tw = torch.randn(7, 9, generator=gen) * 2  # distinct values: ceil(B/2)/B and ceil(K/2)/K
    m, c = mlkd_confidence(tw)
    assert m.item() == pytest.approx(4 / 7) and c.item() == pytest.approx(5 / 9)
    m, _ = mlkd_confidence(torch.randn(1, 9).repeat(6, 1))
    assert m.item() == 1.0
    _, c = mlkd_confidence(torch.zeros(6, 9))
    assert c.item() == 1.0


def test_m2_confidences_read_only_the_teacher_weak_logits():
    sw, ss, tw, ts = golden_logits()
    base = mlkd_loss(sw, ss, tw, ts)
    # the class level is c times a function of (sw, tw) only: other strong views and LS leave it unchanged
    other = mlkd_loss(sw, ss * 2 + 1, tw, ts - 3, logit_standardize=True)
    assert torch.equal(base[1], other[1]) and torch.equal(base[2], other[2])


@pytest.mark.parametrize('standardize', [False, True])
def test_m3_zero_at_equal_logits(standardize):
    _, _, tw, ts = golden_logits()
    for term in mlkd_loss(tw.clone(), ts.clone(), tw, ts, logit_standardize=standardize):
        assert abs(term.item()) < 1e-6


def test_m4_strong_count():
    sw, ss, tw, ts = golden_logits()
    m, _ = mlkd_confidence(tw)
    every = mlkd_loss(sw, ss, tw, ts, strong_count=5)[0]
    expected = m * sum(kd_loss(sw, tw, t) for t in TEMPERATURES) + sum(kd_loss(ss, ts, t) for t in TEMPERATURES)
    torch.testing.assert_close(every, expected)
    default = mlkd_loss(sw, ss, tw, ts)[0]
    shifted = every - kd_loss(ss, ts, 2.0) - kd_loss(ss, ts, 6.0) + kd_loss(sw, tw, 2.0) + kd_loss(sw, tw, 6.0)
    torch.testing.assert_close(default, shifted)


def test_m5_permutation_invariance():
    gen = torch.Generator().manual_seed(4)
    logits = [torch.randn(6, 8, generator=gen) * 3 for _ in range(4)]
    rows, cols = torch.randperm(6, generator=gen), torch.randperm(8, generator=gen)
    base = mlkd_loss(*logits)
    for permuted in ([z[rows] for z in logits], [z[:, cols] for z in logits]):
        for a, b in zip(base, mlkd_loss(*permuted)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_m6_standardization_changes_only_the_instance_level():
    logits = golden_logits()
    plain, standardized = mlkd_loss(*logits), mlkd_loss(*logits, logit_standardize=True)
    assert torch.equal(plain[1], standardized[1]) and torch.equal(plain[2], standardized[2])
    assert abs(plain[0].item() - standardized[0].item()) > 1.0


@pytest.mark.parametrize('standardize', [False, True])
def test_m7_row_shift_invariance(standardize):
    logits = golden_logits()
    gen = torch.Generator().manual_seed(5)
    shifted = [z + torch.randn(4, 1, generator=gen) * 5 for z in logits]
    for a, b in zip(mlkd_loss(*logits, logit_standardize=standardize),
                    mlkd_loss(*shifted, logit_standardize=standardize)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_m8_gradients():
    sw, ss, tw, ts = (z.clone().requires_grad_() for z in golden_logits())
    instance, cls, bat = mlkd_loss(sw, ss, tw, ts)
    assert torch.autograd.grad(cls + bat, ss, allow_unused=True)[0] is None
    assert torch.autograd.grad(instance, ss, retain_graph=True)[0].abs().sum() > 0
    for teacher in (tw, ts):
        assert torch.autograd.grad(instance + cls + bat, teacher, allow_unused=True, retain_graph=True)[0] is None
    # with no strong temperature, the strong view gets no gradient at all
    no_strong = mlkd_loss(sw, ss, tw, ts, strong_count=0)[0]
    assert torch.autograd.grad(no_strong, ss, allow_unused=True)[0] is None


def test_float32_inside_autocast():
    logits = golden_logits()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = mlkd_loss(*(z.bfloat16() for z in logits))
    high = mlkd_loss(*(z.bfloat16().float() for z in logits))
    for a, b in zip(low, high):
        assert a.dtype == torch.float32 and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ distiller
def tiny_pair(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('test_resnet', num_classes=10), timm.create_model('test_resnet', num_classes=10)


def test_registered_with_its_declaration():
    assert DISTILLERS['mlkd'] is MLKD
    assert MLKD.two_view and not MLKD.needs_sample_indices


def test_distiller_defaults_and_weights():
    student, teacher = tiny_pair()
    distiller = MLKD(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))
    assert distiller.kd_loss_weight == 0.9 and distiller.gt_loss_weight == pytest.approx(0.1)
    assert distiller.temperatures == TEMPERATURES and distiller.strong_count == 3
    with pytest.raises(DistillerError, match='--gt-loss-weight'):
        MLKD(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(kd_loss_weight=9.0), (3, 32, 32))
    built = MLKD(student, teacher, torch.nn.CrossEntropyLoss(),
                 distiller_args(kd_loss_weight=9.0, gt_loss_weight=0.1, logit_standardize=True), (3, 32, 32))
    assert built.logit_standardize


@pytest.mark.parametrize('overrides,fragment', [
    (dict(mixup=0.2), '--mixup 0'),
    (dict(cutmix=1.0), '--cutmix 0'),
    (dict(mlkd_temperatures=[4.0, -1.0]), '--mlkd-temperatures'),
    (dict(mlkd_strong_count=6), '--mlkd-strong-count'),
])
def test_distiller_refuses(overrides, fragment):
    student, teacher = tiny_pair()
    with pytest.raises(DistillerError, match=fragment):
        MLKD(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(**overrides), (3, 32, 32))


def test_distiller_step_matches_the_pure_function_and_runs_the_student_twice():
    student, teacher = tiny_pair()
    distiller = MLKD(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(gt_loss_weight=1.0,
                                                                              kd_loss_weight=2.0), (3, 32, 32))
    distiller.train()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    bn = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    tracked = int(bn.num_batches_tracked)
    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3, 5, 9])
    logits, losses = distiller(x, y)
    assert int(bn.num_batches_tracked) == tracked + 2  # M9
    assert set(losses) == {'loss_gt', 'loss_mlkd_instance', 'loss_mlkd_class', 'loss_mlkd_batch'}
    # the same computation by hand: two student passes, the eval-mode teacher, the pure function
    reference = MLKD(tiny_pair()[0], teacher, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32)).train()
    weak_logits, strong_logits = reference.student(x[:4]), reference.student(x[4:])
    with torch.no_grad():
        teacher_logits = teacher(x)
    terms = mlkd_loss(weak_logits, strong_logits, teacher_logits[:4], teacher_logits[4:])
    torch.testing.assert_close(logits, weak_logits)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(losses['loss_gt'], ce(weak_logits, y) + ce(strong_logits, y))
    for key, term in zip(('loss_mlkd_instance', 'loss_mlkd_class', 'loss_mlkd_batch'), terms):
        torch.testing.assert_close(losses[key], 2.0 * term)
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match='two-view'):
        distiller(x[:4], y)


# ------------------------------------------------------------------------------------------------ two-view loader
class ConstantImages(torch.utils.data.Dataset):
    """Image i is filled with the value 10 * i (distinct, and told apart after any augmentation by its mean)."""

    def __init__(self, n=8, size=32):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return Image.fromarray(np.full((self.size, self.size, 3), 10 * i + 20, dtype=np.uint8)), i % 4


def loader_args(**overrides):
    args = argparse.Namespace(no_aug=False, scale=[0.5, 1.0], ratio=[1.0, 1.0], hflip=0.5, vflip=0.0,
                              color_jitter=0.0, aa=None, train_interpolation='bilinear', reprob=0.0, remode='pixel',
                              recount=1)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_rand_augment_ops_and_magnitudes():
    """The op table of the original (docs/methods/logit2.md §2), each op's action at a known magnitude, the cutout."""
    ranges = {op.__name__.strip('_'): (low, high) for op, low, high in OPS}
    assert ranges == {
        'auto_contrast': (0, 1), 'brightness': (0.05, 0.95), 'color': (0.05, 0.95), 'contrast': (0.05, 0.95),
        'equalize': (0, 1), 'identity': (0, 1), 'posterize': (4, 8), 'rotate': (-30, 30), 'sharpness': (0.05, 0.95),
        'shear_x': (-0.3, 0.3), 'shear_y': (-0.3, 0.3), 'solarize': (0, 256), 'translate_x': (-0.3, 0.3),
        'translate_y': (-0.3, 0.3)}
    ops = {op.__name__.strip('_'): op for op, _, _ in OPS}
    img = _Noise()[0][0]
    pixels = np.asarray(img).astype(int)
    for name, op in ops.items():
        for v in ranges[name]:
            out = op(img, v)
            assert out.size == img.size and out.mode == 'RGB', name
    assert np.array_equal(np.asarray(ops['identity'](img, 0.5)), pixels)
    assert np.asarray(ops['brightness'](img, 0.5)).astype(int).sum() < 0.55 * pixels.sum()  # always darker
    assert np.array_equal(np.asarray(ops['posterize'](img, 4.9)), pixels & 0xF0)  # int(v) bits kept
    solarized = np.asarray(ops['solarize'](img, 128.0)).astype(int)
    assert np.array_equal(solarized, np.where(pixels < 128, pixels, 255 - pixels))
    # translate by v * width: the output column x shows the input column x + 8
    assert np.array_equal(np.asarray(ops['translate_x'](img, 0.25))[:, :24], pixels[:, 8:])
    assert np.array_equal(np.asarray(ops['translate_y'](img, -0.25))[8:], pixels[:24])
    # cutout: one grey square of side fraction * width (corners inclusive), nothing else touched
    np.random.seed(0)
    out = np.asarray(cutout(img, 0.25)).astype(int)
    changed = (out != pixels).any(-1)
    ys, xs = changed.nonzero()
    assert (out[changed] == CUTOUT_FILL).all() and changed.sum() > 0
    assert ys.max() - ys.min() <= 8 and xs.max() - xs.min() <= 8
    assert cutout(img, 0.0) is img


def test_strong_transform_inserts_the_rand_augment_before_the_tensor():
    names = [type(t).__name__ for t in build_strong_train_transform(loader_args(), DATA_CONFIG).transforms]
    assert names.index('MLKDRandAugment') == names.index('MaybeToTensor') - 1
    assert names.count('RandomResizedCropAndInterpolation') == 1
    no_aug = [type(t).__name__ for t in build_strong_train_transform(loader_args(no_aug=True), DATA_CONFIG).transforms]
    assert 'MLKDRandAugment' in no_aug
    assert len(OPS) == 14


def test_m10_two_view_batches():
    args = loader_args()
    transform = TwoViewTransform(build_train_transform(args, DATA_CONFIG),
                                 build_strong_train_transform(args, DATA_CONFIG))
    batches = [list(create_train_loader(ConstantImages(), transform, 4, seed=3, workers=0, with_index=True))
               for _ in range(2)]
    for first, second in zip(*batches):
        for a, b in zip(first, second):
            assert torch.equal(a, b)  # the same (seed, epoch, index) gives the same views
    images, labels, index = batches[0][0]
    assert images.shape == (8, 3, 32, 32) and labels.shape == (4,) and index.shape == (4,)
    assert labels.tolist() == [i % 4 for i in index.tolist()]
    assert not all(torch.equal(images[b], images[4 + b]) for b in range(4))
    # rows b and B + b come from image index[b]: a constant image stays constant under crop and flip, and a strong
    # view marked by its sign tells which image it came from
    weak = build_train_transform(args, DATA_CONFIG)
    marked = TwoViewTransform(weak, lambda img: -weak(img))
    images, _, index = next(iter(create_train_loader(ConstantImages(), marked, 4, seed=3, workers=0,
                                                     with_index=True)))
    for b, i in enumerate(index.tolist()):
        value = (10 * i + 20) / 255
        torch.testing.assert_close(images[b], torch.full_like(images[b], value))
        torch.testing.assert_close(images[4 + b], torch.full_like(images[b], -value))


def test_strong_views_vary_with_the_epoch_and_sample_seed():
    transform = TwoViewTransform(lambda img: np.asarray(img).copy(), lambda img: np.asarray(MLKDRandAugment(2)(img)))
    dataset = SeededTransformDataset(_Noise(), transform)
    same = [dataset[(0, 11)][0][1] for _ in range(2)]
    assert np.array_equal(same[0], same[1])
    assert not np.array_equal(dataset[(0, 11)][0][1], dataset[(0, 12)][0][1])


class _Noise(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        pixels = np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)
        return Image.fromarray(pixels), 0


def test_collate_keeps_a_single_view_batch_as_is():
    items = [(torch.full((3, 2, 2), float(i)), i) for i in range(3)]
    images, labels = collate_train_batch(items)
    assert images.shape == (3, 3, 2, 2) and labels.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ recipes
MLKD_CONFIGS = sorted(p for p in (REPO / 'configs').rglob('*mlkd*.yaml'))


def test_recipes_are_shipped():
    names = {p.name for p in MLKD_CONFIGS}
    for pair in ('resnet32x4_resnet8x4', 'wrn_40_2_wrn_16_2', 'resnet56_resnet20', 'vgg13_cifar_vgg8_cifar'):
        assert f'{pair}_mlkd.yaml' in names and f'{pair}_mlkd_ls.yaml' in names, pair
    assert 'resnet34_resnet18_mlkd.yaml' in names


def test_recipes_build_and_step():
    """Each recipe's flags build the distiller (its own pair is left to the model tests: a tiny pair stays fast)."""
    import train
    for path in MLKD_CONFIGS:
        args, _ = train.parse_args(['-c', str(path)])
        assert args.distiller == 'mlkd' and args.mixup == 0 and args.cutmix == 0, path.name
        assert args.epochs == (100 if 'imagenet' in str(path) else 480), path.name
        assert timm.is_model(args.model) and timm.is_model(args.teacher.split('.')[0]), path.name
        student, teacher = tiny_pair()
        distiller = MLKD(student, teacher, torch.nn.CrossEntropyLoss(), args, (3, 32, 32)).train()
        assert distiller.logit_standardize == path.name.endswith('_ls.yaml'), path.name
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1])  # two views of 2 samples
        _, losses = distiller(x, y)
        assert all(math.isfinite(v.item()) for v in losses.values()), path.name


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.e2e
def test_train_through_the_cli(tmp_path):
    common = ['--model', 'test_resnet', '--teacher', 'test_resnet', '--distiller', 'mlkd', '--epochs', '1',
              '--synthetic-train-size', '64', '--synthetic-val-size', '32', '--scale', '0.5', '1.0']
    _, run_dir = run_train(tmp_path, *common, experiment='plain')
    rows = read_summary(run_dir)
    for key in ('loss', 'loss_gt', 'loss_mlkd_instance', 'loss_mlkd_class', 'loss_mlkd_batch'):
        assert math.isfinite(float(rows[0][f'train_{key}'])), key
    _, run_dir = run_train(tmp_path, *common, '--logit-standardize', '--kd-loss-weight', '9', '--gt-loss-weight',
                           '0.1', '--mlkd-temperatures', '2', '3', '5', '2', '6', experiment='ls')
    assert math.isfinite(float(read_summary(run_dir)[0]['train_loss_mlkd_instance']))
    proc, _ = run_train(tmp_path, *common, '--mixup', '0.2', experiment='mixup', check=False)
    assert proc.returncode == 2 and 'mlkd' in proc.stderr and not (Path(tmp_path) / 'mixup').exists()
