"""UFD: Unified Frequency Decoupling Knowledge Distillation for Computer Vision (UFD-KD). Spec:
docs/methods/ufd.md.

The student's last-stage map goes through two cross-attention projectors (distillers/cap.py) into the layout of
the teacher's normalized last-stage map (distillers/final_map.py). One feeds a spatial DC/AC pair of terms, the
other a channel DC/AC pair: `spatial_decoupled_loss` and `channel_decoupled_loss`, the frequency-decoupled losses
of distillers/frequency.py, which `decoupled_losses` computes together (on a GPU in two fused kernels).
"""
from models.features import to_map
from .base import DistillerError, broadcast_values
from .cap import CrossAttentionProjector, cap_no_weight_decay, default_num_heads
from .final_map import FinalMapDistiller, add_temperature_arg
# UFD's loss math: the four terms are the two branches of the frequency-decoupled loss
from .frequency import channel_decoupled_loss, decoupled_losses, spatial_decoupled_loss

__all__ = ['UFD', 'channel_decoupled_loss', 'decoupled_losses', 'spatial_decoupled_loss']


class UFD(FinalMapDistiller):
    """Total = (1 - kd weight) * CE + kd weight * kd_loss(T) + the four weighted UFD terms
    (docs/methods/ufd.md §5)."""
    name = 'ufd'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--ufd-alpha', type=float, nargs=4, default=[0.03, 0.065, 0.003, 0.0065],
                            metavar=('DC_SP', 'AC_SP', 'DC_CH', 'AC_CH'),
                            help='weights of the spatial DC, spatial AC, channel DC and channel AC terms '
                                 '(default: 0.03 0.065 0.003 0.0065)')
        parser.add_argument('--ufd-softmax-scale', type=float, nargs='+', default=[5.0, 5.0],
                            help='attention softmax scale of the spatial and channel projectors; one value '
                                 'is used for both (default: 5 5)')
        parser.add_argument('--ufd-heads', type=int, default=None,
                            help='attention heads of both projectors; must divide the teacher width '
                                 '(default: the largest divisor of C_t not above C_t/64)')
        parser.add_argument('--ufd-upsample', default='auto', choices=('auto', 'on', 'off'),
                            help='x2 bilinear upsample of the student map in the projectors; auto: on when '
                                 'the student grid is half the teacher grid (default: auto)')
        add_temperature_arg(parser, 'ufd')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size, temperature=args.ufd_temperature)
        self.weights = [float(a) for a in args.ufd_alpha]
        if len(self.weights) != 4:
            raise DistillerError(f'--ufd-alpha takes 4 weights (dc, ac, dc channel, ac channel), '
                                 f'got {len(self.weights)}')
        scales = broadcast_values(args.ufd_softmax_scale, 2, '--ufd-softmax-scale')
        try:
            student_tap = self.student_adapter.description.final
            teacher_tap = self.teacher_adapter.description.final
        except ValueError as e:
            raise DistillerError(f'ufd needs the final feature map of both models: {e}') from None
        self.teacher_grid = teacher_tap.grid

        heads = args.ufd_heads if args.ufd_heads is not None else default_num_heads(teacher_tap.channels)
        if heads < 1 or teacher_tap.channels % heads:
            raise DistillerError(f'--ufd-heads {heads} does not divide the teacher width {teacher_tap.channels}')
        mode = args.ufd_upsample
        hs, ws = student_tap.grid
        upsample = mode == 'on' or (mode == 'auto' and (2 * hs, 2 * ws) == tuple(teacher_tap.grid))

        def projector(scale):
            return CrossAttentionProjector(
                student_tap.channels, teacher_tap.channels, student_tap.grid, teacher_tap.grid, heads,
                softmax_scale=scale, upsample=upsample)
        self.proj_spatial = projector(scales[0])
        self.proj_channel = projector(scales[1])

    def no_weight_decay(self):
        return cap_no_weight_decay(self)

    def forward(self, images, labels, epoch=0):
        student, _, target, losses = self.final_map_forward(images, labels)
        spatial = to_map(self.proj_spatial(student.final), self.teacher_grid)
        channel = to_map(self.proj_channel(student.final), self.teacher_grid)
        dc_sp, ac_sp, dc_ch, ac_ch = decoupled_losses(spatial, channel, target)
        w_dc_sp, w_ac_sp, w_dc_ch, w_ac_ch = self.weights
        losses.update({
            'loss_ufd_dc_spatial': w_dc_sp * dc_sp,
            'loss_ufd_ac_spatial': w_ac_sp * ac_sp,
            'loss_ufd_dc_channel': w_dc_ch * dc_ch,
            'loss_ufd_ac_channel': w_ac_ch * ac_ch,
        })
        return student.logits, losses
