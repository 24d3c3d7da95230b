"""The benchmark scripts' own arithmetic, against byte counts worked out by hand from the tiny configs."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from tests import tiny
from tests.specs import spec_for

pytestmark = pytest.mark.unit

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_memory_probe_counts_weights_and_the_kv_cache(tiny_models, bench):
    """GQA tiny model: tied 777 x 64 embedding, 2 layers, 2 key/value heads of 8; batch 2 in a 64-slot cache."""
    spec = spec_for(str(tiny_models["gqa"]), 1, "cpu", "fp32", max_seq_len=64)
    dynamo_loaded = "torch._dynamo.utils" in sys.modules
    got = bench("bench_peers")._memory_probe(spec, [[5, 6, 7], [8, 9]], 4, threads=1)
    assert ("torch._dynamo.utils" in sys.modules) == dynamo_loaded  # eager: nothing loaded after the baseline
    assert (got["graphs_compiled"], got["graphs_from_cache"]) == (0, 0)
    h, i, layers, kv_width = 64, 128, 2, 2 * 8
    per_layer = h * h + 2 * kv_width * h + h * h + 2 * i * h + i * h + 2 * h  # q, k+v, o, gate+up, down, 2 norms
    assert got["weight_bytes"] == 4 * (777 * h + layers * per_layer + h)
    assert got["kv_cache_bytes"] == 4 * 2 * layers * 2 * kv_width * 64  # k and v, batch 2, 64 slots
    assert got["load_peak_growth_bytes"] > 0  # loading allocates; the figures are growth over the pre-load RSS
    total = got["weight_bytes"] + got["kv_cache_bytes"]
    assert got["serve_over_weights_kv"] == pytest.approx(got["serve_peak_growth_bytes"] / total)


def test_gemm_benchmark_streams_the_models_matrices(tiny_models, bench, tmp_path, capsys, monkeypatch):
    """bench_gemm's chain holds each layer's fused qkv, o, fused gate/up and down once per layer, then the head;
    ``--resident`` adds the same chain made of its first layer only; GFLOP/s count a multiply and an add per weight
    and row, against the FMA peak."""
    gemm = bench("bench_gemm")
    monkeypatch.setattr(gemm, "fma_peak_gflops", lambda: 250.0)  # the measured figure is the host's
    out = tmp_path / "gemm.json"
    assert gemm.main(["--model-path", str(tiny_models["vicuna"]), "--rows", "1,2", "--repeat", "2",
                      "--no-compile", "--resident", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    h, i, vocab, layers = 64, 128, 1001, 2  # tiny.VICUNA_SHAPED
    assert tiny.VICUNA_SHAPED["hidden_size"] == h and tiny.VICUNA_SHAPED["vocab_size"] == vocab
    elements = layers * (3 * h * h + h * h + 2 * i * h + i * h) + vocab * h
    assert doc["weight_elements"] == elements and doc["weight_bytes"] == 4 * elements
    assert [(r["m"], r["kernel"]) for r in doc["rows"]] == [
        (m, kernel) for m in (1, 2) for kernel in ("F.linear", "small-M", "small-M resident")]
    first = doc["rows"][0]
    assert first["over_m1"] == 1.0 and first["gbps"] == pytest.approx(doc["weight_bytes"] / first["ms"] / 1e6)
    two = doc["rows"][4]  # M = 2, small-M
    assert two["gflops"] == pytest.approx(2 * 2 * elements / (two["ms"] * 1e-3) / 1e9)
    assert doc["fma_peak_gflops"] == 250.0 and two["of_fma_peak"] == pytest.approx(two["gflops"] / 250.0)
    assert "GB/s" in capsys.readouterr().out


def test_gemm_benchmark_resident_chain_is_one_layers_weights(tiny_models, bench):
    """The resident chain runs every layer on the first layer's tensors: one layer's bytes, the same products."""
    import torch

    from vicuna_bench import checkpoint

    gemm = bench("bench_gemm")
    args = checkpoint.read_model_args(tiny_models["vicuna"])
    streamed = gemm.LinearChain(args, 3, torch.float32)
    resident = gemm.LinearChain(args, 3, torch.float32, resident=True)
    assert len(resident.blocks) == len(streamed.blocks) == 3
    assert all(block is resident.blocks[0] for block in resident.blocks)
    layer = sum(p.numel() for p in streamed.blocks[0].parameters())
    head = resident.head.weight.numel()
    assert sum(p.numel() for p in resident.parameters()) == layer + head
    assert sum(p.numel() for p in streamed.parameters()) == 3 * layer + head


def test_the_linear_chain_takes_a_prefills_head_on_the_last_row_only(bench, tiny_models):
    """Up to 16 rows (a decode step's batch) every row reaches the head; more (a prefill's) only the last, as the
    engine takes it: the chain's rows are independent, so that row's logits are the chain's on it alone."""
    import torch

    from vicuna_bench import checkpoint, cpu_kernels

    gemm = bench("bench_gemm")
    args = checkpoint.read_model_args(tiny_models["vicuna"])
    chain = gemm.LinearChain(args, 2, torch.float32).eval()
    x = torch.randn(cpu_kernels.MAX_ROWS + 4, args.hidden_size)
    with torch.no_grad():
        assert chain(x[: cpu_kernels.MAX_ROWS]).shape == (cpu_kernels.MAX_ROWS, args.vocab_size)
        prefill = chain(x)
        assert prefill.shape == (1, args.vocab_size)
        torch.testing.assert_close(prefill, chain(x[-1:]))


