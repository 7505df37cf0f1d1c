"""Logit distillers DKD, WSLD, NKD, DIST and the self-distiller USKD (docs/methods/logit.md §2-§5, docs/methods/others.md §4-§5).

Reference values are computed here in plain Python (math on lists, double precision) from the formulas of the
specs, independently of the torch implementations.
"""
import argparse
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from distillers import DIST, DKD, NKD, USKD, WSLD, DistillerError
from distillers.dist import dist_loss, dist_terms, mean_pearson
from distillers.dkd import dkd_loss, dkd_per_sample, dkd_warmup_factor
from distillers.nkd import nkd_loss, nkd_terms
from distillers.uskd import (customized_target_weights, label_sets, non_target_mask, unsmoothed_mixup_labels,
                             uskd_loss, uskd_terms, zipf_rank_values)
from distillers.wsld import wsld_loss, wsld_sample_weights

from .helpers import distiller_args, read_summary, run_train

# a small fixed problem: B = 3, K = 5
ZS = [[1.0, 2.0, 0.5, -1.0, 0.0], [0.0, -0.5, 1.5, 0.3, 0.2], [-1.0, 0.4, 0.1, 2.2, -0.3]]
ZT = [[2.0, 1.0, 0.0, -0.5, 0.5], [0.5, 0.2, 2.5, -1.0, 0.0], [0.0, -0.2, 0.3, 1.0, 0.8]]
ZW = [[0.3, -0.2, 0.9, 0.0, 0.1], [1.0, 0.0, -0.4, 0.6, 0.2], [-0.5, 0.8, 0.0, 0.1, 0.4]]
Y = [1, 2, 3]


# ------------------------------------------------------------------ plain-Python references
def py_softmax(row, tau=1.0):
    m = max(row)
    e = [math.exp((v - m) / tau) for v in row]
    s = sum(e)
    return [v / s for v in e]


def py_kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def py_dkd(zs, zt, y, alpha, beta, tau):
    tckd = nckd = 0.0
    for s, t, c in zip(zs, zt, y):
        ps, pt = py_softmax(s, tau), py_softmax(t, tau)
        tckd += py_kl([pt[c], 1 - pt[c]], [ps[c], 1 - ps[c]])
        rest = [i for i in range(len(s)) if i != c]
        nckd += py_kl([pt[i] / (1 - pt[c]) for i in rest], [ps[i] / (1 - ps[c]) for i in rest])
    return tau ** 2 * (alpha * tckd + beta * nckd) / len(zs)


def py_wsld(zs, zt, y, tau, alpha):
    total = 0.0
    for s, t, c in zip(zs, zt, y):
        ce_s, ce_t = -math.log(py_softmax(s)[c]), -math.log(py_softmax(t)[c])
        w = 1 - math.exp(-max(ce_s / (ce_t + 1e-7), 0.0))
        ps, pt = py_softmax(s, tau), py_softmax(t, tau)
        total += w * -sum(a * math.log(b) for a, b in zip(pt, ps))
    return alpha * tau ** 2 * total / len(zs)


def py_nkd(zs, zt, y, tau, gamma):
    lt = lnt = 0.0
    for s, t, c in zip(zs, zt, y):
        lt += -py_softmax(t)[c] * math.log(py_softmax(s)[c])
        ps, pt = py_softmax(s, tau), py_softmax(t, tau)
        rest = [i for i in range(len(s)) if i != c]
        # N1: the renormalized non-target distribution is p_i / (1 - p_y) of the full softmax
        lnt += -sum(pt[i] / (1 - pt[c]) * math.log(ps[i] / (1 - ps[c])) for i in rest)
    return lt / len(zs) + gamma * tau ** 2 * lnt / len(zs)


def py_pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - ma for x in a], [x - mb for x in b]
    num = sum(x * y for x, y in zip(da, db))
    return num / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)) + 1e-8)


def py_dist(zs, zt, beta, gamma, tau):
    ps = [py_softmax(r, tau) for r in zs]
    pt = [py_softmax(r, tau) for r in zt]
    inter = 1 - sum(py_pearson(a, b) for a, b in zip(ps, pt)) / len(ps)
    cols = range(len(ps[0]))
    intra = 1 - sum(py_pearson([r[k] for r in ps], [r[k] for r in pt]) for k in cols) / len(cols)
    return beta * tau ** 2 * inter + gamma * tau ** 2 * intra


