"""bench_peers.py's llama.cpp batch layout and --gguf check, against rows written out by hand (no llama_cpp needed)."""

from __future__ import annotations

import pytest

from tests.unit.test_benchmarks import bench  # noqa: F401  (the fixture that imports a benchmark script)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def peers(bench):  # noqa: F811
    return bench("bench_peers")


def test_prefill_rows_put_each_prompt_in_its_own_sequence_with_logits_at_its_end(peers):
    # batched-bench's prefill: batch.add(token, i, j, i == pp - 1) for sequence j, position i
    assert peers.llama_prefill_rows([[11, 12, 13], [21, 22, 23]]) == [
        (11, 0, 0, False), (12, 1, 0, False), (13, 2, 0, True),
        (21, 0, 1, False), (22, 1, 1, False), (23, 2, 1, True),
    ]


def test_prefill_rows_at_batch_1_are_one_sequence(peers):
    assert peers.llama_prefill_rows([[7, 8]]) == [(7, 0, 0, False), (8, 1, 0, True)]


def test_step_rows_carry_one_token_per_sequence_every_row_with_logits(peers):
    assert peers.llama_step_rows([5, 6, 7], [64, 64, 64]) == [(5, 64, 0, True), (6, 64, 1, True), (7, 64, 2, True)]


def test_step_rows_refuse_tokens_and_positions_that_do_not_pair(peers):
    with pytest.raises(ValueError):
        peers.llama_step_rows([5, 6], [64])


def test_chunks_cut_8_prompts_of_256_into_4_calls_of_512(peers):
    rows = peers.llama_prefill_rows([[1] * 256] * 8)
    parts = peers.chunks(rows, 512)
    assert [len(c) for c in parts] == [512, 512, 512, 512]
    assert [r[2] for r in parts[1][:1] + parts[1][-1:]] == [2, 3]  # the second call holds sequences 2 and 3
    assert sum(parts, []) == rows


def test_chunks_keep_a_short_tail(peers):
    assert peers.chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


def test_gguf_problem_accepts_the_magic_and_names_what_is_wrong_otherwise(peers, tmp_path):
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00{}")
    assert peers.gguf_problem(str(good)) is None
    assert "not a GGUF file" in peers.gguf_problem(str(bad))
    assert peers.gguf_problem(str(tmp_path / "absent.gguf")) == "No such file or directory"


