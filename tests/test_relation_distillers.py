"""BKD, RKD and Correlation (CC), the OFAKD distillers of docs/methods/others.md §3, §8 and §9: values against
plain-Python references of the formulas (double precision), each property those sections list, one step of each
distiller (gradients, frozen teacher) and one training epoch of each through train.py."""
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from distillers import DISTILLERS, DistillerError
from distillers.bkd import bkd_loss
from distillers.correlation import correlation_loss
from distillers.rkd import rkd_loss, rkd_terms

from .helpers import distiller_args, read_summary, run_train

NUM_CLASSES = 10


# ------------------------------------------------------------------ plain-Python references
def py_softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def py_bkd(zs, zt):
    total, count = 0.0, 0
    for s_row, t_row in zip(zs, zt):
        for s, q in zip(s_row, py_softmax(t_row)):
            total += math.log1p(math.exp(s)) - q * s
            count += 1
    return total / count


def py_normalize(v):
    n = max(math.sqrt(sum(x * x for x in v)), 1e-12)
    return [x / n for x in v]


def py_distances(f):
    b = len(f)
    d = [[0.0 if i == j else math.sqrt(max(sum((x - y) ** 2 for x, y in zip(f[i], f[j])), 1e-12)) for j in range(b)]
         for i in range(b)]
    positive = [v for row in d for v in row if v > 0]
    mean = sum(positive) / len(positive)
    return [v / mean for row in d for v in row]


def py_angles(f):
    b = len(f)
    out = []
    for i in range(b):
        dirs = [py_normalize([x - y for x, y in zip(f[j], f[i])]) for j in range(b)]
        for j in range(b):
            for k in range(b):
                out.append(sum(x * y for x, y in zip(dirs[j], dirs[k])))
    return out


def py_smooth_l1(a, b):
    return sum(0.5 * (x - y) ** 2 if abs(x - y) < 1 else abs(x - y) - 0.5 for x, y in zip(a, b)) / len(a)


def py_rkd(fs, ft, wd, wa):
    return (wd * py_smooth_l1(py_distances(fs), py_distances(ft)) +
            wa * py_smooth_l1(py_angles(fs), py_angles(ft)))


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ================================================================== BKD (docs/methods/others.md §3)
def test_bkd_value():
    zs, zt = randn(3, 5, seed=1, scale=2.0), randn(3, 5, seed=2, scale=2.0)
    assert bkd_loss(zs, zt).item() == pytest.approx(py_bkd(zs.tolist(), zt.tolist()), rel=1e-6)


def test_bkd_is_ln2_at_zero_student_logits():
    for seed in range(3):
        assert bkd_loss(torch.zeros(4, 7), randn(4, 7, seed=seed, scale=5.0)).item() == pytest.approx(
            math.log(2.0), rel=1e-6)


def test_bkd_minimizer_is_the_per_class_sigmoid_not_softmax_matching():
    zt = randn(3, 6, seed=3, scale=2.0)
    q = torch.softmax(zt, dim=-1)
    at_sigmoid = torch.log(q / (1 - q)).requires_grad_()  # sigmoid(z) = q elementwise
    bkd_loss(at_sigmoid, zt).backward()
    assert at_sigmoid.grad.abs().max() < 1e-7
    at_softmax = zt.clone().requires_grad_()  # softmax(z_s) = q, but sigmoid(z_s) != q
    bkd_loss(at_softmax, zt).backward()
    assert at_softmax.grad.abs().max() > 1e-3


def test_bkd_bf16_autocast_is_float32_math():
    zs, zt = randn(4, 10, seed=4), randn(4, 10, seed=5)
    low_s, low_t = zs.bfloat16(), zt.bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = bkd_loss(low_s, low_t)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(bkd_loss(low_s.float(), low_t.float()).item(), rel=1e-6)


# ================================================================== RKD (docs/methods/others.md §8)
def test_rkd_value_and_weights():
    fs, ft = randn(4, 3, seed=6), randn(4, 5, seed=7, scale=3.0)
    expected = py_rkd(fs.tolist(), ft.tolist(), 25.0, 50.0)
    assert rkd_loss(fs, ft, 25.0, 50.0).item() == pytest.approx(expected, rel=1e-5)
    distance, angle = rkd_terms(fs, ft)
    assert distance.item() == pytest.approx(py_rkd(fs.tolist(), ft.tolist(), 1.0, 0.0), rel=1e-5)
    assert angle.item() == pytest.approx(py_rkd(fs.tolist(), ft.tolist(), 0.0, 1.0), rel=1e-5)


