"""Test session setup.

Without a GPU, Triton's interpreter runs the fused kernels (distillers/kernels/) on CPU tensors, so
tests/test_ufd_triton.py and tests/test_base_triton.py check them on every machine. The interpreter is chosen when
Triton's own functions are defined, that is when triton is first imported (timm imports it), so it is set here,
before any test module loads.
With a GPU the kernels compile and run for real, and the CPU cases are skipped.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')


@pytest.fixture(scope='session')
def untrained_teacher_checkpoint(tmp_path_factory):
    """A test_resnet of 10 classes at its seed-0 initialization, saved as a state dict: the teacher of end-to-end
    runs that check a method trains (finite losses, state saved), not what it learns."""
    import timm  # here, not at the top: the interpreter setting above must come first
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('teacher') / 'test_resnet.pth'
    torch.save(timm.create_model('test_resnet', num_classes=10).state_dict(), path)
    return path
