"""Recipes that train as the originals did: --weight-decay-all and the shipped configs that set it (docs/recipes.md)."""
import fnmatch
import glob
import os
import re

import pytest
import timm
import torch
import torch.nn as nn

import train
from distillers.ufd import UFD
from tests.helpers import SYNTHETIC_ARGS, read_summary, train_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WD = 0.05


def ufd_distiller(*argv):
    """A UFD distiller on tiny timm models: a ViT student (pos_embed, cls_token and the CAP pos_embeds among its
    no_weight_decay() names; LayerNorms and biases as 1-d tensors) and a ConvNeXt teacher."""
    args, _ = train.parse_args(['--distiller', 'ufd', '--opt', 'adamw', '--lr', '1e-3', '--weight-decay', str(WD),
                                *argv])
    torch.manual_seed(0)
    student = timm.create_model('test_vit', num_classes=10, img_size=64)
    teacher = timm.create_model('test_convnext', num_classes=10)
    return UFD(student, teacher, nn.CrossEntropyLoss(), args, (3, 64, 64)), args


def decay_by_name(distiller, optimizer):
    """{parameter name: weight decay of its group}; fails if a parameter sits in two groups."""
    names = {id(p): n for n, p in distiller.named_parameters()}
    decay = {}
    for group in optimizer.param_groups:
        for p in group['params']:
            assert names[id(p)] not in decay, names[id(p)]
            decay[names[id(p)]] = group['weight_decay']
    return decay


def trainable(distiller):
    return {n for n, p in distiller.named_parameters() if p.requires_grad}


def exempt_by_timm(distiller):
    """The names timm's factory exempts: 1-d tensors, biases and the no_weight_decay() names."""
    patterns = distiller.no_weight_decay()
    return {n for n, p in distiller.named_parameters() if p.requires_grad and (
        p.ndim <= 1 or n.endswith('.bias') or any(fnmatch.fnmatch(n, pat) for pat in patterns))}


def test_weight_decay_all_gives_every_parameter_the_decay():
    distiller, args = ufd_distiller('--weight-decay-all')
    decay = decay_by_name(distiller, train.create_optimizer(distiller, args))
    exempt = exempt_by_timm(distiller)
    # the student's and the CAPs' position tables, norms and biases are all there and all decayed
    assert {'student.pos_embed', 'student.cls_token', 'proj_spatial.pos_embed', 'student.norm.weight'} <= exempt
    assert set(decay) == trainable(distiller)
    assert not any(n.startswith('teacher.') for n in decay)
    assert all(wd == WD for wd in decay.values()), {n: wd for n, wd in decay.items() if wd != WD}


def test_without_the_flag_timm_exempts_1d_tensors_biases_and_no_weight_decay_names():
    distiller, args = ufd_distiller()
    assert args.weight_decay_all is False
    decay = decay_by_name(distiller, train.create_optimizer(distiller, args))
    exempt = exempt_by_timm(distiller)
    assert set(decay) == trainable(distiller)
    assert {n for n, wd in decay.items() if wd == 0} == exempt
    assert {n for n, wd in decay.items() if wd == WD} == trainable(distiller) - exempt
    assert len(exempt) > 10 and len(trainable(distiller) - exempt) > 10


@pytest.mark.parametrize('decay_all', [False, True])
def test_weight_decay_all_composes_with_layer_decay(decay_all):
    distiller, args = ufd_distiller('--layer-decay', '0.5', *(['--weight-decay-all'] if decay_all else []))
    optimizer = train.create_optimizer(distiller, args)
    decay = decay_by_name(distiller, optimizer)
    assert set(decay) == trainable(distiller)
    assert len({g['lr_scale'] for g in optimizer.param_groups}) > 2  # the layer scales are still there
    zero = {n for n, wd in decay.items() if wd == 0}
    assert zero == (set() if decay_all else exempt_by_timm(distiller))
    assert all(wd == WD for n, wd in decay.items() if n not in zero)


