"""Our CPU kernels (vicuna_bench/csrc/cpu_kernels.cpp): the small-M GEMM against torch.matmul, decode attention
against SDPA.

The library is built by ``make kernels`` (the unit tier may not start a
compiler); a missing build fails here rather than skipping.  The other ISA
paths (AVX2, AVX-512 without BF16, and the generic lanes that aarch64 runs)
are built and checked in tests/integration/test_cpu_kernels.py.

bf16 outputs are checked against the float64 reference correctly rounded to
bf16 (to nearest, ties to even), so a truncating conversion fails here.
"""
from __future__ import annotations

import contextlib

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
        if cpu_kernels.build_failure():  # recorded by `make kernels` for this host's key: F.linear runs, said why
            pytest.skip(f"the CPU kernels did not build on this host: {cpu_kernels.build_failure()}")
        pytest.fail(f"the small-M GEMM is not loaded ({cpu_kernels.status()['small_m_gemm_why_not']}); "
                    "run `make kernels` first")


def op(x, w):
    return torch.ops.vicuna_bench.small_m_linear(x, w)


def reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.matmul in float64 of the same (already rounded) inputs, and |x| @ |w|.T for the rounding bound."""
    xd, wd = x.double(), w.double()
    return torch.matmul(xd, wd.T), torch.matmul(xd.abs(), wd.abs().T)


def nearest_bf16(ref: torch.Tensor) -> torch.Tensor:
    """float64 values rounded to bf16's 8 significant bits, to nearest with ties to even, exactly in float64 (not
    through torch's conversions; normal range)."""
    mantissa, exponent = torch.frexp(ref)  # ref = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return torch.ldexp(torch.round(mantissa * 256), exponent - 8)  # * 256 is exact; torch.round: ties to even


def check_correctly_rounded(got: torch.Tensor, ref: torch.Tensor, err) -> None:
    """bf16 ``got`` is float64 ``ref`` rounded to nearest bf16, up to the kernel's fp32 error ``err`` before the
    rounding: rounding is monotonic, so it lies between the roundings of ref - err and ref + err."""
    assert got.dtype == torch.bfloat16
    got = got.double()
    wrong = (got < nearest_bf16(ref - err)) | (got > nearest_bf16(ref + err))
    assert not wrong.any(), (f"{int(wrong.sum())} of {wrong.numel()} not correctly rounded, e.g. got "
                             f"{got[wrong][:4].tolist()} for {ref[wrong][:4].tolist()}")


def check_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref, magnitude = reference(x, w)
    # fp32 accumulation of K terms in another order: a few fp32 ulps of the sum of |terms|; a bf16 output then
    # rounded to nearest.
    bound = 1e-5 * magnitude + 1e-30
    if x.dtype == torch.bfloat16:
        return check_correctly_rounded(got, ref, bound)
    got = got.double()
    excess = (got - ref).abs() - bound
    assert excess.max().item() <= 0, f"worst excess {excess.max().item():.3e} at {divmod(excess.argmax().item(), ref.shape[-1])}"


@contextlib.contextmanager
def amx_rows(lo: int, hi: int):
    """bf16 products of lo..hi rows on the AMX tiles (0, 0: none) inside the block; the host's choice after."""
    chosen = cpu_kernels._state["paths"].amx_rows()
    torch.ops.vicuna_bench.small_m_set_amx_rows(lo, hi)
    try:
        yield
    finally:
        torch.ops.vicuna_bench.small_m_set_amx_rows(*chosen)


@contextlib.contextmanager
def amx_gemm(on: bool):
    """bf16 products of more than 16 rows, however many, on the AMX GEMM (or at::linear) inside the block; the host's
    choice after."""
    chosen = cpu_kernels._state["paths"].amx_gemm_rows()
    assert torch.ops.vicuna_bench.small_m_set_amx_gemm(2**62 if on else 0)
    try:
        yield
    finally:
        torch.ops.vicuna_bench.small_m_set_amx_gemm(chosen)


def amx_usable() -> str:
    """``usable``, or why the AMX tiles are not (asked at collection, for the skip marks: loads the library)."""
    if not cpu_kernels.load(build_if_missing=False):
        return f"the kernels are not loaded: {cpu_kernels.status()['small_m_gemm_why_not']}"
    return torch.ops.vicuna_bench.small_m_amx()


