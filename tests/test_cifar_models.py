"""The CIFAR benchmark models of models/cifar.py: sizes, timm API, feature taps, checkpoints, registry."""
import math
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models  # noqa: F401  (registers the CIFAR models)
from models import FeatureAdapter, FeatureRequest
from models.checkpoint import load_model_weights
from models.cifar import CIFAR100_MEAN, CIFAR100_STD
from tests.helpers import read_summary, run_train

torch.set_num_threads(1)

BENCHMARK_MODELS = ['resnet8x4', 'resnet32x4', 'resnet20', 'resnet32', 'resnet56', 'resnet110',
                    'wrn_16_2', 'wrn_40_1', 'wrn_40_2', 'vgg8_cifar', 'vgg13_cifar']
# one small member per family for the behaviour tests (resnet20 has identity and 1x1-conv shortcuts)
FAMILIES = ['resnet20', 'wrn_16_2', 'vgg8_cifar']


# ------------------------------------------------------------------------------------------- sizes
def resnet_param_count(depth, widths, k):
    n = (depth - 2) // 6
    total = 27 * widths[0] + 2 * widths[0]  # stem conv from RGB, BN
    in_chs = widths[0]
    for out_chs, stride in zip(widths[1:], (1, 2, 2)):
        for b in range(n):
            i = in_chs if b == 0 else out_chs
            total += 9 * i * out_chs + 9 * out_chs * out_chs + 2 * 2 * out_chs
            if b == 0 and (stride != 1 or i != out_chs):
                total += i * out_chs + 2 * out_chs  # 1x1 conv + BN shortcut
        in_chs = out_chs
    return total + widths[-1] * k + k


def wrn_param_count(depth, widen, k):
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    total = 27 * 16  # stem conv, no BN
    in_chs = 16
    for out_chs, stride in zip(widths[1:], (1, 2, 2)):
        for b in range(n):
            i = in_chs if b == 0 else out_chs
            total += 2 * i + 9 * i * out_chs + 2 * out_chs + 9 * out_chs * out_chs
            if b == 0 and (stride != 1 or i != out_chs):
                total += i * out_chs  # 1x1 conv shortcut, no BN
        in_chs = out_chs
    return total + 2 * widths[-1] + widths[-1] * k + k  # final BN, classifier


def vgg_param_count(groups, k):
    total, in_chs = 0, 3
    for group in groups:
        for out_chs in group:
            total += 9 * in_chs * out_chs + out_chs + 2 * out_chs  # conv with bias, BN
            in_chs = out_chs
    return total + 512 * k + k


VGG8 = [[64], [128], [256], [512], [512]]
VGG13 = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]
EXPECTED_PARAMS = {
    'resnet8x4': resnet_param_count(8, [32, 64, 128, 256], 100),
    'resnet32x4': resnet_param_count(32, [32, 64, 128, 256], 100),
    'resnet20': resnet_param_count(20, [16, 16, 32, 64], 100),
    'resnet32': resnet_param_count(32, [16, 16, 32, 64], 100),
    'resnet56': resnet_param_count(56, [16, 16, 32, 64], 100),
    'resnet110': resnet_param_count(110, [16, 16, 32, 64], 100),
    'wrn_16_2': wrn_param_count(16, 2, 100),
    'wrn_40_1': wrn_param_count(40, 1, 100),
    'wrn_40_2': wrn_param_count(40, 2, 100),
    'vgg8_cifar': vgg_param_count(VGG8, 100),
    'vgg13_cifar': vgg_param_count(VGG13, 100),
}
# model sizes as the KD literature quotes them for CIFAR-100 (millions)
PUBLISHED_MILLIONS_100 = {'resnet8x4': 1.23, 'resnet32x4': 7.43, 'resnet56': 0.86, 'resnet110': 1.73,
                          'wrn_16_2': 0.70, 'wrn_40_2': 2.26, 'vgg8_cifar': 3.96, 'vgg13_cifar': 9.46}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', BENCHMARK_MODELS)
def test_parameter_count_matches_the_architecture(name):
    model = timm.create_model(name)
    assert model.num_classes == 100
    assert n_params(model) == EXPECTED_PARAMS[name]
    if name in PUBLISHED_MILLIONS_100:
        assert n_params(model) == pytest.approx(PUBLISHED_MILLIONS_100[name] * 1e6, rel=0.01)


