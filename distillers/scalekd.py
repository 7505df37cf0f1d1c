"""ScaleKD: Fan et al., "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers" (NeurIPS 2024).
Spec: docs/methods/scalekd.md.

Student stages 3 and 4 are projected by cross-attention projectors (distillers/cap.py) and compared with the
teacher's normalized last-stage map (distillers/final_map.py) in two views, spatial and frequency (the spatial
mean removed, which is exactly what zeroing the DCT's DC coefficient does; distillers/frequency.py). Teacher
parameter perception: the stage-3 projection runs through the frozen teacher's last stage with autograd on, and
its output is both compared with the teacher's map and used as the query of the stage-4 projector. Each view is
its own chain of CAPs.

Student taps (docs/methods/scalekd.md §2): stage 3 is the stage before the last of hierarchical models (CNN,
Swin, ConvNeXt), and for plain token models (ViT, Mixer) the raw output of the block that ends the third quarter
(block 9 of 12); stage 4 is the final pre-pooling map (`forward_features`, normalized where the model's own
is). The teacher's last stage is found by family through timm's own modules (`TeacherLastStage`).
"""
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from models.cifar import CifarResNet, CifarVgg, CifarWideResNet
from models.features import FeatureRequest, to_map, to_tokens
from .base import DistillerError, broadcast_values, float32_loss
from .cap import CrossAttentionProjector, cap_no_weight_decay, default_num_heads
from .final_map import FinalMapDistiller, add_temperature_arg, head_norm_on_map
from .frequency import check_feature_maps, decoupled_losses, normalized_squared_error


# ---------------------------------------------------------------------------------------------- loss math
def dfm_spatial_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Spatial view, unweighted: sum over (b, h, w) of ||n_C(S) - n_C(T)||^2, divided by B
    (docs/methods/scalekd.md §5)."""
    check_feature_maps(student, teacher)
    with float32_loss(student.device.type):
        return normalized_squared_error(student.float(), teacher.float(), dim=1)


def dfm_frequency_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Frequency view, unweighted: the spatial view after removing each channel's spatial mean (the DC part).

    This is the AC term of UFD's spatial branch. AC vectors that are zero up to rounding count as exact zeros, with
    no gradient (see `squared_errors_and_gradients` in distillers/frequency.py).
    """
    return decoupled_losses(student, None, teacher)[1]