def py_uskd(zw, zs, label_index, label_value, weak_target, alpha, beta, mu, rank_by):
    """label_index/label_value: per sample lists of the J labels and their mass; weak_target: per-sample q."""
    n, k = len(zs), len(zs[0])
    p = [py_softmax(r) for r in zs]
    j_count = len(label_index[0])
    s2 = [[p[b][label_index[b][j]] ** 2 for j in range(j_count)] for b in range(n)]
    col_mean = [sum(s2[b][j] for b in range(n)) / n for j in range(j_count)]
    lt = lnt = lweak = 0.0
    for b in range(n):
        for j in range(j_count):
            if label_value[b][j] > 0:
                s_hat = s2[b][j] + label_value[b][j] - col_mean[j]
                lt += -s_hat * math.log(p[b][label_index[b][j]])
        w = py_softmax(zw[b])
        lweak += -sum(q * math.log(v) for q, v in zip(weak_target[b], w))
        x = p[b] if rank_by == 'prob' else [math.log(v) for v in p[b]]
        w_den = 1 - sum(w[i] for i in label_index[b]) + 1e-6
        x_den = 1 - sum(x[i] for i in label_index[b]) + 1e-6
        r = [w[i] / w_den + x[i] / x_den for i in range(k)]
        order = sorted(range(k), key=lambda i: -r[i])
        value = [0.0] * k
        for pos, i in enumerate(order):
            value[i] = 1.0 / (pos + 1)
        rest = [i for i in range(k) if i not in label_index[b]]
        total = sum(value[i] for i in rest)
        lse = math.log(sum(math.exp(zs[b][i]) for i in rest))
        lnt += -sum(value[i] / total * (zs[b][i] - lse) for i in rest)
    return alpha * lt / n + beta * lnt / n + mu * lweak / n


# ------------------------------------------------------------------ helpers
def tensors():
    return torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y)


def random_logits(b=6, k=10, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, k, generator=g) * scale
    zt = torch.randn(b, k, generator=g) * scale
    y = torch.randint(0, k, (b,), generator=g)
    return zs, zt, y


def tiny_pair(num_classes=10, seed=0):
    torch.manual_seed(seed)
    student = timm.create_model('test_resnet', num_classes=num_classes)
    teacher = timm.create_model('test_resnet', num_classes=num_classes)
    return student, teacher


def soft_mixup_labels(y, k, lam=0.7, smoothing=0.0):
    """timm's own mixup target for the pair (y, y flipped)."""
    from timm.data.mixup import mixup_target
    return mixup_target(y, k, lam=lam, smoothing=smoothing)


def row_shift(z, seed=1):
    g = torch.Generator().manual_seed(seed)
    return z + torch.randn(z.shape[0], 1, generator=g) * 5.0


def assert_row_shift_invariant(loss, teacher_seed):
    """loss(zs, zt, y) is unchanged when every row of zs and of zt is shifted by its own constant."""
    zs, zt, y = random_logits()
    torch.testing.assert_close(loss(row_shift(zs), row_shift(zt, teacher_seed), y), loss(zs, zt, y),
                               rtol=1e-5, atol=1e-6)


# ================================================================== DKD (docs/methods/logit.md §2)
def test_dkd_hand_worked_value():
    zs, zt, y = tensors()
    for tau, alpha, beta in [(1.0, 1.0, 0.5), (4.0, 1.0, 8.0), (2.0, 0.7, 2.0)]:
        got = dkd_loss(zs, zt, y, alpha, beta, tau).item()
        assert got == pytest.approx(py_dkd(ZS, ZT, Y, alpha, beta, tau), rel=1e-5)