def test_rkd_squared_distances():
    fs, ft = randn(5, 4, seed=8), randn(5, 4, seed=9)

    # the normalization divides by the mean of the squared distances, not by the square of the mean
    def normalized_square(f):
        sq = [v * v for v in py_distances(f.tolist())]
        mean = sum(v for v in sq if v > 0) / sum(1 for v in sq if v > 0)
        return [v / mean for v in sq]
    expected_squared = py_smooth_l1(normalized_square(fs), normalized_square(ft))
    distance, _ = rkd_terms(fs, ft, squared=True)
    assert distance.item() == pytest.approx(expected_squared, rel=1e-5)


def test_rkd_zero_at_equality_and_teacher_scale_and_translation_free():
    fs, ft = randn(6, 8, seed=10), randn(6, 8, seed=11)
    assert rkd_loss(ft, ft, 25.0, 50.0).item() == pytest.approx(0.0, abs=1e-6)
    base = rkd_loss(fs, ft, 25.0, 50.0).item()
    assert base > 0
    assert rkd_loss(fs, ft * 7.5, 25.0, 50.0).item() == pytest.approx(base, rel=1e-5)
    assert rkd_loss(fs, ft + randn(1, 8, seed=12, scale=4.0), 25.0, 50.0).item() == pytest.approx(base, rel=1e-4)


def test_rkd_teacher_side_carries_no_gradient():
    fs, ft = randn(4, 3, seed=13).requires_grad_(), randn(4, 6, seed=14).requires_grad_()
    rkd_loss(fs, ft, 25.0, 50.0).backward()
    assert ft.grad is None and fs.grad is not None and torch.isfinite(fs.grad).all() and fs.grad.abs().sum() > 0


def test_rkd_duplicate_rows_stay_finite():
    fs = randn(4, 3, seed=15)
    fs[1] = fs[0]
    fs.requires_grad_()
    loss = rkd_loss(fs, randn(4, 5, seed=16), 25.0, 50.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fs.grad).all()


def test_rkd_bf16_autocast_is_float32_math():
    fs, ft = randn(4, 16, seed=17).bfloat16(), randn(4, 8, seed=18).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = rkd_loss(fs, ft, 25.0, 50.0)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(rkd_loss(fs.float(), ft.float(), 25.0, 50.0).item(), rel=1e-5)


# ================================================================== Correlation (docs/methods/others.md §9)
def test_correlation_hand_computed_3x2():
    es = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]])
    et = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, -0.5]])
    # delta = [[1, 1], [1, 2], [2, 1]]; consecutive products summed: 1 + 2 = 3 and 2 + 2 = 4; mean 3.5
    assert correlation_loss(es, et, 0.02).item() == pytest.approx(0.02 * 3.5, rel=1e-6)
    assert correlation_loss(es, et, 1.0).item() == pytest.approx(3.5, rel=1e-6)


def test_correlation_non_negative_symmetric_and_order_dependent():
    es, et = randn(6, 4, seed=19), randn(6, 4, seed=20)
    value = correlation_loss(es, et, 0.02)
    assert value.item() >= 0
    assert correlation_loss(et, es, 0.02).item() == pytest.approx(value.item(), rel=1e-6)
    order = torch.tensor([0, 2, 1, 3, 5, 4])
    assert correlation_loss(es[order], et[order], 0.02).item() != pytest.approx(value.item(), rel=1e-3)


def test_correlation_needs_two_samples_and_one_shape():
    with pytest.raises(ValueError, match='at least 2, got 1'):
        correlation_loss(torch.ones(1, 4), torch.zeros(1, 4), 0.02)
    with pytest.raises(ValueError, match='one shape'):
        correlation_loss(torch.ones(3, 4), torch.zeros(3, 5), 0.02)


def test_correlation_bf16_autocast_is_float32_math():
    es, et = randn(4, 16, seed=21).bfloat16(), randn(4, 16, seed=22).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = correlation_loss(es, et, 0.02)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(correlation_loss(es.float(), et.float(), 0.02).item(), rel=1e-6)


# ================================================================== the distillers
def pair():
    """A test_resnet student (pooled width 96) and a test_vit teacher (64): the embeddings bridge the widths."""
    torch.manual_seed(0)
    student = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    teacher = timm.create_model('test_vit', num_classes=NUM_CLASSES, img_size=32)
    return student, teacher


def test_flags_and_defaults():
    args = distiller_args()
    assert (args.rkd_distance_weight, args.rkd_angle_weight, args.rkd_squared, args.rkd_eps) == (25.0, 50.0, False,
                                                                                              1e-12)
    assert (args.correlation_feat_dim, args.correlation_scale) == (128, 0.02)
    for name in ('bkd', 'rkd', 'correlation'):
        distiller = DISTILLERS[name](*pair(), nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))
        assert distiller.gt_loss_weight == distiller.kd_loss_weight == 1.0  # OFAKD's weights
    assert DISTILLERS['bkd'].teacher_logits_only and not DISTILLERS['rkd'].teacher_logits_only
    with pytest.raises(DistillerError, match='--correlation-feat-dim must be a positive width, got 0'):
        DISTILLERS['correlation'](*pair(), nn.CrossEntropyLoss(), distiller_args(correlation_feat_dim=0), (3, 32, 32))