def test_the_fma_peak_probe_counts_flops_per_second(bench):
    """The library's FMA probe: a rate in GFLOP/s (a units slip of 1e3 either way would leave this range), and a
    bad iteration count refused in one line."""
    import torch

    from vicuna_bench import cpu_kernels

    assert cpu_kernels.load(), cpu_kernels.status()["small_m_gemm_why_not"]  # as bench_gemm's test needs them
    rate = torch.ops.vicuna_bench.small_m_fma_rate(200_000)
    assert 0.5 < rate < 50_000  # any CPU core of this decade: ~1-10 GFLOP/s scalar to ~10 TFLOP/s a socket
    with pytest.raises(RuntimeError, match="iterations must be positive, got 0"):
        torch.ops.vicuna_bench.small_m_fma_rate(0)


def test_batch_benchmark_alternates_batch_sizes_in_one_engine(tiny_models, bench, tmp_path, capsys):
    """bench_batch: each round times batch 1 then batch B on one engine; the ratios are those of the rounds' medians."""
    out = tmp_path / "batch.json"
    assert bench("bench_batch").main(["--model-path", str(tiny_models["gqa"]), "--batch", "3", "--seq-in", "8",
                                      "--seq-out", "4", "--rounds", "2", "--repeat", "2", "--compile", "off",
                                      "--threads", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    one, three = doc["columns"]["batch 1"], doc["columns"]["batch 3"]
    assert len(one["rounds"]) == len(three["rounds"]) == 2
    want = [t["next_token_ms"] / o["next_token_ms"] for o, t in zip(one["rounds"], three["rounds"])]
    got = doc["next_token_batch_over_batch_1"]["host"]
    assert got["ratio_by_round"] == pytest.approx(want)
    assert got["median_ratio"] == pytest.approx((want[0] + want[1]) / 2)  # the median of two is their mean
    assert "batch 3 / batch 1 next token by round:" in capsys.readouterr().out


def test_freeze_benchmark_builds_four_engines_abba_and_divides_the_pairs_means(tiny_models, bench, tmp_path, capsys):
    """bench_freeze: engines built unfrozen, frozen, frozen, unfrozen (the options each was built under recorded);
    each round's ratio is the frozen pair's mean over the unfrozen pair's, per batch size."""
    out = tmp_path / "freeze.json"
    assert bench("bench_freeze").main(["--model-path", str(tiny_models["gqa"]), "--dtype", "fp32", "--batches", "1,2",
                                       "--seq-in", "8", "--seq-out", "3", "--rounds", "2", "--repeat", "1",
                                       "--compile", "off", "--threads", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(e["name"], e["freezing"]) for e in doc["engines"]] == [("unfrozen", False), ("frozen", True),
                                                                    ("frozen", True), ("unfrozen", False)]
    from vicuna_bench import compile as vb_compile
    assert vb_compile.cpu_inductor_options.__module__ == "vicuna_bench.compile"  # the engine's own choice restored
    for b in (1, 2):
        rounds = [[doc["columns"][f"b{b} {name} #{i}"]["rounds"][r]["next_token_ms"]
                   for i, name in enumerate(["unfrozen", "frozen", "frozen", "unfrozen"])] for r in range(2)]
        want = [(t[1] + t[2]) / (t[0] + t[3]) for t in rounds]
        got = doc["frozen_over_unfrozen"][str(b)]["next"]
        assert got["ratio_by_round"] == pytest.approx(want)
        assert got["median_ratio"] == pytest.approx((want[0] + want[1]) / 2)
    assert "batch 2 frozen / unfrozen next token by round:" in capsys.readouterr().out


def test_batch_benchmark_alternates_amx_tiles_and_vector_path(tiny_models, bench, tmp_path, capsys):
    """bench_batch --amx both: four columns a round (each batch size with the tiles and without); the tiles / vector
    ratios are those of the rounds' medians.  Where the tiles are unusable it says why and exits 2 (no verdict)."""
    from vicuna_bench import cpu_kernels

    out = tmp_path / "batch.json"
    rc = bench("bench_batch").main(["--model-path", str(tiny_models["gqa"]), "--dtype", "bf16", "--amx", "both",
                                    "--batch", "2", "--seq-in", "8", "--seq-out", "4", "--rounds", "2",
                                    "--repeat", "1", "--compile", "off", "--threads", "1", "--json", str(out)])
    if not cpu_kernels.load() or cpu_kernels.paths_record()["amx"] != "usable":
        assert rc == 2 and not out.exists()
        assert "--amx both: the kernel's AMX tiles are not usable here:" in capsys.readouterr().err
        return
    assert rc == 0
    doc = json.loads(out.read_text())
    assert sorted(doc["columns"]) == ["batch 1 AMX", "batch 1 vector", "batch 2 AMX", "batch 2 vector"]
    cols = doc["columns"]
    want = [a["next_token_ms"] / v["next_token_ms"] for a, v in zip(cols["batch 2 AMX"]["rounds"],
                                                                    cols["batch 2 vector"]["rounds"])]
    assert doc["next_token_amx_over_vector"]["batch 2"]["ratio_by_round"] == pytest.approx(want)
    assert set(doc["next_token_batch_over_batch_1"]) == {"AMX", "vector"}
    assert "batch 1: AMX / vector next token by round:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--batch", "1"], ["--rounds", "0"], ["--amx", "both"]])
