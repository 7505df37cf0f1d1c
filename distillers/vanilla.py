"""Vanilla: the student trained alone on the task loss. No teacher is built."""
from .base import Distiller


class Vanilla(Distiller):
    name = 'vanilla'
    needs_teacher = False

    def forward(self, images, labels, epoch=0):
        student_logits = self.student(images)
        return student_logits, {'loss_gt': self.gt_loss(student_logits, labels)}