def test_a_bad_gguf_stops_the_bench_before_any_timing(peers, tmp_path, capsys):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(SystemExit) as stop:
        peers.main(["--gguf", str(bad)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"--gguf {bad}: not a GGUF file (starts b'PK\\x03\\x04', not b'GGUF')")


# --rounds: fake timers with hand-written (first_ms, next_ms) runs, 3 rounds of 2 runs each.
OURS_ON = [[(50, 20), (54, 22)], [(60, 30), (62, 26)], [(40, 18), (48, 20)]]  # round medians (52, 21) (61, 28) (44, 19)
LLAMA = [[(40, 28), (64, 28)], [(50, 14), (50, 14)], [(80, 19), (96, 19)]]  # round medians (52, 28) (50, 14) (88, 19)
OURS_OFF = [[(70, 40), (70, 40)], [(70, 40), (70, 40)], [(70, 40), (70, 40)]]


class ScriptedTimer:
    """A timer whose run(repeat) hands back the next round of ``script`` and records the call in ``calls``."""

    def __init__(self, name, script, calls):
        self.name, self.script, self.calls = name, list(script), calls

    def run(self, repeat):
        self.calls.append((self.name, repeat))
        runs = self.script.pop(0)
        assert len(runs) == repeat
        return runs


def test_rounds_time_every_timer_in_turn_each_round(peers):
    calls = []
    timers = {name: ScriptedTimer(name, script, calls)
              for name, script in [("off", OURS_OFF), ("on", OURS_ON), ("llama.cpp", LLAMA)]}
    got = peers.timed_rounds(timers, rounds=3, repeat=2, settle_s=0)
    assert calls == [("off", 2), ("on", 2), ("llama.cpp", 2)] * 3
    assert got == {"off": OURS_OFF, "on": OURS_ON, "llama.cpp": LLAMA}


def test_a_columns_figures_are_medians_over_every_run_and_each_round(peers):
    # ours on, all 6 runs: first 40 48 50 54 60 62 -> (50 + 54) / 2; next 18 20 20 22 26 30 -> (20 + 22) / 2
    assert peers.round_figures(OURS_ON) == {
        "first_token_ms": 52, "next_token_ms": 21,
        "rounds": [{"first_token_ms": 52, "next_token_ms": 21}, {"first_token_ms": 61, "next_token_ms": 28},
                   {"first_token_ms": 44, "next_token_ms": 19}],
    }
    # llama.cpp: first 40 50 50 64 80 96 -> (50 + 64) / 2; next 14 14 19 19 28 28 -> 19
    got = peers.round_figures(LLAMA)
    assert (got["first_token_ms"], got["next_token_ms"]) == (57, 19)


def test_versus_gives_each_rounds_ratio_the_median_and_the_rounds_ours_was_faster(peers):
    got = peers.versus_by_round(peers.round_figures(OURS_ON)["rounds"], peers.round_figures(LLAMA)["rounds"])
    # next: 21/28, 28/14, 19/19; first: 52/52, 61/50, 44/88.  A tie (1.0) is not faster.
    # (Each quotient is correctly rounded, so it equals its decimal literal exactly.)
    assert got["next_token"] == {"ratio_by_round": [0.75, 2.0, 1.0], "median_ratio": 1.0, "faster_rounds": 1,
                                 "rounds": 3}
    assert got["first_token"] == {"ratio_by_round": [1.0, 1.22, 0.5], "median_ratio": 1.0, "faster_rounds": 1,
                                  "rounds": 3}


def test_versus_refuses_columns_with_different_round_counts(peers):
    one = [{"first_token_ms": 1.0, "next_token_ms": 1.0}]
    with pytest.raises(ValueError):
        peers.versus_by_round(one * 2, one * 3)


def test_versus_line_reads_as_the_ratios_by_round(peers):
    rounds = [{"first_token_ms": 1.0, "next_token_ms": r} for r in (0.93, 0.97, 1.01, 0.95, 0.96)]
    peer = [{"first_token_ms": 1.0, "next_token_ms": 1.0}] * 5
    v = peers.versus_by_round(rounds, peer)["next_token"]
    assert peers.versus_line("vicuna-bench on / llama.cpp next token", v) == (
        "vicuna-bench on / llama.cpp next token by round: 0.93 0.97 1.01 0.95 0.96 (median 0.96; faster in 4 of 5)")


def test_interleaved_opens_everything_then_alternates_and_checks_llama_cpp_last(peers, monkeypatch):
    events = []
    scripts = {"off": list(OURS_OFF), "on": list(OURS_ON)}

    class FakeOurs(ScriptedTimer):
        def __init__(self, spec, prompts, seq_out):
            super().__init__(spec, scripts[spec], events)
            self.compile_s = {"off": 0.0, "on": 12.5}[spec]
            events.append(("open", spec))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append(("close", self.name))

    class FakeLlama(ScriptedTimer):
        def __init__(self, lib, gguf, prompts, seq_out, threads):
            super().__init__("llama.cpp", LLAMA, events)
            self.info = {"batch": 8, "gguf": gguf}
            self.greedy_check = None
            events.append(("open", "llama.cpp"))

        def __enter__(self):
            return self

        def __exit__(self, exc_type, *exc):
            self.greedy_check = {"seq_0_agrees": True}
            events.append(("greedy check and close", "llama.cpp"))

    monkeypatch.setattr(peers, "OursTimer", FakeOurs)
    monkeypatch.setattr(peers, "LlamaCppTimer", FakeLlama)
    monkeypatch.setattr(peers.time, "sleep", lambda s: events.append(("idle", s)))
    cols = peers.interleaved({"vicuna-bench off": "off", "vicuna-bench on": "on"}, object(), "m.gguf",
                             [[1, 2]], 4, 2, rounds=3, repeat=2)
    # each turn after SETTLE_S idle: the last engine's OpenMP threads have stopped spinning
    assert peers.SETTLE_S == 0.3
    assert events == ([("open", "llama.cpp"), ("open", "off"), ("open", "on")]
                      + [("idle", 0.3), ("off", 2), ("idle", 0.3), ("on", 2), ("idle", 0.3), ("llama.cpp", 2)] * 3
                      + [("close", "on"), ("close", "off"), ("greedy check and close", "llama.cpp")])
    assert list(cols) == ["vicuna-bench off", "vicuna-bench on", "llama.cpp"]
    on = cols["vicuna-bench on"]
    assert (on["first_token_ms"], on["next_token_ms"], on["compile_s"], len(on["rounds"])) == (52, 21, 12.5, 3)
    lc = cols["llama.cpp"]
    assert (lc["batch"], lc["gguf"], lc["first_token_ms"], lc["next_token_ms"]) == (8, "m.gguf", 57, 19)
    assert lc["rounds"][1] == {"first_token_ms": 50, "next_token_ms": 14}
    assert lc["greedy_check"] == {"seq_0_agrees": True}


def test_interleaved_times_transformers_in_each_round_between_ours_and_llama_cpp(peers, monkeypatch):
    """With hf = (path, dtype), transformers is one more timer of every round (its first-token figure is the
    reference of first / HF), opened after ours and closed before them."""
    events = []

    class Fake(ScriptedTimer):
        def __init__(self, name, script):
            super().__init__(name, script, events)
            self.compile_s, self.info, self.greedy_check = 0.0, {}, None
            events.append(("open", name))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append(("close", self.name))

    monkeypatch.setattr(peers, "OursTimer", lambda spec, prompts, seq_out: Fake("on", OURS_ON))
    monkeypatch.setattr(peers, "TransformersTimer", lambda path, dtype, prompts, seq_out: Fake("hf", OURS_OFF))
    monkeypatch.setattr(peers, "LlamaCppTimer", lambda lib, gguf, prompts, seq_out, threads: Fake("llama", LLAMA))
    cols = peers.interleaved({"vicuna-bench on": "on"}, object(), "m.gguf", [[1, 2]], 4, 2, rounds=3, repeat=2,
                             hf=("/m", "fp32"), settle_s=0)
    assert events == ([("open", "llama"), ("open", "on"), ("open", "hf")] + [("on", 2), ("hf", 2), ("llama", 2)] * 3
                      + [("close", "hf"), ("close", "on"), ("close", "llama")])
    assert list(cols) == ["vicuna-bench on", "transformers", "llama.cpp"]
    assert cols["transformers"]["rounds"] == [{"first_token_ms": 70, "next_token_ms": 40}] * 3
    # ours / transformers first token by round: 52/70, 61/70, 44/70
    versus = peers.versus_by_round(cols["vicuna-bench on"]["rounds"], cols["transformers"]["rounds"])
    assert versus["first_token"]["ratio_by_round"] == pytest.approx([52 / 70, 61 / 70, 44 / 70])


def test_ours_at_one_round_is_the_median_after_an_untimed_warm_up(peers, monkeypatch):
    from types import SimpleNamespace

    results = [SimpleNamespace(first_token_ms=f, next_token_ms=n, compile_ms=c)
               for f, n, c in [(900, 90, 4000), (30, 3, 0), (10, 1, 0), (20, 2, 0)]]  # the first is the warm-up

    class FakeEngine:
        closed = False

        def __init__(self, spec):
            pass

        def generate(self, prompts, seq_out, ignore_eos):
            return results.pop(0)

        def close(self):
            FakeEngine.closed = True

    monkeypatch.setattr(peers, "Engine", FakeEngine)
    assert peers.ours("spec", [[1]], 4, repeat=3) == {"first_token_ms": 20, "next_token_ms": 2, "compile_s": 4.0}
    assert FakeEngine.closed


def test_interleaved_times_the_child_columns_after_ours_in_every_round(peers, monkeypatch):
    """``children`` (column -> (spec, environment)) are timers of every round after ours, opened after ours with
    the environment handed to them, closed before them; their columns carry what the child said (its kernels)."""
    events = []

    class Fake(ScriptedTimer):
        def __init__(self, name, script, info=None):
            super().__init__(name, script, events)
            self.compile_s, self.info, self.greedy_check = 3.5, info or {}, None
            events.append(("open", name))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append(("close", self.name))

    def child(spec, prompts, seq_out, threads, env):
        assert (spec, threads, env) == ("on", 2, peers.KERNELS_OFF)
        return Fake("child", OURS_OFF, {"env": env, "small_m_gemm": False})

    monkeypatch.setattr(peers, "OursTimer", lambda spec, prompts, seq_out: Fake("on", OURS_ON))
    monkeypatch.setattr(peers, "ChildTimer", child)
    monkeypatch.setattr(peers, "LlamaCppTimer", lambda lib, gguf, prompts, seq_out, threads: Fake("llama", LLAMA))
    name = peers.without_kernels_name("vicuna-bench on")
    assert name == "vicuna-bench on, no kernels"
    cols = peers.interleaved({"vicuna-bench on": "on"}, object(), "m.gguf", [[1, 2]], 4, 2, rounds=3, repeat=2,
                             children={name: ("on", peers.KERNELS_OFF)}, settle_s=0)
    assert events == ([("open", "llama"), ("open", "on"), ("open", "child")]
                      + [("on", 2), ("child", 2), ("llama", 2)] * 3
                      + [("close", "child"), ("close", "on"), ("close", "llama")])
    assert list(cols) == ["vicuna-bench on", name, "llama.cpp"]
    assert cols[name]["rounds"] == [{"first_token_ms": 70, "next_token_ms": 40}] * 3
    assert (cols[name]["small_m_gemm"], cols[name]["env"], cols[name]["compile_s"]) == (
        False, {"VICUNA_BENCH_CPU_KERNELS": "0"}, 3.5)


def test_the_no_kernels_column_turns_our_kernels_off(peers):
    assert peers.KERNELS_OFF == {"VICUNA_BENCH_CPU_KERNELS": "0"}  # the switch cpu_kernels reads
    from vicuna_bench import cpu_kernels
    assert cpu_kernels.ENV_SWITCH in peers.KERNELS_OFF


@pytest.mark.parametrize("rounds", ["1", None])
def test_without_kernels_needs_rounds_to_alternate(peers, capsys, rounds):
    with pytest.raises(SystemExit) as stop:
        peers.main(["--without-kernels"] + ([f"--rounds={rounds}"] if rounds else []))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--without-kernels --rounds 1: the two are compared in alternation; give --rounds 2 "
                            "or more")


