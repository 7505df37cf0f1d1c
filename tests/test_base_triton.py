"""The fused squared-error kernels (distillers/kernels/squared_error_triton.py) against the eager path of
`squared_error_sum`.

The eager path is checked by hand-worked values and gradcheck (test_feature_distillers.py), so here the kernels
must give its value and exactly its gradients: on a GPU when there is one, and without one under Triton's
interpreter, which runs the same kernels on CPU tensors (tests/conftest.py turns it on).
"""
import os
import subprocess
import sys

import pytest
import torch

from distillers import kernels
from distillers.kernels.squared_error import squared_error_sum
from tests.helpers import REPO

triton = pytest.importorskip('triton')

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture
def route(monkeypatch):
    """Sends squared_error_sum through the kernels (True) or the eager path (False) for any device."""
    def to(fused, device='cpu'):
        if fused and device == 'cpu' and not triton.knobs.runtime.interpret:
            pytest.skip('CPU tensors need Triton\'s interpreter (tests/conftest.py sets it when there is no GPU)')
        if fused:
            from distillers.kernels import squared_error_triton
            monkeypatch.setattr(kernels, 'squared_error_kernels', lambda s, t: squared_error_triton)
        else:
            monkeypatch.setattr(kernels, 'squared_error_kernels', lambda s, t: None)
    return to


def value_and_gradients(student, teacher, weight=0.37):
    student = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(True)
    value = squared_error_sum(student, teacher)
    (weight * value).backward()
    return value.detach(), student.grad, teacher.grad


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('student_dtype, teacher_dtype', [(torch.float32, torch.float32),
                                                          (torch.bfloat16, torch.float32),
                                                          (torch.float16, torch.float16)])
@pytest.mark.parametrize('shape, channels_last', [((3, 5, 7, 11), False),  # less than one block
                                                  ((2, 24, 29, 31), True),  # several blocks, the last one part-full
                                                  ((4, 50, 64), False)])  # tokens (B, N, C)
def test_kernels_give_the_eager_value_and_exactly_its_gradients(device, student_dtype, teacher_dtype, shape,
                                                                channels_last, route):
    g = torch.Generator().manual_seed(sum(shape))
    student = torch.randn(shape, generator=g).to(device, student_dtype)
    teacher = (0.8 * student.float() + 0.5 * torch.randn(shape, generator=g).to(device)).to(teacher_dtype)
    if channels_last:
        student = student.contiguous(memory_format=torch.channels_last)
        teacher = teacher.contiguous(memory_format=torch.channels_last)
    route(False)
    expected = value_and_gradients(student, teacher)
    route(True, device)
    got = value_and_gradients(student, teacher)
    assert got[0].dtype == torch.float32
    assert got[0].item() == pytest.approx(expected[0].item(), rel=1e-6)  # only the order of additions differs
    for grad, want, source in zip(got[1:], expected[1:], (student, teacher)):
        assert grad.dtype == source.dtype and grad.stride() == source.stride()
        if device == 'cpu' and source.dtype == torch.bfloat16:
            # the interpreter truncates float32 to bfloat16 where a GPU rounds to nearest even: one unit apart
            torch.testing.assert_close(grad, want, rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(grad, want)  # 2 g (s - t): the same float32 products, rounded once


def test_kernels_value_by_hand(route):
    route(True)
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[0.5, 2.0], [1.0, 5.0]])
    value, grad_student, grad_teacher = value_and_gradients(student, teacher, weight=1.0)
    assert value.item() == 0.25 + 0 + 4 + 1
    assert grad_student.tolist() == [[1.0, 0.0], [4.0, -2.0]] and grad_teacher.tolist() == [[-1.0, 0.0], [-4.0, 2.0]]