@pytest.mark.parametrize('tau', [1.0, 4.0])
def test_dkd_d1_decomposition_of_kl(tau):
    zs, zt, y = random_logits(scale=2.0)
    tckd, nckd = dkd_per_sample(zs, zt, y, tau)
    log_ps, log_pt = F.log_softmax(zs / tau, -1), F.log_softmax(zt / tau, -1)
    kl = tau ** 2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    pt_target = F.softmax(zt / tau, -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(tckd + (1 - pt_target) * nckd, kl, rtol=0, atol=1e-6 * tau ** 2)


def test_dkd_d2_zero_at_equality():
    zs, _, y = random_logits()
    assert abs(dkd_loss(zs, zs.clone(), y, 1.0, 8.0, 4.0).item()) < 1e-5


def test_dkd_d3_row_shift_invariance():
    assert_row_shift_invariant(lambda zs, zt, y: dkd_loss(zs, zt, y, 1.0, 2.0, 2.0), teacher_seed=2)


def test_dkd_d4_terms_see_only_their_part():
    zs, zt, y = random_logits()
    tckd, nckd = dkd_per_sample(zs, zt, y, 2.0)
    bumped_s, bumped_t = zs.clone(), zt.clone()
    bumped_s[torch.arange(len(y)), y] += 3.0
    bumped_t[torch.arange(len(y)), y] -= 2.0
    tckd2, nckd2 = dkd_per_sample(bumped_s, bumped_t, y, 2.0)
    torch.testing.assert_close(nckd2, nckd, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tckd2, tckd)
    # permute the non-target logits of both models among themselves (the target column stays put)
    perm_s, perm_t = zs.clone(), zt.clone()
    for b, c in enumerate(y.tolist()):
        rest = [i for i in range(zs.shape[1]) if i != c]
        perm_s[b, rest] = zs[b, rest[::-1]]
        perm_t[b, rest] = zt[b, rest[1:] + rest[:1]]
    tckd3, nckd3 = dkd_per_sample(perm_s, perm_t, y, 2.0)
    torch.testing.assert_close(tckd3, tckd, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(nckd3, nckd)


def test_dkd_d5_soft_labels_give_argmax_value():
    student, teacher = tiny_pair()
    distiller = DKD(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([1, 3, 5, 7])
    soft = soft_mixup_labels(y, 10, lam=0.7)
    _, hard_losses = distiller(x, y)
    _, soft_losses = distiller(x, soft)
    for key in ('loss_tckd', 'loss_nckd'):
        torch.testing.assert_close(soft_losses[key], hard_losses[key])


def test_dkd_d6_warmup():
    assert dkd_warmup_factor(0, 20) == pytest.approx(1 / 20)
    assert dkd_warmup_factor(9, 20) == pytest.approx(10 / 20)
    assert dkd_warmup_factor(19, 20) == 1.0
    assert dkd_warmup_factor(150, 20) == 1.0
    assert dkd_warmup_factor(0, 0) == 1.0
    assert dkd_warmup_factor(0, 1) == 1.0  # mdistiller's ImageNet W = 1: no ramp in practice
    student, teacher = tiny_pair()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    ramped = DKD(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(dkd_warmup=20), (3, 32, 32))
    flat = DKD(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))
    _, ramp0 = ramped(x, y, epoch=0)
    _, ramp19 = ramped(x, y, epoch=19)
    _, full = flat(x, y, epoch=0)
    torch.testing.assert_close(ramp0['loss_nckd'], full['loss_nckd'] / 20)
    torch.testing.assert_close(ramp19['loss_tckd'], full['loss_tckd'])
    torch.testing.assert_close(ramp0['loss_gt'], full['loss_gt'])


def test_dkd_d7_finite_for_huge_gaps():
    zs, zt, y = random_logits()
    for scale in (1e2, 1e4):
        s = (zs * scale).requires_grad_()
        loss = dkd_loss(s, zt * scale, y, 1.0, 8.0, 1.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_flags_follow_ofakd_defaults():
    args = distiller_args()
    assert (args.dkd_alpha, args.dkd_beta, args.dkd_temperature, args.dkd_warmup) == (1.0, 2.0, 1.0, 0)
    student, teacher = tiny_pair()
    with pytest.raises(DistillerError):
        DKD(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(dkd_temperature=0.0), (3, 32, 32))


# ================================================================== WSLD (docs/methods/logit.md §3)
def test_wsld_hand_worked_value():
    zs, zt, y = tensors()
    for tau, alpha in [(4.0, 2.25), (2.0, 2.5), (1.0, 1.0)]:
        assert wsld_loss(zs, zt, y, tau, alpha).item() == pytest.approx(py_wsld(ZS, ZT, Y, tau, alpha), rel=1e-5)


def test_wsld_w1_weights():
    zs, zt, y = random_logits(b=32)
    w = wsld_sample_weights(zs, zt, y)
    ce = lambda z: -F.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)
    ratio = ce(zs) / (ce(zt) + 1e-7)
    assert ((w >= 0) & (w <= 1)).all()
    assert (w[ratio < 15] < 1).all()  # 1 itself is only float32 rounding of 1 - exp(-r) for huge r
    torch.testing.assert_close(w, 1 - torch.exp(-ratio.clamp(min=0)))
    equal = wsld_sample_weights(zt, zt, y)
    torch.testing.assert_close(equal, torch.full_like(equal, 1 - math.exp(-1)))
    # a student that fits the label worse (larger CE^s, same CE^t) gets a larger weight
    zt1 = torch.zeros(1, 4)
    ws = [wsld_sample_weights(torch.tensor([[v, 0.0, 0.0, 0.0]]), zt1, torch.tensor([0])).item()
          for v in (3.0, 1.0, 0.0, -2.0, -6.0)]
    assert all(a < b for a, b in zip(ws, ws[1:]))


def test_wsld_w2_gradient_does_not_flow_through_weights():
    zs, zt, y = random_logits()
    tau, alpha = 4.0, 2.25
    s = zs.clone().requires_grad_()
    wsld_loss(s, zt, y, tau, alpha).backward()
    w = wsld_sample_weights(zs, zt, y)
    expected = alpha * tau / len(y) * w[:, None] * (F.softmax(zs / tau, -1) - F.softmax(zt / tau, -1))
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


def test_wsld_w3_teacher_entropy_at_equality():
    _, zt, y = random_logits()
    tau, alpha = 2.0, 2.5
    pt = F.softmax(zt / tau, -1)
    entropy = -(pt * pt.log()).sum(-1).mean()
    expected = alpha * tau ** 2 * (1 - math.exp(-1)) * entropy
    torch.testing.assert_close(wsld_loss(zt.clone(), zt, y, tau, alpha), expected, rtol=1e-5, atol=1e-6)


def test_wsld_w4_row_shift_invariance():
    assert_row_shift_invariant(lambda zs, zt, y: wsld_loss(zs, zt, y, 4.0, 2.25), teacher_seed=3)


def test_wsld_w5_labels_only_through_weights_and_soft_equals_argmax():
    zs, zt, y = random_logits()
    other = (y + 1) % zs.shape[1]
    soft_ce = -(F.softmax(zt / 4, -1) * F.log_softmax(zs / 4, -1)).sum(-1)  # label-free
    for target in (y, other):
        expected = 16 * (wsld_sample_weights(zs, zt, target) * soft_ce).mean()
        torch.testing.assert_close(wsld_loss(zs, zt, target, 4.0, 1.0), expected)
    assert not torch.allclose(wsld_loss(zs, zt, y, 4.0, 1.0), wsld_loss(zs, zt, other, 4.0, 1.0))
    student, teacher = tiny_pair()
    distiller = WSLD(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))
    x, yy = torch.randn(4, 3, 32, 32), torch.tensor([2, 4, 6, 8])
    torch.testing.assert_close(distiller(x, soft_mixup_labels(yy, 10))[1]['loss_wsld'],
                               distiller(x, yy)[1]['loss_wsld'])


# ================================================================== NKD (docs/methods/logit.md §4)
def test_nkd_hand_worked_value():
    zs, zt, y = tensors()
    for tau, gamma in [(1.0, 1.5), (3.0, 3.5), (2.0, 1.0)]:
        assert nkd_loss(zs, zt, y, tau, gamma).item() == pytest.approx(py_nkd(ZS, ZT, Y, tau, gamma), rel=1e-5)


def test_nkd_n2_non_target_term_ignores_target_logits():
    zs, zt, y = random_logits()
    lt, lnt = nkd_terms(zs, zt, y, 2.0, 1.5)
    bumped_s, bumped_t = zs.clone(), zt.clone()
    bumped_s[torch.arange(len(y)), y] += 4.0
    bumped_t[torch.arange(len(y)), y] -= 3.0
    lt2, lnt2 = nkd_terms(bumped_s, bumped_t, y, 2.0, 1.5)
    torch.testing.assert_close(lnt2, lnt, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(lt2, lt)


def test_nkd_n3_value_at_equality():
    _, zt, y = random_logits()
    tau, gamma = 3.0, 3.5
    p1 = F.softmax(zt, -1).gather(1, y[:, None]).squeeze(1)
    mask = F.one_hot(y, zt.shape[1]).bool()
    p_hat = F.softmax(zt[~mask].view(len(y), -1) / tau, -1)
    expected = -(p1 * p1.log()).mean() + gamma * tau ** 2 * -(p_hat * p_hat.log()).sum(-1).mean()
    torch.testing.assert_close(nkd_loss(zt.clone(), zt, y, tau, gamma), expected, rtol=1e-5, atol=1e-6)


def test_nkd_n4_soft_labels_give_argmax_value():
    student, teacher = tiny_pair()
    distiller = NKD(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([9, 0, 4, 4])
    _, hard = distiller(x, y)
    _, soft = distiller(x, soft_mixup_labels(y, 10, lam=0.6))
    for key in ('loss_nkd_target', 'loss_nkd_nontarget'):
        torch.testing.assert_close(soft[key], hard[key])


def test_nkd_n5_target_term_gradient():
    zs, zt, y = random_logits()
    s = zs.clone().requires_grad_()
    nkd_terms(s, zt, y, 1.0, 1.5)[0].backward()
    pt_y = F.softmax(zt, -1).gather(1, y[:, None])
    expected = -(pt_y / len(y)) * (F.one_hot(y, zs.shape[1]).float() - F.softmax(zs, -1))
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


def test_nkd_n6_row_shift_invariance():
    assert_row_shift_invariant(lambda zs, zt, y: nkd_loss(zs, zt, y, 3.0, 3.5), teacher_seed=4)


# ================================================================== DIST (docs/methods/others.md §5)
def test_dist_hand_worked_value():
    zs, zt, _ = tensors()
    for beta, gamma, tau in [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (1.0, 0.5, 2.0)]:
        assert dist_loss(zs, zt, beta, gamma, tau).item() == pytest.approx(py_dist(ZS, ZT, beta, gamma, tau),
                                                                          rel=1e-5)


def test_dist_properties():
    zs, zt, _ = random_logits(b=8)
    assert abs(dist_loss(zs, zs.clone(), 1.0, 1.0, 1.0).item()) < 1e-5
    for s, t in [(zs, zt), (zs, -zs), (zt, zs * 3)]:
        inter, intra = dist_terms(s, t, 1.0)
        assert 0.0 <= inter.item() <= 2.0 and 0.0 <= intra.item() <= 2.0
    inter, intra = dist_terms(zs, -zs, 1.0)
    assert inter.item() > 1.0  # anti-correlated predictions are further apart than unrelated ones
    torch.testing.assert_close(dist_loss(row_shift(zs), row_shift(zt, 5), 1.0, 2.0, 4.0),
                               dist_loss(zs, zt, 1.0, 2.0, 4.0), rtol=1e-5, atol=1e-6)
    # intra correlates each class column across the batch, so scaling one column changes nothing
    ps, pt = F.softmax(zs, -1), F.softmax(zt, -1)
    scaled = ps.clone()
    scaled[:, 3] *= 7.0
    torch.testing.assert_close(mean_pearson(scaled, pt, dim=0), mean_pearson(ps, pt, dim=0))
    assert not torch.allclose(mean_pearson(scaled, pt, dim=1), mean_pearson(ps, pt, dim=1))


def test_dist_flags_and_tau_alias():
    parser = argparse.ArgumentParser()
    DIST.add_args(parser)
    args = parser.parse_args([])
    assert (args.dist_beta, args.dist_gamma, args.dist_temperature) == (1.0, 1.0, 1.0)
    assert parser.parse_args(['--dist-tau', '4']).dist_temperature == 4.0
    assert parser.parse_args(['--dist-temperature', '3']).dist_temperature == 3.0


# ================================================================== USKD (docs/methods/logit.md §5)
def test_uskd_hand_worked_value_hard_labels():
    zw, zs, y = torch.tensor(ZW), torch.tensor(ZS), torch.tensor(Y)
    k = len(ZS[0])
    q = [[0.9 * (i == c) + 0.1 / k for i in range(k)] for c in Y]
    for rank_by in ('prob', 'logprob'):
        got = uskd_loss(zw, zs, y, 1.0, 0.1, 0.005, rank_by=rank_by).item()
        want = py_uskd(ZW, ZS, [[c] for c in Y], [[1.0] for _ in Y], q, 1.0, 0.1, 0.005, rank_by)
        assert got == pytest.approx(want, rel=1e-5)
    got = uskd_loss(zw, zs, y, 0.1, 0.1, 0.1).item()
    assert got == pytest.approx(py_uskd(ZW, ZS, [[c] for c in Y], [[1.0] for _ in Y], q, 0.1, 0.1, 0.1, 'prob'),
                                rel=1e-5)


def test_uskd_hand_worked_value_soft_labels():
    zw, zs = torch.tensor(ZW), torch.tensor(ZS)
    soft = [[0.0, 0.7, 0.3, 0.0, 0.0], [0.4, 0.0, 0.6, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]]
    # two largest by a stable descending sort; the one-class row's second label is class 0 (mass 0)
    index, value = [[1, 2], [2, 0], [3, 0]], [[0.7, 0.3], [0.6, 0.4], [1.0, 0.0]]
    q = [[0.9 * v + 0.1 / 5 for v in row] for row in soft]
    soft_t = torch.tensor(soft)
    got = uskd_loss(zw, zs, soft_t.argmax(-1), 1.0, 0.1, 0.005, soft_labels=soft_t).item()
    assert got == pytest.approx(py_uskd(ZW, ZS, index, value, q, 1.0, 0.1, 0.005, 'prob'), rel=1e-5)
    got_index, got_value = label_sets(soft_t.argmax(-1), soft_t)
    assert got_index.tolist() == index
    torch.testing.assert_close(got_value, torch.tensor(value))


def test_uskd_u1_customized_target_weights():
    zs, _, y = random_logits(b=16, scale=4.0)
    index, value = label_sets(y)
    weights = customized_target_weights(F.log_softmax(zs, -1), index, value)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert ((weights >= 0) & (weights <= 2)).all()
    confident = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    weights = customized_target_weights(F.log_softmax(confident, -1), *label_sets(torch.tensor([0, 0, 0])))
    assert weights[0, 0].item() > 1.0


def test_uskd_u2_u3_u4_zipf_labels():
    zw, zs, y = random_logits(b=8, k=7)
    index, _ = label_sets(y)
    log_p = F.log_softmax(zs, -1)
    values = zipf_rank_values(zw, log_p, index)
    expected_set = sorted((1.0 / torch.arange(1, 8)).tolist())
    for row in values:  # U4
        assert sorted(row.tolist()) == pytest.approx(expected_set)
    keep = non_target_mask(index, 7)
    z_tilde = values[keep].view(8, 6)
    z_tilde = z_tilde / z_tilde.sum(-1, keepdim=True)
    assert (z_tilde > 0).all()  # U2
    torch.testing.assert_close(z_tilde.sum(-1), torch.ones(8))
    # U3: when the label itself ranks first, the rest get (1/2, ..., 1/K) / sum in rank order
    weak = torch.tensor([[5.0, 3.0, 2.0, 1.0, 0.0]])
    student = torch.tensor([[6.0, 2.0, 1.5, 0.5, -1.0]])
    index = torch.tensor([[0]])
    ranked = zipf_rank_values(weak, F.log_softmax(student, -1), index)
    assert ranked[0].tolist() == pytest.approx([1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    norm = sum(1 / k for k in range(2, 6))
    loss_nt = uskd_terms(weak, student, torch.tensor([0]), 0.005)[1]
    log_rest = F.log_softmax(student[:, 1:], -1)
    expected = -sum((1 / (i + 2)) / norm * log_rest[0, i] for i in range(4))
    torch.testing.assert_close(loss_nt, expected)


def test_uskd_u5_weak_term_is_label_smoothed_ce():
    zw, zs, y = random_logits(b=8)
    mu = 0.005
    loss_weak = uskd_terms(zw, zs, y, mu)[2]
    torch.testing.assert_close(loss_weak / mu, F.cross_entropy(zw, y, label_smoothing=0.1))


def test_uskd_u6_gradients():
    zw, zs, y = random_logits(b=8)
    weak, student = zw.clone().requires_grad_(), zs.clone().requires_grad_()
    loss_t, loss_nt, loss_weak = uskd_terms(weak, student, y, 0.005)
    (loss_t + loss_nt).backward(retain_graph=True)
    assert weak.grad is None  # the weak head learns only from L_weak
    # s_hat is a constant: dL_t/dz_b = -(s_hat_b / B) (e_y - p_b)
    student.grad = None
    loss_t.backward(retain_graph=True)
    index, value = label_sets(y)
    s_hat = customized_target_weights(F.log_softmax(zs, -1), index, value)
    expected = -(s_hat / len(y)) * (F.one_hot(y, zs.shape[1]).float() - F.softmax(zs, -1))
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)
    # z~ is a constant: dL_nt/dz over the non-target classes is (softmax_rest(z) - z~) / B
    student.grad = None
    loss_nt.backward(retain_graph=True)
    keep = non_target_mask(index, zs.shape[1])
    z_tilde = zipf_rank_values(zw, F.log_softmax(zs, -1), index)[keep].view(len(y), -1)
    z_tilde = z_tilde / z_tilde.sum(-1, keepdim=True)
    rest = F.softmax(zs[keep].view(len(y), -1), -1)
    torch.testing.assert_close(student.grad[keep].view(len(y), -1), (rest - z_tilde) / len(y),
                               rtol=1e-5, atol=1e-7)
    assert (student.grad[~keep] == 0).all()
    student.grad = None
    loss_weak.backward()
    assert student.grad is None and weak.grad is not None


def test_uskd_u7_rank_modes_disagree():
    # label class 0; weak head and student disagree about classes 1..3
    weak = torch.tensor([[0.1, 0.1, 0.6, 0.2]]).log()
    student = torch.tensor([[0.4, 0.3, 0.01, 0.29]]).log()
    index = torch.tensor([[0]])
    by_prob = zipf_rank_values(weak, F.log_softmax(student, -1), index, 'prob')
    by_logprob = zipf_rank_values(weak, F.log_softmax(student, -1), index, 'logprob')
    # prob: r = (0.611, 0.683, 0.705) -> 3, 2, 1; logprob: (-0.517, -1.737, -0.424) -> 3, 1, 2
    assert by_prob[0, 1:].tolist() == pytest.approx([1 / 4, 1 / 3, 1 / 2])
    assert by_logprob[0, 1:].tolist() == pytest.approx([1 / 3, 1 / 4, 1 / 2])
    with pytest.raises(ValueError):
        zipf_rank_values(weak, student, index, 'rank')


def test_uskd_u8_zero_mass_second_label():
    zw, zs, _ = random_logits(b=4, k=6)
    soft = F.one_hot(torch.tensor([2, 0, 5, 3]), 6).float()
    soft[1] = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5, 0.0])
    index, value = label_sets(soft.argmax(-1), soft)
    assert index[:, 1].tolist() == [0, 4, 0, 0]
    weights = customized_target_weights(F.log_softmax(zs, -1), index, value)
    assert weights[[0, 2, 3], 1].tolist() == [0.0, 0.0, 0.0]
    keep = non_target_mask(index, 6)
    assert keep.sum(-1).tolist() == [4, 4, 4, 4] and not keep[0, 0] and not keep[0, 2]
    # the zero-mass class is still outside the non-target softmax: L_nt runs over K - 2 = 4 logits
    loss_nt = uskd_terms(zw, zs, soft.argmax(-1), 0.005, soft_labels=soft)[1]
    z_tilde = zipf_rank_values(zw, F.log_softmax(zs, -1), index)[keep].view(4, 4)
    z_tilde = z_tilde / z_tilde.sum(-1, keepdim=True)
    expected = -(z_tilde * F.log_softmax(zs[keep].view(4, 4), -1)).sum(-1).mean()
    torch.testing.assert_close(loss_nt, expected)


@pytest.mark.parametrize('rank_by', ['prob', 'logprob'])
def test_uskd_u9_row_shift_invariance(rank_by):
    zw, zs, y = random_logits()
    base = uskd_terms(zw, zs, y, 0.005, rank_by)
    shifted = uskd_terms(zw, row_shift(zs), y, 0.005, rank_by)
    torch.testing.assert_close(shifted[0], base[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shifted[1], base[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_uskd_recovers_unsmoothed_mixture(smoothing):
    y = torch.tensor([0, 3, 3, 7])
    mixed = soft_mixup_labels(y, 10, lam=0.65, smoothing=smoothing)
    bare = soft_mixup_labels(y, 10, lam=0.65, smoothing=0.0)
    torch.testing.assert_close(unsmoothed_mixup_labels(mixed), bare)


def test_uskd_taps_and_state():
    student = timm.create_model('test_resnet', num_classes=10)
    distiller = USKD(student, None, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))
    assert distiller.mid_stage == 3 and distiller.weak_head.in_features == 192 and distiller.mid_norm is None
    assert 'zipf' not in distiller.state_dict() and 'zipf' in dict(distiller.named_buffers())
    assert set(distiller.distiller_state_dict()) == {'weak_head.weight', 'weak_head.bias'}
    vit = timm.create_model('test_vit', num_classes=10)  # 6 blocks: tap after block index 2
    distiller = USKD(vit, None, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))
    assert distiller.mid_block == 2 and distiller.weak_head.in_features == vit.embed_dim
    swin = timm.create_model('swin_tiny_patch4_window7_224', embed_dim=16, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1), img_size=64, window_size=2, num_classes=10)
    distiller = USKD(swin, None, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 64, 64))
    assert distiller.mid_stage == 3 and distiller.weak_head.in_features == 64
    assert distiller.mid_norm.normalized_shape == (64,)
    _, losses = distiller(torch.randn(2, 3, 64, 64), torch.tensor([1, 2]))
    sum(losses.values()).backward()
    assert distiller.mid_norm.weight.grad is not None and distiller.mid_norm.weight.grad.abs().sum() > 0
    with pytest.raises(DistillerError):
        USKD(timm.create_model('test_resnet', num_classes=2), None, torch.nn.CrossEntropyLoss(),
             distiller_args(), (3, 32, 32))


def test_uskd_distiller_uses_unsmoothed_mixup():
    torch.manual_seed(0)
    student = timm.create_model('test_resnet', num_classes=10)
    distiller = USKD(student, None, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))
    distiller.eval()  # fixed BN statistics, so two forwards see the same logits
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 3, 5, 7])
    _, plain = distiller(x, soft_mixup_labels(y, 10, lam=0.7))
    _, smoothed = distiller(x, soft_mixup_labels(y, 10, lam=0.7, smoothing=0.1))
    for key in ('loss_uskd_target', 'loss_uskd_nontarget', 'loss_uskd_weak'):
        torch.testing.assert_close(smoothed[key], plain[key])
    assert not torch.allclose(smoothed['loss_gt'], plain['loss_gt'])  # CE still sees the labels as given