# ---------------------------------------------------------------------------------------------- teacher stage
class TeacherLastStage:
    """The frozen teacher's last stage as a function of the map that enters it, with autograd (TPP).

    Input: a (B, C, H, W) map shaped like the teacher's stage before the last (`description.stage(-2)`).
    Output: a (B, C_t, H_t, W_t) map in the layout of the teacher's normalized final map, so that it is
    comparable with the target. Rules, by timm family (docs/methods/scalekd.md §4, §10.10):
    - Swin: `layers[-1]` (patch merging + last blocks, NHWC) + `norm`;
    - ConvNeXt: `stages[-1]` + `norm_pre`, then the head's norm on the map;
    - ResNet: `layer4`;
    - the CIFAR ResNets, WRNs and VGGs of models/cifar.py: their steps after the stage-before-last tap, then
      their final norm (a WRN's BN + ReLU), as their own `forward_features` runs them;
    - ViT/DeiT: the blocks after the stage-3 tap (the last two of 12) + `norm` (+ `fc_norm` on the map), with
      the teacher's own prefix tokens at that depth put back in front.
    A plain object, not a module: the teacher must not become part of the distiller.
    """
    families = 'Swin, ConvNeXt, ResNet, ViT/DeiT, CIFAR ResNet/WRN/VGG'

    def __init__(self, teacher: nn.Module, adapter):
        self.teacher = teacher
        self.input_tap = adapter.description.stage(-2)
        self.output_tap = adapter.description.final
        self.num_prefix_tokens = adapter.num_prefix_tokens
        self.map_norm = head_norm_on_map(teacher)
        if isinstance(teacher, SwinTransformer):
            self.run = self._swin
        elif isinstance(teacher, ConvNeXt):
            self.run = self._convnext
        elif isinstance(teacher, ResNet):
            self.run = self._resnet
        elif isinstance(teacher, (CifarResNet, CifarWideResNet, CifarVgg)):
            self.first_step = self.input_tap.index + 1
            self.run = self._cifar
        elif isinstance(teacher, VisionTransformer):
            self.first_block = self.input_tap.index + 1
            self.run = self._vit
        else:
            raise DistillerError(
                f'scalekd stage 3 runs the teacher\'s last stage, which is defined for {self.families} '
                f'teachers, not {type(teacher).__name__}; use --scalekd-stages 4 with this teacher')
        self._check_shapes()

    @property
    def needs_prefix_tokens(self) -> bool:
        return isinstance(self.teacher, VisionTransformer) and self.num_prefix_tokens > 0

    def _check_shapes(self):
        param = next(self.teacher.parameters())
        c, (h, w) = self.input_tap.channels, self.input_tap.grid
        x = torch.zeros(1, c, h, w, device=param.device, dtype=param.dtype)
        prefix = torch.zeros(1, self.num_prefix_tokens, c, device=param.device, dtype=param.dtype)
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            with torch.no_grad():
                out = self(x, prefix)
        finally:
            self.teacher.train(was_training)
        expected = (1, self.output_tap.channels, *self.output_tap.grid)
        if tuple(out.shape) != expected:
            raise DistillerError(f'the teacher\'s last stage maps {(1, c, h, w)} to {tuple(out.shape)}, not to '
                                 f'its final map {expected}; this {type(self.teacher).__name__} does not follow '
                                 f'the {self.families} layout')

    def __call__(self, feature_map: torch.Tensor, prefix: torch.Tensor = None) -> torch.Tensor:
        return self.map_norm(self.run(feature_map, prefix))

    def _swin(self, x, prefix):
        t = self.teacher
        return t.norm(t.layers[-1](x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    def _convnext(self, x, prefix):
        return self.teacher.norm_pre(self.teacher.stages[-1](x))

    def _resnet(self, x, prefix):
        return self.teacher.layer4(x)

    def _cifar(self, x, prefix):
        # a models/cifar.py network is a list of tap steps (step i maps tap i-1 to tap i) and a final norm
        for step in self.teacher._steps()[self.first_step:]:
            x = step(x)
        return self.teacher._final_norm(x)

    def _vit(self, x, prefix):
        t = self.teacher
        tokens = to_tokens(x)
        if self.num_prefix_tokens:
            tokens = torch.cat([prefix.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = t.norm(t.blocks[self.first_block:](tokens))
        return to_map(tokens[:, self.num_prefix_tokens:], self.output_tap.grid)


# ---------------------------------------------------------------------------------------------- distiller
# view name, loss, suffix of the logged key (loss_s3 / loss_s3_alt, ...)
VIEWS = (('spatial', dfm_spatial_loss, ''), ('frequency', dfm_frequency_loss, '_alt'))


class ScaleKD(FinalMapDistiller):
    """Total = w_gt * CE + w_kd * kd_loss(T) + the weighted spatial and frequency terms of stages 3 and 4."""
    name = 'scalekd'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--scalekd-stages', type=int, nargs='+', default=[3, 4],
                            help='student stages that get projectors, from {3, 4} (default: 3 4)')
        parser.add_argument('--scalekd-spatial-weight', type=float, nargs='+', default=[0.08],
                            help='weight of the spatial view; one value or one per stage (default: 0.08)')
        parser.add_argument('--scalekd-freq-weight', type=float, nargs='+', default=[0.06],
                            help='weight of the frequency view; one value or one per stage (default: 0.06)')
        parser.add_argument('--scalekd-softmax-scale', type=float, nargs='+', default=[5.0, 5.0],
                            help='attention softmax scale of the spatial and frequency projectors; one value '
                                 'is used for both (default: 5 5)')
        parser.add_argument('--scalekd-heads', type=int, nargs='+', default=None,
                            help='attention heads per stage; one value or one per stage (default: the largest '
                                 'divisor of the projector width not above width/64)')
        add_temperature_arg(parser, 'scalekd')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size, temperature=args.scalekd_temperature)
        raw_stages = args.scalekd_stages
        stages = sorted({int(s) for s in (raw_stages if isinstance(raw_stages, (list, tuple)) else [raw_stages])})
        if not stages or not set(stages) <= {3, 4}:
            raise DistillerError(f'--scalekd-stages takes stages from {{3, 4}}, got {stages}')
        n = len(stages)
        spatial = broadcast_values(args.scalekd_spatial_weight, n, '--scalekd-spatial-weight')
        freq = broadcast_values(args.scalekd_freq_weight, n, '--scalekd-freq-weight')
        self.weights = {s: {'spatial': float(a), 'frequency': float(b)} for s, a, b in zip(stages, spatial, freq)}
        scales = dict(zip(('spatial', 'frequency'),
                          broadcast_values(args.scalekd_softmax_scale, 2, '--scalekd-softmax-scale')))
        heads = (dict(zip(stages, broadcast_values(args.scalekd_heads, n, '--scalekd-heads')))
                 if args.scalekd_heads is not None else {})
        # a projector exists only where its output is used: a zero-weight stage-4 view has none, and a
        # zero-weight stage-3 view is kept only to give its stage-4 projector queries (no dead parameters)
        views4 = [v for v, _, _ in VIEWS if 4 in stages and self.weights[4][v] > 0]
        views3 = [v for v, _, _ in VIEWS if 3 in stages and (self.weights[3][v] > 0 or v in views4)]
        if not views3 and not views4:
            raise DistillerError('every scalekd feature weight is zero; use --distiller kd for logit KD alone')

        try:
            student_desc = self.student_adapter.description
            teacher_desc = self.teacher_adapter.description
        except ValueError as e:
            raise DistillerError(f'scalekd needs the stage features of both models: {e}') from None
        if views3 and student_desc.num_stages < 2:
            raise DistillerError('scalekd stage 3 needs a student with at least two stages')
        self.teacher_grid = teacher_desc.final.grid
        norm_layer = LayerNorm2d if isinstance(student, ConvNeXt) else nn.BatchNorm2d

        def projector(tap_channels, tap_grid, out_channels, query_grid, stage, view, learned_query):
            h = heads.get(stage, default_num_heads(out_channels))
            if h < 1 or out_channels % h:
                raise DistillerError(f'--scalekd-heads {h} does not divide the stage-{stage} projector width '
                                     f'{out_channels}')
            return CrossAttentionProjector(tap_channels, out_channels, tap_grid, query_grid, h,
                                           softmax_scale=scales[view], learned_query=learned_query,
                                           norm_layer=norm_layer)

        student_request = FeatureRequest()
        teacher_request = FeatureRequest(final=True)
        self.stage3 = nn.ModuleDict()
        self.student_block3 = None
        if views3:
            self.teacher_last_stage = TeacherLastStage(teacher, self.teacher_adapter)
            if self.teacher_last_stage.needs_prefix_tokens:
                teacher_request = FeatureRequest(final=True, stages=(-2,), prefix_tokens=True)
            if student_desc.plain_tokens:
                self.student_block3 = 3 * student_desc.num_blocks // 4 - 1
                s3_channels = int(self.student_adapter.feature_info[self.student_block3]['num_chs'])
                s3_grid = student_desc.final.grid
                student_request = FeatureRequest(blocks=(self.student_block3,))
            else:
                s3_channels, s3_grid = student_desc.stage(-2).channels, student_desc.stage(-2).grid
                student_request = FeatureRequest(stages=(-2,))
            t3 = self.teacher_last_stage.input_tap
            for view in views3:
                self.stage3[view] = projector(s3_channels, s3_grid, t3.channels, t3.grid, 3, view, True)
        self.stage4 = nn.ModuleDict()
        if views4:
            student_request = student_request.merge(FeatureRequest(final=True))
            s4 = student_desc.final
            for view in views4:
                self.stage4[view] = projector(s4.channels, s4.grid, teacher_desc.final.channels,
                                              self.teacher_grid, 4, view, learned_query=not views3)
        self.stage3_grid = self.teacher_last_stage.input_tap.grid if views3 else None
        self.student_request = student_request
        self.teacher_request = teacher_request

    def no_weight_decay(self):
        return cap_no_weight_decay(self)

    def forward(self, images, labels, epoch=0):
        student, teacher, target, losses = self.final_map_forward(images, labels)
        if len(self.stage3):
            s3 = student.blocks[self.student_block3] if self.student_block3 is not None else student.stages[-2]
            prefix = teacher.prefix.get(-2)
        for view, loss_fn, suffix in VIEWS:
            query = None
            if view in self.stage3:
                projected = to_map(self.stage3[view](s3), self.stage3_grid)
                through_teacher = self.teacher_last_stage(projected, prefix)
                if self.weights[3][view]:
                    losses[f'loss_s3{suffix}'] = self.weights[3][view] * loss_fn(through_teacher, target)
                query = to_tokens(through_teacher)
            if view in self.stage4:
                out = to_map(self.stage4[view](student.final, query), self.teacher_grid)
                losses[f'loss_s4{suffix}'] = self.weights[4][view] * loss_fn(out, target)
        return student.logits, losses