def test_kernels_serve_only_maps_they_can_walk_as_one_flat_array():
    x = torch.randn(2, 3, 4, 5)
    assert kernels.same_dense_layout(x, torch.randn(2, 3, 4, 5))
    assert kernels.same_dense_layout(x.contiguous(memory_format=torch.channels_last),
                                     torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    assert kernels.same_dense_layout(x[:1], x[1:])  # an offset start is fine: the kernels take data pointers
    assert kernels.same_dense_layout(torch.randn(2, 1, 5), torch.randn(2, 5, 1).transpose(1, 2))  # size-1 axes
    # two dense layouts that differ, a map with gaps, a broadcast map: the eager path
    assert not kernels.same_dense_layout(x, x.contiguous(memory_format=torch.channels_last))
    assert not kernels.same_dense_layout(x[:, :2], torch.randn(2, 2, 4, 5))
    assert not kernels.same_dense_layout(torch.randn(1, 3, 4, 5).expand(2, 3, 4, 5), x)
    # the kernels only ever see CUDA tensors
    assert kernels.squared_error_kernels(x, x) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_squared_error_sum_takes_the_kernels_on_a_gpu(monkeypatch):
    from distillers.kernels import squared_error_triton
    student = torch.randn(2, 8, 6, 6, device='cuda', dtype=torch.bfloat16)
    assert kernels.squared_error_kernels(student, student.float()) is squared_error_triton
    assert kernels.squared_error_kernels(student, student.float()[:, :, :, :6].transpose(2, 3)) is None
    # autograd cannot save inference tensors, which the kernels' backward reads: the eager path takes them
    with torch.inference_mode():
        frozen = student.float()
    assert kernels.squared_error_kernels(student, frozen) is None
    student = student.detach().requires_grad_(True)
    squared_error_sum(student, frozen).backward()
    assert student.grad is not None
    monkeypatch.setattr(kernels, 'FUSED_KERNELS', False)  # the one switch turns these kernels off as well
    assert kernels.squared_error_kernels(student, student.float()) is None


COMPILE_FOR_SM90 = '''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from distillers.kernels import frequency_triton, squared_error_triton

def compile(fn, types, constexprs, num_warps):
    signature = {name: 'constexpr' if name in constexprs else types.get(name, 'i32') for name in fn.arg_names}
    triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget('cuda', 90, 32),
                   options=dict(num_warps=num_warps))

bf16_and_f32 = dict(s_ptr='*bf16', t_ptr='*fp32', partial_ptr='*fp32', grad_ptr='*fp32', grad_s_ptr='*bf16',
                    grad_t_ptr='*bf16')
compile(squared_error_triton._partial_sums_kernel, bf16_and_f32, dict(BLOCK=squared_error_triton.BLOCK), 8)
compile(squared_error_triton._gradient_kernel, bf16_and_f32,
        dict(WRITE_S=True, WRITE_T=False, BLOCK=squared_error_triton.BLOCK), 8)
frequency_types = {name: ('*bf16' if name in ('sp_ptr', 'ch_ptr', 'gsp_ptr', 'gch_ptr') else '*fp32')
                   for fn in (frequency_triton._forward_kernel, frequency_triton._gradient_kernel)
                   for name in fn.arg_names if name.endswith('_ptr')}
frequency_types.update(tolerance_sq='fp32', floor='fp32')
caps = dict(SP_BLOCK_M=32, SP_BLOCK_K=128, CH_BLOCK_M=128, CH_BLOCK_K=32)
compile(frequency_triton._forward_kernel, frequency_types, dict(WITH_GRADIENTS=True, **caps), 8)
compile(frequency_triton._gradient_kernel, frequency_types,
        dict(SP_BLOCK_M=64, SP_BLOCK_K=64, CH_BLOCK_M=64, CH_BLOCK_K=64), 4)
print('compiled')
'''


def test_kernels_compile_for_a_gpu():
    """The interpreter runs the kernels' Python, not Triton's compiler: this compiles them to sm_90 machine code
    (an H100's), which needs no GPU, so that a kernel only a GPU could reject fails here first. In a fresh
    process, since tests/conftest.py's interpreter setting holds for this one."""
    pytest.importorskip('triton.backends.nvidia')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['PYTHONPATH'] = str(REPO)
    proc = subprocess.run([sys.executable, '-c', COMPILE_FOR_SM90], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and 'compiled' in proc.stdout, proc.stderr[-2000:]