@settings(max_examples=120, deadline=None)
@given(m=st.integers(1, 16), k=st.integers(1, 300), n=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_small_m_matches_matmul(m, k, n, dtype, seed):
    """Every M = 1..16, any K (whole vectors and tails) and N (whole panels and the rest), fp32 and bf16, on the
    vector kernel (AMX off, so AMX hosts check it too)."""
    with amx_rows(0, 0):
        check_random_product(m, k, n, dtype, seed)


@pytest.mark.skipif(amx_usable() != "usable", reason=f"AMX tiles not usable on this host: {amx_usable()}")
@settings(max_examples=120, deadline=None)
@given(m=st.integers(1, 16), k=st.integers(1, 300), n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_amx_matches_matmul(m, k, n, seed):
    """bf16 on the AMX tiles for every M = 1..16: K in whole 32-wide chunks plus a tail (and K < 32: all tail), N in
    64-row panels, then 16-row ones, then fewer than 16 rows on the vector kernel."""
    with amx_rows(1, cpu_kernels.MAX_ROWS):
        check_random_product(m, k, n, torch.bfloat16, seed)


@pytest.mark.skipif(amx_usable() != "usable", reason=f"AMX tiles not usable on this host: {amx_usable()}")
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_amx_model_shaped_products(m):
    """SmolLM2's shapes (all whole chunks and panels) and a head slice with N and K tails, on the AMX tiles."""
    gen = torch.Generator().manual_seed(m)
    with amx_rows(1, cpu_kernels.MAX_ROWS):
        for n, k in [(960, 576), (3072, 576), (576, 1536), (4099, 577)]:
            x = torch.randn(m, k, generator=gen).bfloat16()
            w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
            check_close(op(x, w), x, w)


def test_amx_rows_are_checked_and_reported():
    """The AMX switch takes 1 <= lo <= hi <= 16 (0, 0 turns it off) and answers whether AMX took them."""
    with pytest.raises(RuntimeError, match="need 1 <= lo <= hi <= 16, got 3, 17"):
        torch.ops.vicuna_bench.small_m_set_amx_rows(3, 17)
    with amx_rows(0, 0):
        assert torch.ops.vicuna_bench.small_m_set_amx_rows(2, 5) is (amx_usable() == "usable")
        assert torch.ops.vicuna_bench.small_m_set_amx_rows(0, 0) is True


@pytest.mark.skipif(amx_usable() != "usable", reason=f"AMX tiles not usable on this host: {amx_usable()}")
@settings(max_examples=80, deadline=None)
@given(m=st.integers(17, 200), k=st.integers(1, 300), n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_amx_gemm_matches_matmul(m, k, n, seed):
    """bf16 prefills on the AMX GEMM: M from 17 (whole 16-row blocks of x, pairs of them and a partial last one), K
    in whole 32-wide chunks plus a tail (odd K: the packed pairs read unaligned; K < 32: all tail), N in 32-row
    panels, then a 16-row one, then fewer than 16 rows on the vector kernel."""
    with amx_gemm(True):
        check_random_product(m, k, n, torch.bfloat16, seed)


@pytest.mark.skipif(amx_usable() != "usable", reason=f"AMX tiles not usable on this host: {amx_usable()}")
@pytest.mark.parametrize("m", [17, 48, 256])
def test_amx_gemm_model_shaped_products(m):
    """SmolLM2's prefill shapes and a head slice with N and K tails on the AMX GEMM; a batch of prompts arrives as
    3-D x, as the model hands it."""
    gen = torch.Generator().manual_seed(m)
    with amx_gemm(True):
        for n, k in [(960, 576), (3072, 576), (576, 1536), (4099, 577)]:
            x = torch.randn(m, k, generator=gen).bfloat16()
            w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
            check_close(op(x, w), x, w)
        got = op(x.view(1, m, k), w)
        assert got.shape == (1, m, 4099)
        check_close(got[0], x, w)


@pytest.mark.skipif(amx_usable() != "usable", reason=f"AMX tiles not usable on this host: {amx_usable()}")
@pytest.mark.parametrize("m, k, n", [(700, 576, 50), (1030, 1536, 37), (33, 13824, 40), (100, 5120, 69)])
def test_amx_gemm_takes_many_rows_in_parts_and_long_rows(m, k, n):
    """x in parts of at most 768 KB (700 x 576: two parts of 352 rows; 1030 x 1536: five of 224, the last partial)
    and Vicuna-13B's long rows (its down projection's K = 13824: 32 rows a part; its hidden 5120: 64)."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
    with amx_gemm(True):
        check_close(op(x, w), x, w)


@pytest.mark.skipif(amx_usable() != "usable", reason=f"AMX tiles not usable on this host: {amx_usable()}")
@pytest.mark.parametrize("m, k, n", [(48, 416, 40), (33, 800, 70), (100, 1024, 37), (17, 1055, 33), (64, 1056, 20),
                                     (200, 960, 48)])
def test_amx_gemm_in_blocks_of_k(m, k, n):
    """K of 13-32 whole chunks runs in k blocks, each pair's C tiles kept between them: 416 (two blocks, 6 + 7
    chunks), 800 (three uneven), 1024 and 1055 (three, the second with a 31-wide tail), 960 at 200 rows (a partial
    last block of x, seven pairs kept); 1056 (33 chunks) in one block."""
    gen = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
    with amx_gemm(True):
        check_close(op(x, w), x, w)


@pytest.mark.skipif(amx_usable() != "usable", reason=f"AMX tiles not usable on this host: {amx_usable()}")
@settings(max_examples=25, deadline=None)
@given(m=st.integers(17, 120), k=st.integers(385, 1100), n=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
def test_amx_gemm_in_blocks_of_k_matches_matmul(m, k, n, seed):
    """The k-blocked range (and its edges: 12 chunks and 33 and up run whole) by hypothesis."""
    with amx_gemm(True):
        check_random_product(m, k, n, torch.bfloat16, seed)


def test_amx_gemm_switch_is_checked_and_answers_whether_it_took():
    """A row limit above 16 where AMX is usable (true), refused where not (false, nothing set); 0 (none) always; a
    limit of 16 rows or fewer is an error (those rows are the small-M kernel's)."""
    with amx_gemm(False):
        with pytest.raises(RuntimeError, match="need 0 \\(none\\) or more than 16 rows, got 16"):
            torch.ops.vicuna_bench.small_m_set_amx_gemm(16)
        assert torch.ops.vicuna_bench.small_m_set_amx_gemm(512) is (amx_usable() == "usable")
        assert torch.ops.vicuna_bench.small_m_set_amx_gemm(0) is True


def check_random_product(m: int, k: int, n: int, dtype: torch.dtype, seed: int) -> None:
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_rows_than_the_kernel_takes_is_f_linear(dtype):
    """Above 16 rows (a prefill) the op hands the product to at::linear: bit-identical to F.linear (bf16 with the
    fp32 GEMM off, as hosts with a bf16 dot product have it)."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 96, generator=gen).to(dtype)
    x = torch.randn(cpu_kernels.MAX_ROWS + 1, 96, generator=gen).to(dtype)
    with cpu_kernels.bf16_fp32_gemm(False):
        assert torch.equal(op(x, w), F.linear(x, w))
    if dtype == torch.float32:  # the switch is bf16's alone
        with cpu_kernels.bf16_fp32_gemm(True):
            assert torch.equal(op(x, w), F.linear(x, w))


@settings(max_examples=60, deadline=None)
@given(m=st.integers(cpu_kernels.MAX_ROWS + 1, 300), k=st.integers(1, 300), n=st.integers(1, 300),
       seed=st.integers(0, 2**31 - 1))
def test_bf16_fp32_gemm_matches_matmul(m, k, n, seed):
    """bf16 above 16 rows on the fp32 GEMM (hosts without a bf16 dot product): correctly rounded from an fp32 sum."""
    with cpu_kernels.bf16_fp32_gemm(True):
        check_random_product(m, k, n, torch.bfloat16, seed)


def test_bf16_fp32_gemm_blocks_of_weight_rows():
    """A weight taller than one 2 MiB fp32 block (K = 4096: 128 rows a block, 10 whole blocks and one of 20 rows)
    and leading dimensions: every block's columns land in their place of the [B, T, N] output."""
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(1300, 4096, generator=gen) * 0.02).bfloat16()
    x = torch.randn(2, 12, 4096, generator=gen).bfloat16()
    with cpu_kernels.bf16_fp32_gemm(True):
        got = op(x, w)
    assert got.shape == (2, 12, 1300) and got.dtype == torch.bfloat16
    check_close(got.reshape(24, 1300), x.reshape(24, 4096), w)


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


def sdpa_reference(q, k, v, key_valid):
    """SDPA in float64 of the same inputs, each query head on its kv head (h // (H / Hkv)), over valid slots."""
    rep = q.shape[1] // k.shape[1]
    kd = k.double().repeat_interleave(rep, dim=1)
    vd = v.double().repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q.double(), kd, vd, attn_mask=key_valid[:, None, None, :])


@settings(max_examples=80, deadline=None)
@given(batch=st.integers(1, 8), kv_heads=st.integers(1, 4), rep=st.integers(1, 6),
       head_dim=st.sampled_from([16, 24, 64, 80, 128, 7]), length=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_decode_attention_matches_sdpa(batch, kv_heads, rep, head_dim, length, dtype, seed):
    """Any batch, GQA ratio (1 = MHA), head size (whole AVX-512 vectors or not) and cache length; each row valid
    over a random left-padded span with random holes, at least one slot."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * rep, 1, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    valid = torch.rand(batch, length, generator=gen) < 0.7
    valid[torch.arange(batch), torch.randint(0, length, (batch,), generator=gen)] = True
    got = cpu_kernels.decode_attention(q, k, v, valid)
    assert got.shape == q.shape and got.dtype == dtype
    check_attention(got, sdpa_reference(q, k, v, valid))


def check_attention(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Softmax and sums in fp32 (1e-5 of the float64 reference, the values |v| <~ 4); a bf16 output then rounded
    to nearest."""
    if got.dtype == torch.bfloat16:
        return check_correctly_rounded(got, ref, 1e-5)
    assert (got.double() - ref).abs().max().item() <= 1e-5


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), rep=st.integers(1, 4),
       head_dim=st.sampled_from([64, 80, 128]), threads=st.sampled_from([2, 3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_decode_attention_split_rows_merge_like_sdpa(batch, kv_heads, rep, head_dim, threads, dtype, seed):
    """Few (row, kv head) pairs on several threads: each row's slots are cut into parts whose softmax partials are
    merged (flash-decoding). Rows of very different fill (one a single slot, so some of its parts are empty), long
    enough for the prefetch to run ahead, against float64 SDPA."""
    gen = torch.Generator().manual_seed(seed)
    length = 700
    q = torch.randn(batch, kv_heads * rep, 1, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    valid = torch.rand(batch, length, generator=gen) < 0.9
    valid[0, 600:] = False
    if batch > 1:
        valid[-1] = False
        valid[-1, int(torch.randint(0, length, (1,), generator=gen))] = True
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.decode_attention(q, k, v, valid)
    finally:
        torch.set_num_threads(before)
    check_attention(got, sdpa_reference(q, k, v, valid))


def test_nearest_bf16_reference_rounds_to_nearest_even():
    """The rounding reference on hand-computed values: bf16 has 8 significant bits, so near 1 its step is 2**-7."""
    ref = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20, -(1 + 2.0**-9), -(1 + 0.75 * 2.0**-7),
                        3.0, 0.0, 257.0, 2.0**-126 * 1.5], dtype=torch.float64)
    assert nearest_bf16(ref).tolist() == [1.0, 1 + 2 * 2.0**-7, 1 + 2.0**-7, -1.0, -(1 + 2.0**-7), 3.0, 0.0, 256.0,
                                          2.0**-126 * 1.5]
    # truncation (what the check must catch): 1 + 2**-8 + 2**-20 truncates to 1.0, 2**-7 below its nearest;
    # within err of the tie, either neighbour passes
    one = torch.tensor([1.0]).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="1 of 1 not correctly rounded"):
        check_correctly_rounded(one, ref[2:3], 1e-7)
    check_correctly_rounded(one, ref[2:3], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 24])  # whole vectors (AVX-512 scores and values) and the generic loops
