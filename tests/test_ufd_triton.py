"""The fused frequency kernels (distillers/kernels/frequency_triton.py) against the eager path of
distillers/frequency.py, which computes UFD's terms and ScaleKD's frequency view.

The eager path is the one checked against the DCT oracle, gradcheck and the spec's properties (test_ufd.py), so
here the kernels must give its values and gradients: on a GPU when there is one, and without one under Triton's
interpreter, which runs the same kernels on CPU tensors (tests/conftest.py turns it on).
"""
import pytest
import torch

from distillers import frequency, kernels

triton = pytest.importorskip('triton')

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture
def use_kernels(monkeypatch):
    """Routes the decoupled losses through the kernels for `device` tensors; returns the kernel module."""
    def route(device):
        if device == 'cpu' and not triton.knobs.runtime.interpret:
            pytest.skip('CPU tensors need Triton\'s interpreter (tests/conftest.py sets it when there is no GPU)')
        from distillers.kernels import frequency_triton
        monkeypatch.setattr(kernels, 'frequency_kernels', lambda *maps: frequency_triton)
        return frequency_triton
    return route


def eager(fn, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(kernels, 'frequency_kernels', lambda *maps: None)
        return fn()


def losses_and_gradients(spatial, channel, teacher, weights=(0.7, 1.3, 0.2, 0.05)):
    """decoupled_losses' terms and the gradients of their weighted sum for the two student maps."""
    spatial = spatial.detach().clone().requires_grad_(True)
    channel = channel.detach().clone().requires_grad_(True) if channel is not None else None
    terms = frequency.decoupled_losses(spatial, channel, teacher)
    sum(w * term for w, term in zip(weights, terms)).backward()
    return torch.stack(terms).detach(), spatial.grad, channel.grad if channel is not None else None


def assert_gradients_close(got, expected, rtol=1e-5):
    # a 1-long vector's gradient is exactly 0 and both paths leave rounding noise of about 1e-6 there
    torch.testing.assert_close(got.float(), expected.float(), rtol=0,
                               atol=rtol * max(expected.abs().max().item(), 1.0))


# shapes: blocks of rows and of columns that end part-way (M and K past one block, not powers of 2), one sample,
# a 1x1 grid (every spatial AC vector and every channel DC vector of length 1)
SHAPES = [(3, 150, 5, 7), (1, 33, 3, 3), (2, 24, 1, 1)]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('layout', ['nchw', 'channels_last', 'tokens'])
@pytest.mark.parametrize('branches', ['both', 'spatial'])
def test_kernels_give_the_eager_values_and_gradients(device, shape, layout, branches, use_kernels, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape))
    spatial, channel, teacher = (torch.randn(*shape, generator=g).to(device) for _ in range(3))
    if layout == 'channels_last':
        spatial, channel, teacher = (x.contiguous(memory_format=torch.channels_last) for x in (spatial, channel, teacher))
    elif layout == 'tokens':  # what a projector's (B, H*W, C) tokens are, viewed as a map (the teacher stays NCHW)
        b, c, h, w = shape
        spatial, channel = (x.flatten(2).transpose(1, 2).contiguous().transpose(1, 2).reshape(b, c, h, w)
                            for x in (spatial, channel))
    if branches == 'spatial':
        channel = None
    values, grad_sp, grad_ch = eager(lambda: losses_and_gradients(spatial, channel, teacher), monkeypatch)
    use_kernels(device)
    got = losses_and_gradients(spatial, channel, teacher)
    torch.testing.assert_close(got[0], values, rtol=2e-6, atol=1e-6)
    assert_gradients_close(got[1], grad_sp)
    if channel is not None:
        assert_gradients_close(got[2], grad_ch)
    assert got[1].stride() == spatial.stride()


@pytest.mark.parametrize('device', DEVICES)
def test_kernels_without_gradients_and_with_one_map_the_same_for_both(device, use_kernels, monkeypatch):
    g = torch.Generator().manual_seed(7)
    student, teacher = (torch.randn(2, 40, 3, 4, generator=g).to(device) for _ in range(2))
    expected = eager(lambda: frequency.decoupled_losses(student, student, teacher), monkeypatch)
    use_kernels(device)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(frequency.decoupled_losses(student, student, teacher)),
                                   torch.stack(expected))
    # one map feeding both branches (the benchmark's case) gets the sum of the two gradients
    s = student.clone().requires_grad_(True)
    sum(frequency.decoupled_losses(s, s, teacher)).backward()
    s_eager = student.clone().requires_grad_(True)
    eager(lambda: sum(frequency.decoupled_losses(s_eager, s_eager, teacher)).backward(), monkeypatch)
    assert_gradients_close(s.grad, s_eager.grad)


