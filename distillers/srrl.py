"""SRRL: Yang, Martinez, Bulat, Tzimiropoulos, "Knowledge Distillation via Softmax Regression Representation
Learning" (ICLR 2021), as cls_KD implements it. Spec: docs/methods/feature.md §2."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.features import FeatureRequest, to_tokens

from .base import Distiller, DistillerError, float32_loss


def srrl_loss(student_pooled: torch.Tensor, teacher_pooled: torch.Tensor,
              student_through_teacher_logits: torch.Tensor, teacher_logits: torch.Tensor,
              alpha: float, beta: float) -> torch.Tensor:
    """alpha * L_FM + beta * L_SR.

    L_FM: squared error of the pooled (B, C_t) features, mean over channels then over the batch.
    L_SR: squared error of the student-through-teacher-head logits against the teacher's, mean over all B*K."""
    with float32_loss(student_pooled.device.type):
        feature_matching = F.mse_loss(student_pooled.float(), teacher_pooled.float())
        softmax_regression = F.mse_loss(student_through_teacher_logits.float(), teacher_logits.float())
        return alpha * feature_matching + beta * softmax_regression


class Connector(nn.Sequential):
    """Conv1x1 (no bias) -> BN -> ReLU from the student's to the teacher's last-stage width."""

    def __init__(self, in_channels: int, out_channels: int):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        # He init with the fan of the output side: std = sqrt(2 / (k * k * C_t)), k = 1
        nn.init.normal_(conv.weight, mean=0.0, std=(2.0 / out_channels) ** 0.5)
        bn = nn.BatchNorm2d(out_channels)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        super().__init__(conv, bn, nn.ReLU(inplace=True))


class SRRL(Distiller):
    """Total = CE + alpha * L_FM + beta * L_SR, with the connected student map fed through the frozen teacher head."""
    name = 'srrl'

    @classmethod
    def add_args(cls, parser):
        parser.add_argument('--srrl-alpha', type=float, default=1.0, metavar='A',
                            help='weight of the pooled feature-matching term (default: 1)')
        parser.add_argument('--srrl-beta', type=float, default=5.0, metavar='B',
                            help='weight of the softmax-regression term (default: 5, the cls_KD code default; '
                                 'the ImageNet configs use 1)')

    def __init__(self, student, teacher, criterion, args, input_size):
        super().__init__(student, teacher, criterion, args, input_size)
        self.alpha = float(args.srrl_alpha)
        self.beta = float(args.srrl_beta)
        # the map that enters the classifier head (for a CNN, forward_features = its last stage)
        self.request = FeatureRequest(final=True)
        self.check_features(self.request)
        self.head_layout = self._teacher_head_layout()
        student_map = self.student_adapter.description.final
        teacher_map = self.teacher_adapter.description.final
        self.connector = Connector(student_map.channels, teacher_map.channels)
        self._check_teacher_head()

    # ---------------------------------------------------------------- teacher head
    def _teacher_head_layout(self) -> str:
        """How the teacher's forward_head expects its input: NCHW maps, NHWC maps or NLC tokens."""
        desc = self.teacher_adapter.description
        if desc.layout == 'map':
            return 'NCHW'
        if desc.num_prefix_tokens:
            raise DistillerError(
                f'srrl feeds student features through the teacher\'s classifier head, but the teacher '
                f'{type(self.teacher).__name__} classifies from its {desc.num_prefix_tokens} prefix (class) token(s), '
                f'which a student map cannot provide; use a teacher that pools its last map (CNN, Swin, Mixer)')
        return 'NLC' if desc.plain_tokens else 'NHWC'

    def teacher_head_input(self, feature_map: torch.Tensor) -> torch.Tensor:
        """A (B, C_t, H, W) map in the layout the teacher's own forward_features hands to its head."""
        if self.head_layout == 'NHWC':
            return feature_map.permute(0, 2, 3, 1)
        if self.head_layout == 'NLC':
            return to_tokens(feature_map)
        return feature_map

    @torch.no_grad()
    def _check_teacher_head(self):
        """The teacher's own final map, fed back through its head in our layout, must give its own logits."""
        teacher = self.teacher
        was_training = teacher.training
        teacher.eval()
        try:
            param = next(teacher.parameters())
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(2, *self.input_size, generator=gen).to(device=param.device, dtype=param.dtype)
            out = self.teacher_adapter(x, self.request)
            logits = teacher.forward_head(self.teacher_head_input(out.final))
        except RuntimeError as e:  # a head that rejects the layout
            raise DistillerError(
                f'srrl cannot feed maps to the head of teacher {type(teacher).__name__}: {e}') from None
        finally:
            teacher.train(was_training)
        if logits.shape != out.logits.shape or not torch.allclose(logits, out.logits, rtol=1e-4, atol=1e-4):
            raise DistillerError(
                f'srrl cannot feed maps to the head of teacher {type(teacher).__name__}: its final map in '
                f'{self.head_layout} layout does not reproduce its logits')

    # ---------------------------------------------------------------- forward
    def forward(self, images, labels, epoch=0):
        teacher = self.teacher_forward(images, self.request)
        student = self.student_forward(images, self.request)
        connected = self.connector(student.final)
        # autograd stays on: the frozen head passes gradient to the connector and the student
        through_teacher = self.teacher.forward_head(self.teacher_head_input(connected))
        losses = {
            'loss_gt': self.gt_loss(student.logits, labels),
            'loss_srrl': srrl_loss(connected.mean(dim=(2, 3)), teacher.final.mean(dim=(2, 3)), through_teacher,
                                   teacher.logits, self.alpha, self.beta),
        }
        return student.logits, losses
