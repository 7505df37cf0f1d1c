"""The CIFAR-style networks of the classic CIFAR-100 distillation benchmark (CRD / RepDistiller, DKD / mdistiller),
registered in timm so that `timm.create_model('resnet32x4')` builds them once `models` is imported.

Architectures (widths and depths as in RepDistiller's `models/` package, which mdistiller reuses):
- `resnet{20,32,56,110}` and `resnet{8,32}x4`: 3x3 stride-1 stem conv + BN + ReLU, three stages of
  post-activation BasicBlocks at strides 1, 2, 2, n = (depth - 2) / 6 blocks per stage; widths [16, 16, 32, 64]
  (stem, stage 1..3), or [32, 64, 128, 256] for the x4 models. A 1x1 conv + BN shortcut wherever the shape changes.
- `wrn_16_2`, `wrn_40_1`, `wrn_40_2`: pre-activation wide ResNets, 3x3 stem conv (no BN), three stages of
  n = (depth - 4) / 6 blocks at widths 16k, 32k, 64k, then a final BN + ReLU. No dropout inside the blocks.
- `vgg{8,13}_cifar`: the BN variant of RepDistiller's CIFAR VGG (`vgg8_bn` / `vgg13_bn`, which the benchmark calls
  vgg8 / vgg13): five groups of 3x3 conv (bias) + BN + ReLU, one (vgg8) or two (vgg13) convs per group, widths
  64, 128, 256, 512, 512, 2x2 max-pool after groups 1-3, global average pooling, one Linear(512, K). The original
  pools a fourth time when the input is 64 px (Tiny-ImageNet); at the benchmark's 32 px it does not, and neither
  do we, so a 32 px input gives maps of 32, 16, 8, 4, 4 px. The names carry `_cifar` because timm already
  registers the ImageNet `vgg13`.

Parameter names follow RepDistiller's module names exactly (including `convShortcut`, `block1.layer.0` and
`block0.0`), so the published teacher checkpoints (`{'model': state_dict}` files) load unchanged with
`timm.create_model(name, checkpoint_path=...)` or the trainer's `--teacher-checkpoint`.

Feature taps (`feature_info`, `forward_intermediates`), following what the CRD code returns as its features:
- ResNet: the stem (after its ReLU) and each stage's output after the block's final ReLU (CRD's `preact=False`
  features); the last stage is `forward_features`.
- WRN: the stem conv and each stage's raw output (the residual sum: a pre-activation network has no ReLU there,
  which is also what CRD returns); `forward_features` is the last stage after the final BN + ReLU, and
  `forward_intermediates(norm=True)` applies that BN + ReLU to the last intermediate, as timm's ResNetV2 does.
- VGG: each group's output after its ReLU, before the max-pool.
"""
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
# the helper every timm model uses to read `indices`; importing it keeps our contract identical to timm's
from timm.models._features import feature_take_indices

__all__ = ['CifarResNet', 'CifarWideResNet', 'CifarVgg']

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# pretrained_cfg keys whose presence means the caller points timm at weights of their own
_WEIGHT_SOURCES = ('url', 'file', 'state_dict', 'hf_hub_id')


