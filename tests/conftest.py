"""Test session setup.

Without a GPU, Triton's interpreter runs the fused UFD kernels (distillers/ufd_triton.py) on CPU tensors, so
tests/test_ufd_triton.py checks them on every machine. The interpreter is chosen when Triton's own functions are
defined, that is when triton is first imported (timm imports it), so it is set here, before any test module loads.
With a GPU the kernels compile and run for real, and the CPU cases are skipped.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
