"""The small-M CPU GEMM (vicuna_bench/csrc/small_m_linear.cpp) against torch.matmul.

The library is built by ``make kernels`` (the unit tier may not start a
compiler); a missing build fails here rather than skipping.  The other ISA
paths (AVX2, AVX-512 without BF16) are built and checked in
tests/integration/test_small_m_gemm.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vicuna_bench import cpu_kernels

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not cpu_kernels.load(build_if_missing=False):
        pytest.fail(f"the small-M GEMM is not loaded ({cpu_kernels.status()['small_m_gemm_why_not']}); "
                    "run `make kernels` first")


def op(x, w):
    return torch.ops.vicuna_bench.small_m_linear(x, w)


def reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.matmul in float64 of the same (already rounded) inputs, and |x| @ |w|.T for the rounding bound."""
    xd, wd = x.double(), w.double()
    return torch.matmul(xd, wd.T), torch.matmul(xd.abs(), wd.abs().T)


def check_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref, magnitude = reference(x, w)
    got = got.double()
    # fp32 accumulation of K terms in another order: a few fp32 ulps of the sum of |terms|. bf16 output: plus the
    # final rounding to 8 significant bits (half an ulp, 2**-9 relative).
    bound = 1e-5 * magnitude + 1e-30
    if x.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * ref.abs()
    excess = (got - ref).abs() - bound
    assert excess.max().item() <= 0, f"worst excess {excess.max().item():.3e} at {divmod(excess.argmax().item(), ref.shape[-1])}"


@settings(max_examples=120, deadline=None)
@given(m=st.integers(1, 16), k=st.integers(1, 300), n=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_small_m_matches_matmul(m, k, n, dtype, seed):
    """Every M = 1..16, any K (whole vectors and tails) and N (whole panels and the rest), fp32 and bf16."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    got = op(x, w)
    assert got.shape == (m, n) and got.dtype == dtype
    check_close(got, x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 16])
def test_model_shaped_products(m, dtype):
    """SmolLM2's projection shapes (fused qkv 960x576, gate/up 3072x576, down 576x1536) and a head slice: several
    threads' panels, prefetching across panel boundaries."""
    gen = torch.Generator().manual_seed(m)
    for n, k in [(960, 576), (3072, 576), (576, 1536), (4099, 576)]:
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
        check_close(op(x, w), x, w)


def test_leading_dimensions_and_strided_input():
    """[B, T, K] in, [B, T, N] out; a non-contiguous x is read correctly."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 64, generator=gen)
    x = torch.randn(2, 3, 64, generator=gen)
    got = op(x, w)
    assert got.shape == (2, 3, 40)
    check_close(got.reshape(6, 40), x.reshape(6, 64), w)
    strided = torch.randn(64, 5, generator=gen).T  # [5, 64], column-major
    assert not strided.is_contiguous()
    check_close(op(strided, w), strided.contiguous(), w)


def test_more_rows_than_the_kernel_takes_is_f_linear():
    """Above 16 rows (a prefill) the op hands the product to at::linear: bit-identical to F.linear."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 96, generator=gen)
    x = torch.randn(cpu_kernels.MAX_ROWS + 1, 96, generator=gen)
    assert torch.equal(op(x, w), F.linear(x, w))


def test_mismatched_dtypes_are_refused():
    with pytest.raises(RuntimeError, match="x is Float, weight BFloat16"):
        op(torch.randn(2, 8), torch.randn(4, 8).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="x has 7 features, weight 8"):
        op(torch.randn(2, 7), torch.randn(4, 8))


def test_linear_dispatches_by_device_and_dtype(monkeypatch):
    """cpu_kernels.linear: the op for CPU fp32/bf16 once loaded; F.linear for fp64 or when the kernel is off."""
    calls = []
    real = torch.ops.vicuna_bench.small_m_linear

    class Spy:
        def __call__(self, x, w):
            calls.append(x.dtype)
            return real(x, w)

    monkeypatch.setattr(torch.ops.vicuna_bench, "small_m_linear", Spy())
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        cpu_kernels.linear(torch.ones(1, 8, dtype=dtype), torch.ones(4, 8, dtype=dtype))
    assert calls == [torch.float32, torch.bfloat16]
    monkeypatch.setitem(cpu_kernels._state, "loaded", False)
    cpu_kernels.linear(torch.ones(1, 8), torch.ones(4, 8))
    assert calls == [torch.float32, torch.bfloat16]