def test_without_kernels_where_they_are_not_loaded_has_nothing_to_compare(peers, capsys, monkeypatch):
    """Both columns would run without the kernels: no verdict, one line saying why, exit 2."""
    from vicuna_bench import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "load", lambda build_if_missing=True: False)
    monkeypatch.setattr(cpu_kernels, "status", lambda: {"small_m_gemm": False, "small_m_gemm_isa": None,
                                                        "small_m_gemm_why_not": "the C++ compiler failed"})
    with pytest.raises(SystemExit) as stop:
        peers.main(["--without-kernels", "--rounds", "2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--without-kernels: our CPU kernels are not loaded here either (the C++ compiler "
                            "failed), so there is nothing to compare")


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_rounds_below_one_stop_the_bench_naming_the_value(peers, capsys, value):
    with pytest.raises(SystemExit) as stop:
        peers.main([f"--rounds={value}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"argument --rounds: '{value}' is not a number of rounds (a whole number >= 1)")


@pytest.mark.parametrize("gflops, n", [(0.31, 512),  # ATen's bf16 GEMM on an AVX2 AMD EPYC (measured)
                                        (10.0, 1024), (100.0, 2048), (5000.0, 2048)])
def test_the_matmul_reference_shrinks_where_a_2048_call_would_take_over_a_second(peers, gflops, n):
    seconds_at_256 = 2 * 256**3 / (gflops * 1e9)
    assert peers.matmul_size(seconds_at_256) == n
    # the chosen size's call fits the budget; the next size's would not (or it is the largest)
    assert 2 * n**3 / (gflops * 1e9) <= 1.0
    assert n == 2048 or 2 * (2 * n) ** 3 / (gflops * 1e9) > 1.0


def test_the_matmul_reference_is_never_below_256(peers):
    assert peers.matmul_size(60.0) == 256


# llama_print_system_info() of llama-cpp-python 0.3.36 built natively on this project's AMX host (GGML_NATIVE=ON),
# captured 2026-12-08, and of the same sdist built with the AVX2 switches in bench_peers' docstring.
NATIVE_SPR = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
              "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
              "OPENMP = 1 | REPACK = 1 | ")
BUILT_AVX2 = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
              "OPENMP = 1 | REPACK = 1 | ")
# /proc/cpuinfo's words for the instruction sets above, as the captured hosts in tests/unit/data/cpu_flags have them
SPR_ISA = frozenset("pni ssse3 avx avx_vnni avx2 f16c fma bmi2 avx512f avx512vbmi avx512_vnni avx512_bf16 amx_int8 "
                    "amx_bf16 amx_tile".split())
ZEN4_ISA = frozenset("pni ssse3 avx avx2 f16c fma bmi2 avx512f avx512vbmi avx512_vnni avx512_bf16".split())
HASWELL_ISA = frozenset("pni ssse3 avx avx2 f16c fma bmi2".split())
F32, BF16, Q8_0 = 0, 32, 7  # llama.h's llama_ftype values


def test_ggml_features_are_the_names_set_to_1_in_order(peers):
    assert peers.ggml_features(BUILT_AVX2) == ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "LLAMAFILE",
                                               "OPENMP", "REPACK"]
    assert peers.ggml_features("CPU : AVX2 = 0 | FMA = 1 |") == ["FMA"]