def test_the_command_line_turns_off_what_a_config_turned_on(tmp_path):
    config = tmp_path / 'recipe.yaml'
    config.write_text('weight_decay_all: true\n')
    assert train.parse_args(['-c', str(config)])[0].weight_decay_all is True
    assert train.parse_args(['-c', str(config), '--no-weight-decay-all'])[0].weight_decay_all is False
    assert train.parse_args([])[0].weight_decay_all is False


# ------------------------------------------------------------------------------------------ shipped configs
def shipped_configs():
    return sorted(os.path.relpath(p, ROOT).replace(os.sep, '/')
                  for p in glob.glob(os.path.join(ROOT, 'configs', '*', '*.yaml')) if '/demo/' not in p)


@pytest.mark.parametrize('config, decay_all', [
    ('configs/cifar100/resnet32x4_resnet8x4_kd.yaml', True),  # mdistiller
    ('configs/imagenet/resnet34_resnet18_dkd.yaml', True),  # mdistiller
    ('configs/imagenet/resnet34_resnet18_nkd.yaml', True),  # cls_KD, mmcls without paramwise_cfg
    ('configs/imagenet/mobilenetv2_100_uskd.yaml', True),
    ('configs/cifar100/convnext_tiny_resnet18_ufd.yaml', True),  # UFD-KD schedule A
    ('configs/imagenet/swin_small_patch4_window7_224_resnet18_scalekd.yaml', True),  # ScaleKD traditional
    ('configs/imagenet/swin_large_patch4_window7_224_resnet50d_scalekd.yaml', True),  # ScaleKD's LAMB
    ('configs/imagenet/deit3_small_patch16_224_deit_tiny_patch16_224_vitkd_nkd.yaml', False),  # DeiT paramwise
    ('configs/imagenet/swin_tiny_patch4_window7_224_uskd.yaml', False),  # mmcls Swin paramwise
    ('configs/cifar100/convnext_tiny_deit_tiny_patch16_224_ufd.yaml', False),  # UFD-KD schedule C
    ('configs/imagenet/deit_tiny_patch16_224_resnet18_ofa.yaml', False),  # OFAKD: timm's factory
])
def test_configs_decay_as_their_original(config, decay_all):
    args, _ = train.parse_args(['-c', os.path.join(ROOT, config)])
    assert args.weight_decay_all is decay_all


def test_every_shipped_config_states_its_weight_decay_rule():
    """Each recipe says whether its original decayed every parameter; the rule is in docs/recipes.md."""
    silent = [c for c in shipped_configs()
              if not re.search(r'^weight_decay_all: (true|false)\b', open(os.path.join(ROOT, c)).read(), re.M)]
    assert not silent, f'set weight_decay_all (docs/recipes.md) in: {silent}'


def test_every_shipped_config_with_amp_says_so_on_that_line():
    """AMP where an original trained in float32 is a deviation the config must name."""
    bare = [c for c in shipped_configs()
            if re.search(r'^amp: true\s*$', open(os.path.join(ROOT, c)).read(), re.M)]
    assert not bare, f'comment the amp line (docs/recipes.md) in: {bare}'


def test_resume_refuses_an_optimizer_grouped_the_other_way(tmp_path):
    common = [*SYNTHETIC_ARGS, '--synthetic-train-size', '16', '--synthetic-val-size', '16', '--batch-size', '8',
              '--no-aug', '--model', 'test_resnet', '--teacher', 'test_resnet', '--distiller', 'kd',
              '--weight-decay', '0.05', '--output', tmp_path, '--experiment', 'run']
    assert train_in_process([*common, '--epochs', '1', '--weight-decay-all']) == 0
    resume = ['--epochs', '2', '--resume', tmp_path / 'run' / 'checkpoint' / 'last.pth.tar']
    with pytest.raises(train.UsageError, match='was written with --weight-decay-all'):
        train_in_process([*common, *resume])
    assert train_in_process([*common, *resume, '--weight-decay-all']) == 0
    assert len(read_summary(tmp_path / 'run')) == 2