# ================================================================== every method: dtype, range, distiller
LOSSES = {
    'dkd': lambda zs, zt, y, zw: dkd_loss(zs, zt, y, 1.0, 8.0, 4.0),
    'wsld': lambda zs, zt, y, zw: wsld_loss(zs, zt, y, 4.0, 2.25),
    'nkd': lambda zs, zt, y, zw: nkd_loss(zs, zt, y, 3.0, 3.5),
    'dist': lambda zs, zt, y, zw: dist_loss(zs, zt, 2.0, 2.0, 4.0),
    'uskd': lambda zs, zt, y, zw: uskd_loss(zw, zs, y, 1.0, 0.1, 0.005),
    'uskd_logprob': lambda zs, zt, y, zw: uskd_loss(zw, zs, y, 1.0, 0.1, 0.005, rank_by='logprob'),
}


@pytest.mark.parametrize('name', ['kd', 'dkd', 'wsld', 'nkd', 'dist', 'uskd', 'uskd-soft'])
def test_loss_math_never_waits_for_the_device(name):
    """No data-dependent shapes or host reads in the loss math (boolean-mask indexing, nonzero, .item()): each one
    makes the host wait for the GPU in every step. Fake tensors have no data, so such an op raises here."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from distillers.kd import kd_loss
    with FakeTensorMode():
        zs = torch.randn(4, 10, requires_grad=True)
        zt, zw = torch.randn(4, 10), torch.randn(4, 10)
        y = torch.zeros(4, dtype=torch.long)
        loss = {'kd': lambda: kd_loss(zs, zt, 2.0),
                'dkd': lambda: dkd_loss(zs, zt, y, 1.0, 2.0, 1.0),
                'wsld': lambda: wsld_loss(zs, zt, y, 2.0, 1.0),
                'nkd': lambda: nkd_loss(zs, zt, y, 1.0, 1.5),
                'dist': lambda: dist_loss(zs, zt, 1.0, 1.0, 1.0),
                'uskd': lambda: uskd_loss(zw, zs, y, 1.0, 0.1, 0.005),
                'uskd-soft': lambda: uskd_loss(zw, zs, y, 1.0, 0.1, 0.005, soft_labels=torch.rand(4, 10))}[name]()
        loss.backward()
        assert loss.shape == () and zs.grad.shape == zs.shape


@pytest.mark.parametrize('method', sorted(LOSSES))
def test_bf16_autocast_matches_float32(method):
    zs, zt, y = random_logits(b=8, k=10, scale=2.0)
    zw = random_logits(b=8, k=10, scale=2.0, seed=5)[0]
    reference = LOSSES[method](zs, zt, y, zw)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = LOSSES[method](zs.bfloat16(), zt.bfloat16(), y, zw.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(reference.item(), rel=1e-2)


@pytest.mark.parametrize('method', sorted(LOSSES))
@pytest.mark.parametrize('scale', [100.0, 1e4])
def test_finite_for_large_logits(method, scale):
    zs, zt, y = random_logits(b=8, k=10, scale=1.0)
    zw = random_logits(b=8, k=10, scale=1.0, seed=5)[0]
    s, w = (zs * scale).requires_grad_(), (zw * scale).requires_grad_()
    loss = LOSSES[method](s, zt * scale, y, w)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all() and (w.grad is None or torch.isfinite(w.grad).all())


DISTILLERS = {
    DKD: ('loss_tckd', 'loss_nckd'),
    WSLD: ('loss_wsld',),
    NKD: ('loss_nkd_target', 'loss_nkd_nontarget'),
    DIST: ('loss_dist_inter', 'loss_dist_intra'),
    USKD: ('loss_uskd_target', 'loss_uskd_nontarget', 'loss_uskd_weak'),
}


@pytest.mark.parametrize('cls', list(DISTILLERS), ids=lambda c: c.name)
def test_distiller_step(cls):
    student, teacher = tiny_pair()
    if not cls.needs_teacher:
        teacher = None
    distiller = cls(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32))
    assert distiller.gt_loss_weight == 1.0 and distiller.kd_loss_weight == 1.0
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()} if teacher is not None else {}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
    distiller.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    logits, losses = distiller(x, y, epoch=0)
    assert logits.shape == (4, 10)
    assert set(losses) == {'loss_gt', *DISTILLERS[cls]}
    for key, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), key
    optimizer.zero_grad()
    sum(losses.values()).backward()
    for name, param in student.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    for name, param in distiller.named_parameters():
        if not name.startswith('student.'):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in student_before.items())
    if teacher is not None:
        assert not teacher.training
        assert all(p.grad is None for p in teacher.parameters())
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, teacher_before[key]), key


@pytest.mark.parametrize('cls', list(DISTILLERS), ids=lambda c: c.name)
def test_kd_loss_weight_scales_only_the_distillation_terms(cls):
    student, teacher = tiny_pair()
    teacher = teacher if cls.needs_teacher else None
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    plain = cls(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(), (3, 32, 32)).eval()
    double = cls(student, teacher, torch.nn.CrossEntropyLoss(), distiller_args(kd_loss_weight=2.0,
                                                                           gt_loss_weight=0.5), (3, 32, 32))
    if hasattr(plain, 'weak_head'):
        double.weak_head.load_state_dict(plain.weak_head.state_dict())
    double.eval()
    _, base = plain(x, y)
    _, scaled = double(x, y)
    torch.testing.assert_close(scaled['loss_gt'], 0.5 * base['loss_gt'])
    for key in DISTILLERS[cls]:
        torch.testing.assert_close(scaled[key], 2.0 * base[key])


# ================================================================== end to end (train.py)
@pytest.fixture(scope='module')
def teacher_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('teacher') / 'test_resnet.pth'
    torch.save(timm.create_model('test_resnet', num_classes=10).state_dict(), path)
    return path


# the mixup runs cover the soft-label paths: DKD's argmax target and USKD's unsmoothed two-label set
@pytest.mark.e2e
@pytest.mark.parametrize('cls,extra', [(DKD, ('--mixup', '0.8', '--dkd-warmup', '5')), (WSLD, ()), (NKD, ()),
                                       (DIST, ('--dist-tau', '2')), (USKD, ('--mixup', '0.8', '--smoothing', '0.1'))],
                         ids=['dkd-mixup-warmup', 'wsld', 'nkd', 'dist', 'uskd-mixup'])
def test_train_one_epoch(tmp_path, teacher_checkpoint, cls, extra):
    args = ['--model', 'test_resnet', '--distiller', cls.name, '--epochs', '1', '--num-classes', '10', *extra]
    if cls.needs_teacher:
        args += ['--teacher', 'test_resnet', '--teacher-checkpoint', str(teacher_checkpoint)]
    _, run_dir = run_train(tmp_path, *args)
    rows = read_summary(run_dir)
    assert len(rows) == 1
    for key in ('loss_gt', *DISTILLERS[cls]):
        value = float(rows[0][f'train_{key}'])
        assert math.isfinite(value), key
    assert math.isfinite(float(rows[0]['train_loss']))
    checkpoint = torch.load(Path(run_dir) / 'checkpoint' / 'last.pth.tar', map_location='cpu', weights_only=False)
    if cls is USKD:
        assert set(checkpoint['distiller_state']) == {'weak_head.weight', 'weak_head.bias'}
