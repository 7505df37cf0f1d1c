"""Fused GPU kernels (Triton) for two loss primitives, and the dispatch that decides when they run.

- `squared_error.py`: `squared_error_sum`, sum((s - t)^2) in float32 with a hand-written backward; on a GPU its
  two passes run as the kernels of `squared_error_triton.py`.
- `frequency_triton.py`: both branches of the frequency-decoupled terms of distillers/frequency.py (UFD's four,
  ScaleKD's frequency view) in one launch forward and one backward.

A Triton module imports Triton at its top, so it is imported here only when a CUDA map arrives: a CPU-only
install never needs Triton. Everything the kernels cannot take (CPU tensors, float64, inference tensors, a layout
they cannot walk, torch.compile's tracing) runs the eager form, which gives the same values up to the order of
float32 additions. Under TRITON_INTERPRET=1 the kernels run on CPU tensors, which is how the tests check them
without a GPU (tests/conftest.py).
"""
import contextlib

import torch

# The one switch for every fused kernel: False sends every call down the eager path (to compare the two).
FUSED_KERNELS = True


def kernel_ready(*maps: torch.Tensor) -> bool:
    """Whether a fused kernel may take these maps: CUDA tensors on one device, of float32, bfloat16 or float16, and
    not inference tensors (the kernels' backward reads the maps, and autograd cannot save those), outside
    torch.compile's tracing (which fuses the eager form itself). Each dispatcher adds its own layout condition."""
    if not FUSED_KERNELS or torch.compiler.is_compiling() or not all(
            m.is_cuda and m.dtype in (torch.float32, torch.bfloat16, torch.float16) and not m.is_inference()
            for m in maps):
        return False
    return len({m.device for m in maps}) == 1  # two devices: the eager path raises PyTorch's own error


def same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when both tensors' elements fill numel() consecutive memory slots in the same order (contiguous,
    channels_last, any permutation, as long as it is the same one): the element at one offset from one's start is
    the element at that offset from the other's, so a kernel can walk both as flat arrays."""
    sized = [(size, sa, sb) for size, sa, sb in zip(a.shape, a.stride(), b.stride()) if size > 1]
    expected = 1
    for size, stride_a, stride_b in sorted(sized, key=lambda d: d[1]):
        if stride_a != expected or stride_b != expected:
            return False
        expected *= size
    return True


def on_device(device: torch.device):
    """Triton launches on the current CUDA device, in its current stream: for tensors elsewhere (cuda:1 while
    cuda:0 is current) that would be the wrong GPU. This makes their device current for the launch; CPU tensors,
    under the interpreter, need nothing."""
    return torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()


def squared_error_kernels(student: torch.Tensor, teacher: torch.Tensor):
    """squared_error_triton.py where its kernels can run on these maps (`kernel_ready`, non-empty, in one dense
    layout) and Triton imports; None otherwise (the eager path, which saves only the maps' difference)."""
    if student.numel() == 0 or not kernel_ready(student, teacher) or not same_dense_layout(student, teacher):
        return None
    try:
        from . import squared_error_triton
    except ImportError:  # a CUDA build of torch without Triton (Windows, some source builds)
        return None
    return squared_error_triton


def frequency_kernels(*maps: torch.Tensor):
    """frequency_triton.py where its kernels can run on these (B, C, H, W) maps (`kernel_ready`, and the H*W
    positions of each form one strided axis) and Triton imports; None otherwise."""
    if not kernel_ready(*maps):
        return None
    try:
        from . import frequency_triton
    except ImportError:  # a CUDA build of torch without Triton (Windows, some source builds)
        return None
    return frequency_triton if all(frequency_triton.map_strides(m) is not None for m in maps) else None