def test_resnet20_has_the_published_size():
    # He et al. 2016, Table 6 (CIFAR-10): ResNet-20 has 0.27M parameters
    assert n_params(timm.create_model('resnet20', num_classes=10)) == pytest.approx(0.27e6, rel=0.01)


# ------------------------------------------------------------------------------------- forward + timm API
@pytest.mark.parametrize('name', BENCHMARK_MODELS)
def test_forward_shapes_at_32px(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    final_grid = 4 if name.startswith('vgg') else 8
    assert logits.shape == (2, 100)
    assert feats.shape == (2, model.num_features, final_grid, final_grid)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(pooled, feats.mean(dim=(2, 3)))
    torch.testing.assert_close(model.get_classifier()(pooled), logits)
    assert torch.isfinite(logits).all()


EXPECTED_STAGES = {  # (channels, grid) per adapter stage at 32 px
    'resnet8x4': [(64, 32), (128, 16), (256, 8)],
    'resnet32x4': [(64, 32), (128, 16), (256, 8)],
    'resnet20': [(16, 32), (32, 16), (64, 8)],
    'resnet32': [(16, 32), (32, 16), (64, 8)],
    'resnet56': [(16, 32), (32, 16), (64, 8)],
    'resnet110': [(16, 32), (32, 16), (64, 8)],
    'wrn_16_2': [(32, 32), (64, 16), (128, 8)],
    'wrn_40_1': [(16, 32), (32, 16), (64, 8)],
    'wrn_40_2': [(32, 32), (64, 16), (128, 8)],
    'vgg8_cifar': [(64, 32), (128, 16), (256, 8), (512, 4)],
    'vgg13_cifar': [(64, 32), (128, 16), (256, 8), (512, 4)],
}


@pytest.mark.parametrize('name', BENCHMARK_MODELS)
def test_feature_adapter_description(name):
    model = timm.create_model(name)
    d = FeatureAdapter(model, (3, 32, 32)).description
    assert d.layout == 'map' and not d.plain_tokens
    assert [(t.channels, t.grid[0]) for t in d.stages.values()] == EXPECTED_STAGES[name]
    assert all(t.grid[0] == t.grid[1] == 32 // t.reduction for t in d.stages.values())
    assert d.stage(-1) == d.final and d.final.channels == model.num_features
    assert d.pre_logits_dim == model.num_features and d.num_classes == 100


def test_feature_adapter_serves_forward_features_as_last_stage():
    model = timm.create_model('resnet8x4').eval()
    adapter = FeatureAdapter(model, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = adapter(x, FeatureRequest(stages=(1, 2, 3), pre_logits=True))
        torch.testing.assert_close(out.stages[3], model.forward_features(x))
        torch.testing.assert_close(out.logits, model(x))
    assert out.stages[1].shape == (2, 64, 32, 32) and out.stages[2].shape == (2, 128, 16, 16)


def test_default_cfg_gives_cifar_data_settings():
    for name in BENCHMARK_MODELS:
        cfg = timm.data.resolve_data_config({}, model=timm.create_model(name))
        assert cfg['input_size'] == (3, 32, 32)
        assert cfg['mean'] == CIFAR100_MEAN == (0.5071, 0.4865, 0.4409)
        assert cfg['std'] == CIFAR100_STD == (0.2673, 0.2564, 0.2762)
        assert cfg['crop_pct'] == 1.0
        assert timm.get_pretrained_cfg_value(name, 'num_classes') == 100


@pytest.mark.parametrize('name', FAMILIES)
def test_classifier_api(name):
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.in_features == model.num_features and head.out_features == 10
    assert model.no_weight_decay() == set()
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x).mean(dim=(2, 3)))
    model.reset_classifier(5, global_pool='max')
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.amax(dim=(2, 3)))
    with pytest.raises(ValueError, match='global pool'):
        model.reset_classifier(5, global_pool='')
    assert model(x).shape == (2, 5)  # a refused reset leaves the model as it was


def test_timm_kwargs():
    model = timm.create_model('resnet20', in_chans=1, num_classes=10, drop_rate=0.2, drop_path_rate=0.)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert model.drop_rate == 0.2
    with pytest.raises(ValueError, match='drop_path_rate'):
        timm.create_model('resnet20', drop_path_rate=0.1)
    features = timm.create_model('wrn_16_2', features_only=True)
    maps = features(torch.randn(2, 3, 32, 32))
    assert [m.shape[1] for m in maps] == features.feature_info.channels() == [16, 32, 64, 128]