@pytest.mark.parametrize("threads", [1, 2])  # one part a row; the row cut into parts and merged
def test_decode_attention_propagates_nan_like_sdpa(dtype, head_dim, threads):
    """NaN where SDPA has it: a NaN in a valid key makes the heads reading it NaN, a NaN query its own head, a NaN
    value its column of the heads reading it (a numerical blow-up must reach the accuracy suite); every other
    output is SDPA's; NaN in invalid slots is still never read."""
    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(1, 6, 1, head_dim, generator=gen).to(dtype)  # kv head g serves query heads 2g, 2g + 1
    k = torch.randn(1, 3, 300, head_dim, generator=gen).to(dtype)
    v = torch.randn(1, 3, 300, head_dim, generator=gen).to(dtype)
    valid = torch.rand(1, 300, generator=gen) < 0.8
    valid[0, [7, 250]] = True
    valid[0, [8, 9]] = False
    k[0, 0, 7, 3] = float("nan")  # valid key of kv head 0: query heads 0, 1
    q[0, 3, 0, 5] = float("nan")  # query head 3 alone
    v[0, 2, 250, 1] = float("nan")  # valid value of kv head 2: query heads 4, 5
    ref = sdpa_reference(q, k, v, valid)  # before the invalid slots' NaN, which SDPA would read
    k[0, :, 8] = float("nan")
    v[0, :, 9] = float("nan")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.decode_attention(q, k, v, valid)
    finally:
        torch.set_num_threads(before)
    assert torch.isnan(ref[0, :, 0]).any(-1).tolist() == [True, True, False, True, True, True]  # SDPA's heads
    assert torch.equal(torch.isnan(got), torch.isnan(ref))  # NaN wherever SDPA has it (a NaN value: its column)
    check_attention(got.nan_to_num(0.0), ref.nan_to_num(0.0))  # the rest SDPA's numbers