@pytest.mark.parametrize("info, flags, file_type, beyond", [
    (NATIVE_SPR, SPR_ISA, BF16, []),
    (NATIVE_SPR, HASWELL_ISA, F32, ["AVX512", "AVX512_VBMI", "AVX512_BF16"]),  # the int8 dot products unused on f32
    (NATIVE_SPR, HASWELL_ISA, Q8_0, ["AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8"]),
    (NATIVE_SPR, ZEN4_ISA, BF16, []),  # the avx512_bf16 kind: AMX and AVX-VNNI run on quantized weights only
    (NATIVE_SPR, ZEN4_ISA, Q8_0, ["AVX_VNNI", "AMX_INT8"]),
    (NATIVE_SPR, ZEN4_ISA, None, ["AVX_VNNI", "AMX_INT8"]),  # a file that does not say: counted as quantized
    (BUILT_AVX2, HASWELL_ISA, F32, []),
    (BUILT_AVX2, HASWELL_ISA, Q8_0, []),
])
def test_a_llama_cpp_build_is_checked_against_the_host_kinds_flags(peers, info, flags, file_type, beyond):
    assert peers.llama_cpp_beyond(info, flags, file_type) == beyond


class FakeLlamaLib:
    """The parts of llama_cpp's low-level API LlamaCppTimer calls before timing, with a build's system info."""

    __version__ = "0.3.36"
    __file__ = "/site/llama_cpp/__init__.py"

    def __init__(self, system_info: str, file_type: int):
        self.system_info, self.file_type, self.freed = system_info, file_type, []

    def llama_backend_init(self):
        pass

    def llama_model_default_params(self):
        return None

    def llama_model_load_from_file(self, path, params):
        return "model"

    def llama_print_system_info(self):
        return self.system_info.encode()

    def llama_model_meta_val_str(self, model, key, buf, size):
        assert key == b"general.file_type"
        value = str(self.file_type).encode()
        buf.value = value
        return len(value)

    def llama_model_free(self, model):
        self.freed.append(model)