def test_grad_checkpointing_gives_the_same_gradients():
    model = timm.create_model('resnet20', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    calls = []
    model.layer2.register_forward_pre_hook(lambda *_: calls.append(1))
    grads, runs = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        calls.clear()
        model(x).square().sum().backward()
        grads.append(model.layer1[0].conv1.weight.grad.clone())
        runs.append(len(calls))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0
    assert runs == [1, 2]  # a checkpointed stage runs again in backward


def test_pretrained_true_is_refused_without_weights_but_loads_a_given_file(tmp_path):
    with pytest.raises(ValueError, match='no published weights'):
        timm.create_model('resnet8x4', pretrained=True)
    source = timm.create_model('resnet8x4')
    path = tmp_path / 'resnet8x4.pth'
    torch.save(source.state_dict(), path)
    loaded = timm.create_model('resnet8x4', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ----------------------------------------------------------------------------------- forward_intermediates
@pytest.mark.parametrize('name', FAMILIES)
def test_forward_intermediates_contract(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    info = model.feature_info
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == len(info) == (5 if name.startswith('vgg') else 4)
        for fmap, tap in zip(inter, info):
            assert fmap.shape == (2, tap['num_chs'], 32 // tap['reduction'], 32 // tap['reduction'])
        torch.testing.assert_close(final, model.forward_features(x))

        _, last_two = model.forward_intermediates(x, indices=2)
        assert len(last_two) == 2
        for got, want in zip(last_two, inter[-2:]):
            torch.testing.assert_close(got, want)
        _, picked = model.forward_intermediates(x, indices=[-1, 1])  # sorted, negative from the end
        torch.testing.assert_close(picked[0], inter[1])
        torch.testing.assert_close(picked[1], inter[-1])

        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert isinstance(only, list) and len(only) == 2
        torch.testing.assert_close(only[1], inter[2])

        # stopping after tap i gives tap i as the final output (before the last tap), and each tap equals the one
        # of a full pass, so no later stage wrote into it in place
        for i in range(len(info)):
            early_final, early = model.forward_intermediates(x, indices=[i], stop_early=True)
            torch.testing.assert_close(early[0], inter[i])
            if i < len(info) - 1:
                torch.testing.assert_close(early_final, inter[i])

    with pytest.raises(ValueError, match='NCHW'):
        model.forward_intermediates(x, output_fmt='NHWC')
    with pytest.raises(AssertionError):
        model.forward_intermediates(x, indices=[len(info)])


def test_last_intermediate_and_final_norm():
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name in ('resnet8x4', 'vgg8_cifar'):  # post-activation: the last tap is forward_features
            model = timm.create_model(name).eval()
            _, inter = model.forward_intermediates(x, indices=[-1])
            torch.testing.assert_close(inter[0], model.forward_features(x))
        wrn = timm.create_model('wrn_16_2').eval()
        randomize_bn(wrn)
        _, raw = wrn.forward_intermediates(x, indices=[-1])
        _, normed = wrn.forward_intermediates(x, indices=[-1], norm=True)
        bn = wrn.bn1
        torch.testing.assert_close(normed[0], F.relu(eval_bn(raw[0], bn)))
        torch.testing.assert_close(normed[0], wrn.forward_features(x))
        assert (raw[0] < 0).any()  # the raw residual sum of a pre-activation network


# ------------------------------------------------------------------------ block maths, computed by hand
def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def eval_bn(x, bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean[None, :, None, None]) * scale[None, :, None, None] + bn.bias[None, :, None, None]


def conv(x, module, stride=1, padding=1):
    return F.conv2d(x, module.weight, module.bias, stride=stride, padding=padding)


def random_bn_model(name):
    """The model in eval mode with random BN statistics and affine terms, and a batch of two 32 px images."""
    model = timm.create_model(name).eval()
    randomize_bn(model)
    return model, torch.randn(2, 3, 32, 32)


def assert_taps(model, x, indices, want):
    """The model's intermediates at `indices` are the hand-computed maps `want`, one for one."""
    inter = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert len(inter) == len(want)
    for got, expected in zip(inter, want):
        torch.testing.assert_close(got, expected)


@torch.no_grad()
def test_resnet_taps_are_post_relu_block_outputs():
    model, x = random_bn_model('resnet8x4')
    stem = F.relu(eval_bn(conv(x, model.conv1), model.bn1))
    block = model.layer1[0]  # resnet8x4 has one block per stage; 32 -> 64 channels needs the 1x1 shortcut
    h = F.relu(eval_bn(conv(stem, block.conv1), block.bn1))
    h = eval_bn(conv(h, block.conv2), block.bn2)
    shortcut = eval_bn(conv(stem, block.downsample[0], padding=0), block.downsample[1])
    want = F.relu(h + shortcut)
    block = model.layer2[0]
    h2 = F.relu(eval_bn(conv(want, block.conv1, stride=2), block.bn1))
    h2 = eval_bn(conv(h2, block.conv2), block.bn2)
    want2 = F.relu(h2 + eval_bn(conv(want, block.downsample[0], stride=2, padding=0), block.downsample[1]))
    assert_taps(model, x, [0, 1, 2], [stem, want, want2])


@torch.no_grad()
def test_wrn_blocks_are_pre_activation_with_shortcut_on_the_activated_input():
    model, x = random_bn_model('wrn_16_2')
    stem = conv(x, model.conv1)
    first, second = model.block1.layer[0], model.block1.layer[1]  # 16 -> 32 channels, then 32 -> 32
    pre = F.relu(eval_bn(stem, first.bn1))
    y = conv(F.relu(eval_bn(conv(pre, first.conv1), first.bn2)), first.conv2) + conv(pre, first.convShortcut,
                                                                                      padding=0)
    pre2 = F.relu(eval_bn(y, second.bn1))
    want = conv(F.relu(eval_bn(conv(pre2, second.conv1), second.bn2)), second.conv2) + y
    assert_taps(model, x, [0, 1], [stem, want])


@torch.no_grad()
def test_vgg_groups_pool_between_and_tap_after_relu():
    model, x = random_bn_model('vgg13_cifar')
    inter = model.forward_intermediates(x, intermediates_only=True)
    b = model.block1  # conv, BN, ReLU, conv, BN
    h = F.relu(eval_bn(conv(F.max_pool2d(inter[0], 2), b[0]), b[1]))
    want = F.relu(eval_bn(conv(h, b[3]), b[4]))
    torch.testing.assert_close(inter[1], want)
    b = model.block4  # no pool between groups 4 and 5 at 32 px
    h = F.relu(eval_bn(conv(inter[3], b[0]), b[1]))
    torch.testing.assert_close(inter[4], F.relu(eval_bn(conv(h, b[3]), b[4])))
    assert all((t >= 0).all() for t in inter)


# ----------------------------------------------------------------------------------------- checkpoints
# parameter names of the reference implementation (RepDistiller / mdistiller), so their teacher files load
REFERENCE_KEYS = {
    'resnet8x4': ['conv1.weight', 'bn1.running_mean', 'layer1.0.conv1.weight', 'layer1.0.bn2.bias',
                  'layer1.0.downsample.0.weight', 'layer1.0.downsample.1.running_var', 'layer3.0.conv2.weight',
                  'fc.weight', 'fc.bias'],
    'resnet20': ['layer1.2.conv2.weight', 'layer2.0.downsample.0.weight', 'layer3.2.bn2.weight'],
    'wrn_16_2': ['conv1.weight', 'block1.layer.0.bn1.weight', 'block1.layer.0.convShortcut.weight',
                 'block1.layer.1.conv2.weight', 'block3.layer.0.convShortcut.weight', 'bn1.running_var',
                 'fc.weight'],
    'vgg13_cifar': ['block0.0.weight', 'block0.0.bias', 'block0.1.running_mean', 'block0.3.weight',
                    'block0.4.weight', 'block4.4.bias', 'classifier.weight', 'classifier.bias'],
}
ABSENT_KEYS = {
    'resnet8x4': ['layer1.0.downsample.2.weight', 'conv1.bias'],
    'resnet20': ['layer1.0.downsample.0.weight'],  # 16 -> 16 channels at stride 1: identity shortcut
    'wrn_16_2': ['block1.layer.1.convShortcut.weight', 'conv1.bias', 'bn0.weight'],
    'vgg13_cifar': ['block0.5.weight', 'block0.2.weight'],
}


@pytest.mark.parametrize('name', sorted(REFERENCE_KEYS))
def test_parameter_names_match_the_reference_checkpoints(name):
    keys = set(timm.create_model(name).state_dict())
    assert set(REFERENCE_KEYS[name]) <= keys
    assert not set(ABSENT_KEYS[name]) & keys
    if name == 'wrn_16_2':
        assert not any('block2.layer.1.convShortcut' in k for k in keys)


@pytest.mark.parametrize('name,wrapper', [('resnet8x4', 'state_dict'), ('wrn_16_2', 'model'),
                                          ('vgg8_cifar', None)])
def test_checkpoint_round_trip(tmp_path, name, wrapper):
    source = timm.create_model(name, num_classes=10)
    randomize_bn(source, seed=1)
    state = source.state_dict()
    path = tmp_path / f'{name}.pth'
    # 'model' is RepDistiller's layout ({'model': state_dict, 'epoch': ...}), 'state_dict' timm's
    torch.save({wrapper: state, 'epoch': 240} if wrapper else state, path)
    loaded = timm.create_model(name, num_classes=10, checkpoint_path=str(path)).eval()
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source.eval()(x))


# ------------------------------------------------------------------------------------------- registry
def timm_modules_defining(name):
    """timm's own model modules that define an entrypoint called `name` (timm imports all of them on import)."""
    return [mod_name for mod_name, mod in list(sys.modules.items())
            if mod_name.startswith('timm.models.') and mod is not None and callable(getattr(mod, name, None))]


def test_no_registration_shadows_a_timm_model():
    assert sorted(timm.list_models(module='cifar')) == sorted(BENCHMARK_MODELS)
    assert timm_modules_defining('vgg13') == ['timm.models.vgg']  # the check sees a clash where there is one
    for name in BENCHMARK_MODELS:
        assert timm_modules_defining(name) == [], name
        assert timm.get_pretrained_cfg_value(name, 'mean') == CIFAR100_MEAN


# ------------------------------------------------------------------------------------------------ e2e
@pytest.mark.e2e
def test_train_cifar_student_from_cifar_teacher(tmp_path):
    teacher_path = tmp_path / 'resnet56.pth'
    torch.save(timm.create_model('resnet56', num_classes=10).state_dict(), teacher_path)
    _, run_dir = run_train(tmp_path, '--model', 'resnet20', '--teacher', 'resnet56', '--distiller', 'kd',
                           '--teacher-checkpoint', teacher_path, '--epochs', '1', '--lr', '0.05',
                           '--kd-temperature', '4', '--synthetic-train-size', '64', '--synthetic-val-size', '32')
    rows = read_summary(run_dir)
    assert len(rows) == 1
    assert math.isfinite(float(rows[0]['train_loss'])) and math.isfinite(float(rows[0]['eval_loss']))
    student = timm.create_model('resnet20', num_classes=10)
    load_model_weights(student, str(run_dir / 'checkpoint' / 'last.pth.tar'))


# the feature methods on the classic CIFAR-100 pairs, on their own defaults
CIFAR_PAIRS = [('resnet20', 'resnet56'), ('wrn_16_2', 'wrn_40_2'), ('vgg8_cifar', 'vgg13_cifar')]


def _distiller(method, student, teacher, *argv):
    import train
    from distillers import get_distiller_class
    args, _ = train.parse_args(['--model', student, '--teacher', teacher, '--distiller', method, *argv])
    torch.manual_seed(0)
    s, t = timm.create_model(student, num_classes=10), timm.create_model(teacher, num_classes=10).eval()
    return get_distiller_class(method)(s, t, nn.CrossEntropyLoss(), args, (3, 32, 32))


@pytest.mark.parametrize('method', ['ofa', 'fitnet', 'scalekd'])
@pytest.mark.parametrize('student, teacher', CIFAR_PAIRS, ids=[p[0] for p in CIFAR_PAIRS])
def test_feature_methods_run_on_their_defaults_with_the_cifar_pairs(method, student, teacher):
    d = _distiller(method, student, teacher)
    if method in ('ofa', 'fitnet'):  # every stage of the student: three on the ResNets and WRNs, four on a VGG
        assert d.stages == ((1, 2, 3, 4) if student.startswith('vgg') else (1, 2, 3))
    _, losses = d(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert losses and all(bool(torch.isfinite(v)) for v in losses.values())


@pytest.mark.parametrize('method', ['ofa', 'fitnet'])
def test_a_stage_the_cifar_student_lacks_stays_an_error(method):
    from distillers import DistillerError
    with pytest.raises(DistillerError, match='4'):
        _distiller(method, 'resnet20', 'resnet56', f'--{method}-stage', '4')