def test_decode_attention_reads_only_valid_slots():
    """Slots outside key_valid do not matter, even NaN or huge (SDPA under a mask still reads them)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 64, generator=gen)
    k = torch.randn(2, 2, 40, 64, generator=gen)
    v = torch.randn(2, 2, 40, 64, generator=gen)
    valid = torch.zeros(2, 40, dtype=torch.bool)
    valid[0, 5:17] = True
    valid[1, :33] = True
    clean = cpu_kernels.decode_attention(q, k, v, valid)
    k[~valid.unsqueeze(1).expand_as(k[..., 0])] = float("nan")
    v[~valid.unsqueeze(1).expand_as(v[..., 0])] = 1e30
    assert torch.equal(cpu_kernels.decode_attention(q, k, v, valid), clean)
    assert torch.allclose(clean.double(), sdpa_reference(q, k.nan_to_num(0.0), v, valid), atol=1e-5)


def test_decode_attention_on_the_cache_layout():
    """The model's call: q a transposed view [B, H, 1, D] of [B, 1, H, D], k/v a slice of a longer cache."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(3, 1, 6, 64, generator=gen).transpose(1, 2)
    cache_k = torch.randn(3, 2, 64, 64, generator=gen)
    cache_v = torch.randn(3, 2, 64, 64, generator=gen)
    k, v = cache_k[:, :, :48], cache_v[:, :, :48]
    valid = torch.ones(3, 48, dtype=torch.bool)
    valid[1, :20] = False
    got = cpu_kernels.decode_attention(q, k, v, valid)
    assert (got.double() - sdpa_reference(q, k, v, valid)).abs().max().item() <= 1e-5