def test_an_emulated_kind_refuses_a_llama_cpp_built_beyond_it_naming_the_features(peers, monkeypatch):
    from tests.unit.test_host_emulation import emulate

    emulate(monkeypatch, "avx2")
    lib = FakeLlamaLib(NATIVE_SPR, F32)
    with pytest.raises(peers.GGUFUnusable) as refused:
        peers.LlamaCppTimer(lib, "m.gguf", [[1, 2, 3]], 4, 2)
    assert "built with AVX512, AVX512_VBMI, AVX512_BF16, which the emulated avx2 host lacks" in str(refused.value)
    assert lib.freed == ["model"]  # the model freed before the error leaves


def test_an_emulated_kind_takes_a_llama_cpp_built_for_it(peers, monkeypatch):
    from tests.unit.test_host_emulation import emulate

    class Opened(Exception):
        pass

    def context(*args):
        raise Opened  # past the build check: llama.cpp's context would open here

    emulate(monkeypatch, "avx2")
    monkeypatch.setattr(peers, "LlamaCppContext", context)
    with pytest.raises(Opened):
        peers.LlamaCppTimer(FakeLlamaLib(BUILT_AVX2, F32), "m.gguf", [[1, 2, 3]], 4, 2)
    emulate(monkeypatch, "avx512_bf16")  # the native build on the avx512_bf16 kind, an unquantized file
    with pytest.raises(Opened):
        peers.LlamaCppTimer(FakeLlamaLib(NATIVE_SPR, BF16), "m.gguf", [[1, 2, 3]], 4, 2)


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf", "soon"])
def test_settle_below_zero_or_not_a_number_stops_the_bench_naming_the_value(peers, capsys, value):
    with pytest.raises(SystemExit) as stop:
        peers.main(["--settle", value])
    assert stop.value.code == 2
    assert f"argument --settle: {value!r}: need seconds >= 0" in capsys.readouterr().err