class _CifarNet(nn.Module):
    """timm's model API on top of a list of tap steps: step i maps tap i-1 to tap i (`feature_info[i]`).

    Subclasses build their layers, then call `_init_head()`, and define `_steps()`, `_final_norm()` and
    `classifier_name` (the attribute that holds the Linear classifier).
    """
    classifier_name = 'fc'
    grad_checkpointing = False

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float):
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        setattr(self, self.classifier_name, self._make_classifier(num_classes, self.global_pool))

    def _make_classifier(self, num_classes: int, pool: SelectAdaptivePool2d) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if pool.is_identity():
            raise ValueError('a classifier needs a global pool: set global_pool (e.g. "avg") or num_classes=0')
        return nn.Linear(self.num_features * pool.feat_mult(), num_classes)

    def _steps(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        raise NotImplementedError

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _run(self, step, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # recomputed in backward, so a training-mode BN updates its running stats twice, as in timm's models
            return checkpoint(step, x, use_reentrant=False)
        return step(x)

    # ------------------------------------------------------------------ timm model API
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def no_weight_decay(self):
        return set()

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        pool = self.global_pool
        if global_pool is not None:
            pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        head = self._make_classifier(num_classes, pool)
        self.global_pool, self.num_classes = pool, num_classes
        setattr(self, self.classifier_name, head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for step in self._steps():
            x = self._run(step, x)
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features at the taps of `feature_info`, with timm's contract: `indices` None (all), an int n (the last
        n taps) or a list of tap indices (negative ones count from the end); `norm` applies the final norm of a
        pre-activation network to the last tap; `stop_early` skips the stages after the last wanted tap, and the
        returned final features are then the output of that tap (without the final norm unless it is the last)."""
        if output_fmt != 'NCHW':
            raise ValueError(f'output_fmt must be NCHW for {type(self).__name__}, not {output_fmt}')
        steps = self._steps()
        last = len(steps) - 1
        take_indices, max_index = feature_take_indices(len(steps), indices)
        if stop_early or intermediates_only:
            steps = steps[:max_index + 1]
        intermediates = []
        for i, step in enumerate(steps):
            x = self._run(step, x)
            if i in take_indices:
                intermediates.append(self._final_norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if len(steps) == last + 1:
            x = self._final_norm(x)
        return x, intermediates


def _init_conv_bn(model: nn.Module, zero_linear_bias: bool):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # N(0, 2 / (k*k*out_channels)): He init on fan-out, the init all three reference families use
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and zero_linear_bias:
            nn.init.zeros_(m.bias)


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=bias)


# ---------------------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        # not in place: `x` may be a tap that the caller keeps
        return F.relu(out + shortcut)


class CifarResNet(_CifarNet):
    """CIFAR ResNet of depth 6n + 2 with widths (stem, stage 1, stage 2, stage 3)."""

    def __init__(
            self,
            depth: int,
            widths: Sequence[int],
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f'a CIFAR ResNet of BasicBlocks has depth 6n + 2, not {depth}')
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_chs = widths[0]
        for i, (out_chs, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            layers = [BasicBlock(in_chs if b == 0 else out_chs, out_chs, stride if b == 0 else 1)
                      for b in range(blocks)]
            setattr(self, f'layer{i}', nn.Sequential(*layers))
            in_chs = out_chs
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module='relu')] + [
            dict(num_chs=c, reduction=r, module=f'layer{i}')
            for i, (c, r) in enumerate(zip(widths[1:], (1, 2, 4)), start=1)]
        self._init_head(widths[-1], num_classes, global_pool, drop_rate)
        _init_conv_bn(self, zero_linear_bias=False)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def _steps(self):
        return [self._stem, self.layer1, self.layer2, self.layer3]


# ------------------------------------------------------------------------------------------------------ WRN
class WideBasicBlock(nn.Module):
    """Pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut. When the shape changes, the
    1x1 shortcut conv takes the pre-activated input relu(bn1(x)), as in Zagoruyko & Komodakis' WRN."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.convShortcut = None  # RepDistiller's parameter name, kept for checkpoint compatibility
        if in_chs != out_chs or stride != 1:
            self.convShortcut = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return out + shortcut


class CifarWideResNet(_CifarNet):
    """WRN-depth-k of depth 6n + 4, widths 16, 16k, 32k, 64k."""

    def __init__(
            self,
            depth: int,
            widen_factor: int,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f'a wide ResNet has depth 6n + 4, not {depth}')
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv3x3(in_chans, widths[0])
        in_chs = widths[0]
        for i, (out_chs, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            layers = [WideBasicBlock(in_chs if b == 0 else out_chs, out_chs, stride if b == 0 else 1)
                      for b in range(blocks)]
            # the extra `layer` level reproduces RepDistiller's `block1.layer.0...` parameter names
            setattr(self, f'block{i}', nn.Sequential(OrderedDict(layer=nn.Sequential(*layers))))
            in_chs = out_chs
        self.bn1 = nn.BatchNorm2d(widths[-1])
        self.relu = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module='conv1')] + [
            dict(num_chs=c, reduction=r, module=f'block{i}')
            for i, (c, r) in enumerate(zip(widths[1:], (1, 2, 4)), start=1)]
        self._init_head(widths[-1], num_classes, global_pool, drop_rate)
        _init_conv_bn(self, zero_linear_bias=True)

    def _steps(self):
        return [self.conv1, self.block1, self.block2, self.block3]

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(x))