@pytest.mark.parametrize('device', DEVICES)
def test_a_teacher_that_needs_a_gradient_takes_the_eager_path(device, use_kernels, monkeypatch):
    fused = use_kernels(device)
    calls = []
    monkeypatch.setattr(fused, 'decoupled_terms', lambda *a, **k: calls.append(1))
    s, t = (torch.randn(2, 8, 3, 3, device=device, requires_grad=True) for _ in range(2))
    sum(frequency.decoupled_losses(s, s, t)).backward()
    assert not calls and t.grad.abs().sum() > 0


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('branch', ['spatial', 'channel'])
def test_kernels_keep_the_rounding_guard(device, branch, use_kernels):
    """The case of test_ufd.py's rounding test: an AC part zero up to rounding scores 1 per vector, no gradient."""
    g = torch.Generator().manual_seed(5)
    b, c, h, w = 3, 16, 3, 5
    teacher = torch.randn(b, c, h, w, generator=g).to(device)
    if branch == 'spatial':
        exact = (torch.randn(b, c, 1, 1, generator=g) * 5).expand(b, c, h, w)
        ac_index, vectors = 1, h * w
    else:
        exact = (torch.randn(b, 1, h, w, generator=g) * 5).expand(b, c, h, w)
        ac_index, vectors = 3, c
    use_kernels(device)
    student = (exact * (1 + 1e-7 * torch.randn(b, c, h, w, generator=g))).to(device).requires_grad_(True)
    ac = frequency.decoupled_losses(student, student, teacher)[ac_index]
    assert ac.item() == pytest.approx(vectors, rel=1e-6)
    ac.backward()
    assert torch.count_nonzero(student.grad) == 0


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
@pytest.mark.filterwarnings('ignore::RuntimeWarning')  # the interpreter's numpy reports the inf arithmetic
def test_a_non_finite_map_gives_non_finite_terms(device, bad, use_kernels, monkeypatch):
    """As on the eager path: the training loop's check reads the loss, so a NaN must not vanish in a clamp."""
    g = torch.Generator().manual_seed(13)
    student, teacher = (torch.randn(2, 24, 3, 3, generator=g).to(device) for _ in range(2))
    student[1, 5, 2, 0] = bad
    expected = eager(lambda: frequency.decoupled_losses(student, student, teacher), monkeypatch)
    use_kernels(device)
    got = frequency.decoupled_losses(student, student, teacher)
    assert [bool(torch.isfinite(x)) for x in got] == [bool(torch.isfinite(x)) for x in expected] == [False] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason='bfloat16 maps: compiled kernels only')
def test_bfloat16_maps_on_the_gpu(use_kernels, monkeypatch):
    """Under autocast the projectors' maps are bfloat16: the kernels read them as they are, compute in float32
    and return a bfloat16 gradient, as the eager path's cast does."""
    g = torch.Generator().manual_seed(11)
    spatial, channel = (torch.randn(8, 96, 7, 7, generator=g).cuda().bfloat16() for _ in range(2))
    teacher = torch.randn(8, 96, 7, 7, generator=g).cuda()
    values, grad_sp, grad_ch = eager(lambda: losses_and_gradients(spatial, channel, teacher), monkeypatch)
    use_kernels('cuda')
    got = losses_and_gradients(spatial, channel, teacher)
    torch.testing.assert_close(got[0], values, rtol=1e-5, atol=1e-6)
    assert got[1].dtype == torch.bfloat16
    assert_gradients_close(got[1], grad_sp, rtol=1e-2)
    assert_gradients_close(got[2], grad_ch, rtol=1e-2)


def test_kernels_are_used_only_where_they_can_run(monkeypatch):
    cpu = torch.zeros(2, 3, 4, 5)
    assert kernels.frequency_kernels(cpu, cpu) is None
    if torch.cuda.is_available():
        gpu = cpu.cuda()
        assert kernels.frequency_kernels(gpu, gpu) is not None
        assert kernels.frequency_kernels(gpu, gpu.double()) is None
        assert kernels.frequency_kernels(gpu, gpu[:, :, :, :3]) is None  # H and W do not form one axis
        monkeypatch.setattr(kernels, 'FUSED_KERNELS', False)
        assert kernels.frequency_kernels(gpu, gpu) is None