def test_decode_attention_refuses_what_it_cannot_do():
    q, kv = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match=r"q must be \[B, H, 1, D\]"):
        cpu_kernels.decode_attention(q, kv, kv, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="key_valid must be bool"):
        cpu_kernels.decode_attention(q[:, :, :1], kv, kv, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="does not fit the cache"):
        cpu_kernels.decode_attention(torch.randn(1, 3, 1, 8), kv, kv, torch.ones(1, 5, dtype=torch.bool))
    no_heads = torch.randn(1, 0, 5, 8)  # was a division by zero (SIGFPE) in the head-count check
    with pytest.raises(RuntimeError, match=r"the cache \[1, 0, 5, 8\] has no kv heads"):
        cpu_kernels.decode_attention(q[:, :, :1], no_heads, no_heads, torch.ones(1, 5, dtype=torch.bool))


def test_decode_attention_of_nothing_is_empty():
    """No query heads, no rows, or a zero head size: an empty output of q's shape (SDPA's), nothing read."""
    for q, kv, valid in [(torch.randn(1, 0, 1, 8), torch.randn(1, 2, 5, 8), torch.ones(1, 5, dtype=torch.bool)),
                         (torch.randn(0, 4, 1, 8), torch.randn(0, 2, 5, 8), torch.ones(0, 5, dtype=torch.bool)),
                         (torch.randn(2, 4, 1, 0), torch.randn(2, 2, 5, 0), torch.ones(2, 5, dtype=torch.bool))]:
        got = cpu_kernels.decode_attention(q, kv, kv, valid)
        assert got.shape == q.shape == sdpa_reference(q, kv, kv, valid).shape and got.numel() == 0