# ------------------------------------------------------------------------------------------------------ VGG
class CifarVgg(_CifarNet):
    """CIFAR VGG with BN: five conv groups, max-pool after groups 1-3, global pool, one Linear."""
    classifier_name = 'classifier'

    def __init__(
            self,
            groups: Sequence[Sequence[int]],
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        if len(groups) != 5:
            raise ValueError(f'a CIFAR VGG has five conv groups, not {len(groups)}')
        in_chs = in_chans
        for g, widths in enumerate(groups):
            layers = []
            for out_chs in widths:
                layers += [_conv3x3(in_chs, out_chs, bias=True), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]
                in_chs = out_chs
            # the group's last ReLU runs outside it (not in place) so the tap can be taken after it; dropping it
            # here also keeps RepDistiller's Sequential indices
            setattr(self, f'block{g}', nn.Sequential(*layers[:-1]))
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.feature_info = [
            dict(num_chs=widths[-1], reduction=r, module=f'block{g}')
            for g, (widths, r) in enumerate(zip(groups, (1, 2, 4, 8, 8)))]
        self._init_head(groups[-1][-1], num_classes, global_pool, drop_rate)
        _init_conv_bn(self, zero_linear_bias=True)
        if isinstance(self.classifier, nn.Linear):
            nn.init.normal_(self.classifier.weight, 0., 0.01)

    def _steps(self):
        return [
            lambda x: F.relu(self.block0(x)),
            lambda x: F.relu(self.block1(self.pool0(x))),
            lambda x: F.relu(self.block2(self.pool1(x))),
            lambda x: F.relu(self.block3(self.pool2(x))),
            lambda x: F.relu(self.block4(x)),
        ]


# ------------------------------------------------------------------------------------------------ registry
def _cfg(**kwargs):
    cfg = dict(
        url='', num_classes=100, input_size=(3, 32, 32), crop_pct=1.0, interpolation='bilinear',
        mean=CIFAR100_MEAN, std=CIFAR100_STD, first_conv='conv1', classifier='fc')
    cfg.update(kwargs)
    return cfg


default_cfgs = generate_default_cfgs({
    'resnet20': _cfg(),
    'resnet32': _cfg(),
    'resnet56': _cfg(),
    'resnet110': _cfg(),
    'resnet8x4': _cfg(),
    'resnet32x4': _cfg(),
    'wrn_16_2': _cfg(),
    'wrn_40_1': _cfg(),
    'wrn_40_2': _cfg(),
    'vgg8_cifar': _cfg(first_conv='block0.0', classifier='classifier'),
    'vgg13_cifar': _cfg(first_conv='block0.0', classifier='classifier'),
})


def _has_weight_source(cfg) -> bool:
    if cfg is None:
        return False
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    return any(cfg.get(key) for key in _WEIGHT_SOURCES)


def _create(model_cls, variant: str, pretrained: bool, model_args: dict, num_taps: int, **kwargs):
    for unsupported in ('drop_path_rate', 'drop_block_rate'):
        if kwargs.pop(unsupported, None):
            raise ValueError(f'{variant} does not implement {unsupported}: leave it at 0')
    if pretrained and not (_has_weight_source(kwargs.get('pretrained_cfg'))
                           or _has_weight_source(kwargs.get('pretrained_cfg_overlay'))):
        raise ValueError(
            f'{variant} has no published weights to download: train it, or load a checkpoint with '
            f'checkpoint_path=... (--teacher-checkpoint), or point pretrained_cfg_overlay=dict(file=...) at one')
    return build_model_with_cfg(
        model_cls, variant, pretrained, feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(num_taps))),
        **model_args, **kwargs)


def _resnet(variant, depth, widths, pretrained, **kwargs):
    return _create(CifarResNet, variant, pretrained, dict(depth=depth, widths=widths), 4, **kwargs)


def _wrn(variant, depth, widen_factor, pretrained, **kwargs):
    return _create(
        CifarWideResNet, variant, pretrained, dict(depth=depth, widen_factor=widen_factor), 4, **kwargs)


def _vgg(variant, groups, pretrained, **kwargs):
    return _create(CifarVgg, variant, pretrained, dict(groups=groups), 5, **kwargs)


_NARROW = (16, 16, 32, 64)
_WIDE_X4 = (32, 64, 128, 256)


@register_model
def resnet20(pretrained=False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20, widths 16/32/64."""
    return _resnet('resnet20', 20, _NARROW, pretrained, **kwargs)


@register_model
def resnet32(pretrained=False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32, widths 16/32/64."""
    return _resnet('resnet32', 32, _NARROW, pretrained, **kwargs)


@register_model
def resnet56(pretrained=False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-56, widths 16/32/64."""
    return _resnet('resnet56', 56, _NARROW, pretrained, **kwargs)


@register_model
def resnet110(pretrained=False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-110, widths 16/32/64."""
    return _resnet('resnet110', 110, _NARROW, pretrained, **kwargs)


@register_model
def resnet8x4(pretrained=False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-8 at four times the width: stem 32, stages 64/128/256."""
    return _resnet('resnet8x4', 8, _WIDE_X4, pretrained, **kwargs)


@register_model
def resnet32x4(pretrained=False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32 at four times the width: stem 32, stages 64/128/256."""
    return _resnet('resnet32x4', 32, _WIDE_X4, pretrained, **kwargs)


@register_model
def wrn_16_2(pretrained=False, **kwargs) -> CifarWideResNet:
    """WRN-16-2."""
    return _wrn('wrn_16_2', 16, 2, pretrained, **kwargs)


@register_model
def wrn_40_1(pretrained=False, **kwargs) -> CifarWideResNet:
    """WRN-40-1."""
    return _wrn('wrn_40_1', 40, 1, pretrained, **kwargs)


@register_model
def wrn_40_2(pretrained=False, **kwargs) -> CifarWideResNet:
    """WRN-40-2."""
    return _wrn('wrn_40_2', 40, 2, pretrained, **kwargs)


@register_model
def vgg8_cifar(pretrained=False, **kwargs) -> CifarVgg:
    """CIFAR VGG-8 with BN (the benchmark's vgg8): one conv per group."""
    return _vgg('vgg8_cifar', ((64,), (128,), (256,), (512,), (512,)), pretrained, **kwargs)


@register_model
def vgg13_cifar(pretrained=False, **kwargs) -> CifarVgg:
    """CIFAR VGG-13 with BN (the benchmark's vgg13): two convs per group."""
    return _vgg('vgg13_cifar', ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)), pretrained, **kwargs)