def test_batch_benchmark_refuses_what_it_cannot_compare(bench, argv):
    with pytest.raises(SystemExit) as exit_:
        bench("bench_batch").main(argv)
    assert exit_.value.code == 2


def test_attention_benchmark_counts_the_filled_slots_bytes(tiny_models, bench, tmp_path, capsys):
    """GQA tiny model: 8 query / 2 kv heads of 8, 2 layers; batch 3, 20 of 32 slots filled, fp32 and bf16."""
    out = tmp_path / "attn.json"
    assert bench("bench_attention").main(["--model-path", str(tiny_models["gqa"]), "--batch", "3", "--cache", "32",
                                          "--filled", "20", "--repeat", "2", "--threads", "1",
                                          "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    shape = tiny.GQA
    assert (shape["num_attention_heads"], shape["num_key_value_heads"], shape["hidden_size"]) == (8, 2, 64)
    fp32, bf16 = doc["rows"]
    # layers x (keys + values) x batch x kv heads x filled slots x head size x bytes
    assert fp32["read_bytes"] == 2 * 2 * 3 * 2 * 20 * 8 * 4 and bf16["read_bytes"] == fp32["read_bytes"] // 2
    assert fp32["floor_ms"] == pytest.approx(fp32["read_bytes"] / (doc["read_gbps"] * 1e9) * 1e3)
    assert fp32["max_abs_diff"] < 1e-5 and bf16["max_abs_diff"] < 2e-2  # ours against SDPA on the same inputs
    assert "ours/floor" in capsys.readouterr().out


def test_attention_benchmark_refuses_more_filled_slots_than_the_cache(bench):
    with pytest.raises(SystemExit) as exit_:
        bench("bench_attention").main(["--cache", "16", "--filled", "17"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("name", ["bench_attention", "bench_batch", "bench_freeze", "bench_gemm", "bench_paths",
                                  "bench_peers", "bench_prefill"])
def test_a_benchmark_given_a_missing_model_says_so_in_one_line_and_exits_2(bench, name, tmp_path, capsys):
    from vicuna_bench.errors import script_exit

    missing, out = tmp_path / "no-such-model", tmp_path / "out.json"
    argv = ["--model-path", str(missing), "--json", str(out)]
    assert script_exit(bench(name).main, argv, prog=f"{name}.py") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{name}.py: error: --model-path {missing}: no such directory"
    assert not out.exists()