@pytest.mark.parametrize('name,loss_keys', [('bkd', {'loss_bkd'}), ('rkd', {'loss_rkd_distance', 'loss_rkd_angle'}),
                                            ('correlation', {'loss_correlation'})])
def test_distiller_step(name, loss_keys):
    student, teacher = pair()
    distiller = DISTILLERS[name](student, teacher, nn.CrossEntropyLoss(), distiller_args(kd_loss_weight=2.0),
                                 (3, 32, 32))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller.train()
    x, y = randn(4, 3, 32, 32, seed=23), torch.tensor([0, 3, 5, 9])
    logits, losses = distiller(x, y)
    assert logits.shape == (4, NUM_CLASSES) and set(losses) == {'loss_gt', *loss_keys}
    for key, value in losses.items():
        assert value.ndim == 0 and value.dtype == torch.float32 and torch.isfinite(value) and value > 0, key
    # the weighted terms are the pure functions of the models' own pooled features and logits
    with torch.no_grad():
        fs = student.forward_head(student.forward_features(x), pre_logits=True)
        ft = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
        zs, zt = student(x), teacher(x)
    if name == 'bkd':
        expected = {'loss_bkd': 2.0 * bkd_loss(zs, zt)}
    elif name == 'rkd':
        d, a = rkd_terms(fs, ft)
        expected = {'loss_rkd_distance': 2.0 * 25.0 * d, 'loss_rkd_angle': 2.0 * 50.0 * a}
    else:
        assert distiller.embed_student.weight.shape == (128, 96) and distiller.embed_teacher.weight.shape == (128, 64)
        with torch.no_grad():
            expected = {'loss_correlation': 2.0 * correlation_loss(distiller.embed_student(fs),
                                                                   distiller.embed_teacher(ft), 0.02)}
    for key, value in expected.items():
        torch.testing.assert_close(losses[key].detach(), value, rtol=1e-5, atol=1e-7)
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    # every parameter of the method's own modules learns, the teacher's embedding included
    for key, param in distiller.named_parameters():
        if not key.startswith('student.'):
            assert param.grad is not None and param.grad.abs().sum() > 0, key
    assert all(p.grad is None for p in teacher.parameters())
    torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.1).step()
    assert not teacher.training and all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_the_relation_distillers_refuse_logit_standardization():
    for name in ('bkd', 'rkd', 'correlation'):
        with pytest.raises(DistillerError, match=f"distiller '{name}' has no logit-standardized form"):
            DISTILLERS[name](*pair(), nn.CrossEntropyLoss(), distiller_args(logit_standardize=True), (3, 32, 32))


# ================================================================== end to end (train.py)
@pytest.mark.e2e
@pytest.mark.parametrize('name,extra,loss_keys,state_shapes', [
    ('bkd', (), ('loss_bkd',), {}),
    ('rkd', ('--rkd-squared',), ('loss_rkd_distance', 'loss_rkd_angle'), {}),
    ('correlation', ('--correlation-feat-dim', '32'), ('loss_correlation',),
     {'embed_student.weight': (32, 96), 'embed_student.bias': (32,), 'embed_teacher.weight': (32, 96),
      'embed_teacher.bias': (32,)}),
], ids=['bkd', 'rkd', 'correlation'])
def test_train_one_epoch(tmp_path, untrained_teacher_checkpoint, name, extra, loss_keys, state_shapes):
    _, run_dir = run_train(tmp_path, '--model', 'test_resnet', '--teacher', 'test_resnet', '--teacher-checkpoint',
                           untrained_teacher_checkpoint, '--distiller', name, '--epochs', '1', *extra)
    row, = read_summary(run_dir)
    for key in ('loss', 'loss_gt', *loss_keys):
        assert math.isfinite(float(row[f'train_{key}'])), key
    checkpoint = torch.load(Path(run_dir) / 'checkpoint' / 'last.pth.tar', map_location='cpu', weights_only=True)
    state = checkpoint['distiller_state']
    assert {k: tuple(v.shape) for k, v in state.items()} == state_shapes


@pytest.mark.parametrize('name', ['bkd', 'rkd', 'correlation'])
def test_loss_math_never_waits_for_the_device(name):
    """No data-dependent shapes or host reads (fake tensors have no data, so such an op raises here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        student = torch.randn(4, 10, requires_grad=True)
        teacher = torch.randn(4, 10)
        loss = {'bkd': lambda: bkd_loss(student, teacher),
                'rkd': lambda: rkd_loss(student, teacher, 25.0, 50.0),
                'correlation': lambda: correlation_loss(student, teacher, 0.02)}[name]()
        loss.backward()
        assert loss.shape == () and student.grad.shape == student.shape
