"""The batch sweep: the knee rule on hand-made curves, the CSV and PNG of a sweep on a tiny model, the fit stop.

References: the knees and verdict ratios below are worked by hand from the
points (the rule as docs/perf.md states it); the sweep's figures are checked
against the per-batch extended CSVs the ordinary perf run writes beside it.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import pytest

from vicuna_bench import fit, sweep
from vicuna_bench.cli import main
from vicuna_bench.perf import Case
from vicuna_bench.sweep import Point, knee_index

pytestmark = pytest.mark.unit


def _points(*triples) -> list[Point]:
    return [Point(b, latency, tps) for b, latency, tps in triples]


# ---------------------------------------------------------------- the knee rule

# Gains (tokens/s per extra ms), by hand: 1->2: 80/1 = 80 (the reference); 2->4: 160/2 = 80; 4->8: 260/7 = 37.1
# (>= 0.25 x 80 = 20); 8->16: 200/20 = 10 (< 20): the knee is batch 8.
BENDS_AT_8 = _points((1, 10, 100), (2, 11, 180), (4, 13, 340), (8, 20, 600), (16, 40, 800))


@pytest.mark.parametrize("points, knee_batch", [
    (BENDS_AT_8, 8),
    # 2->4: throughput falls (150 -> 140): the knee is batch 2 whatever the gains.
    (_points((1, 10, 100), (2, 12, 150), (4, 15, 140)), 2),
    # 1->2 costs no latency (free); reference 2->4: 100/2 = 50; 4->8: 90/2 = 45 >= 12.5: no knee.
    (_points((1, 10, 100), (2, 10, 200), (4, 12, 300), (8, 14, 390)), None),
    # Exactly the fraction is not below it: reference 40/1, then 10/1 = 0.25 x 40: no knee ...
    (_points((1, 10, 100), (2, 11, 140), (4, 12, 150)), None),
    # ... and 9/1 < 10 is: the knee is batch 2.
    (_points((1, 10, 100), (2, 11, 140), (4, 12, 149)), 2),
    # A first step that buys nothing: the first batch is the knee.
    (_points((1, 10, 100), (2, 20, 100)), 1),
    (_points((1, 10, 100)), None),
])
def test_knee_on_hand_made_points(points, knee_batch):
    k = knee_index(points)
    assert (None if k is None else points[k].batch) == knee_batch


def test_knee_fraction_is_a_parameter():
    # With 0.5 the bar is 40 tokens/s per ms: 4->8's 37.1 falls below it, so the knee moves to batch 4.
    assert BENDS_AT_8[knee_index(BENDS_AT_8, 0.5)].batch == 4
    assert sweep.KNEE_FRACTION == 0.25


def test_verdict_line():
    # Batch 8 against batch 1: 600/100 = 6.0x the tokens/s at 20/10 = 2.0x the latency.
    assert sweep.verdict(Case(256, 64), BENDS_AT_8) == (
        "case [256,64]: batch 8: 6.0x the tokens/s of batch 1 at 2.0x the latency (the knee)")
    # No knee: the last batch, said so; 390/100 = 3.9x at 14/10 = 1.4x.
    no_knee = _points((1, 10, 100), (2, 10, 200), (4, 12, 300), (8, 14, 390))
    assert sweep.verdict(Case(32, 8), no_knee) == (
        "case [32,8]: batch 8: 3.9x the tokens/s of batch 1 at 1.4x the latency (no knee up to batch 8)")


@pytest.mark.parametrize("text, expected", [("1,2,4", [1, 2, 4]), (" 8, 1 ,2,2 ", [1, 2, 8]), ("", None), (None, None)])
def test_parse_batch_sizes(text, expected):
    assert sweep.parse_batch_sizes(text) == expected


# ---------------------------------------------------------------- a sweep on a tiny model

def _sweep_cli(model: Path, out: Path, *extra: str) -> int:
    return main(["perf", "--model-path", str(model), "--device", "cpu", "--max-seq-len", "256", "--output-dir",
                 str(out), "--no-progress", "--model-name", "tiny", "--case-pair", "[[16,4],[32,4]]",
                 "--mem-bandwidth", "10", *extra])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_curve_csv_and_png(tiny_models, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vicuna_bench")
    out = tmp_path / "out"
    assert _sweep_cli(tiny_models["vicuna"], out, "--batch-sizes", "4,1,2") == 0
    [csv_path] = out.glob("performance_test_tiny_*_sweep.csv")
    rows = _rows(csv_path)
    assert list(rows[0]) == sweep.SWEEP_COLUMNS
    # Cases in run order, batches ascending within each.
    assert [(r["seq_in"], r["seq_out"], r["batch_size"]) for r in rows] == [
        ("16", "4", "1"), ("16", "4", "2"), ("16", "4", "4"), ("32", "4", "1"), ("32", "4", "2"), ("32", "4", "4")]
    for batch in (1, 2, 4):  # each batch is an ordinary perf run with its own files
        [ext] = out.glob(f"performance_test_tiny_*_bs{batch}_extended.csv")
        for e in _rows(ext):
            [r] = [r for r in rows if (r["seq_in"], r["batch_size"]) == (e["seq_in"], str(batch))]
            assert r["next_token_ms_p50"] == e["next_token_ms_p50"]
            assert float(r["decode_tokens_per_s"]) == pytest.approx(batch / float(e["next_token_ms_p50"]) * 1e3,
                                                                    rel=1e-5)
            # One repeat: the e2e median is its mean; tokens made = batch x seq_out (e2e_s_mean is written to 1 us).
            assert float(r["e2e_tokens_per_s"]) == pytest.approx(batch * 4 / float(e["e2e_s_mean"]), rel=1e-3)
    for seq_in in ("16", "32"):  # at most one knee per case
        assert sum(int(r["knee"]) for r in rows if r["seq_in"] == seq_in) <= 1
    [png] = out.glob("performance_test_tiny_*_sweep.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] >= 500 and pixels.shape[1] >= 800  # 9 x 6 in at 110 dpi
    # Non-trivial: two case lines in matplotlib's first two colours (C0 blue, C1 orange) are drawn.
    rgb = (pixels[..., :3] * 255).round()
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert ((abs(rgb - colour) <= 2).all(axis=-1)).sum() > 50, colour
    lines = "\n".join(caplog.messages).splitlines()
    for case in ("[16,4]", "[32,4]"):  # one verdict a case, against batch 1
        assert len([ln for ln in lines if ln.startswith(f"case {case}: batch ") and "of batch 1 at" in ln]) == 1


def test_sweep_stops_at_the_first_batch_that_does_not_fit(tiny_models, tmp_path, monkeypatch, caplog):
    from vicuna_bench.checkpoint import read_model_args

    args = read_model_args(Path(tiny_models["vicuna"]))
    two = fit.rank_need(args, 1, "fp32", 256, 2, "cpu")
    # Batch 2 with its pool's two sets just fits; batch 4's one set (twice batch 2's) and larger prefill do not.
    available = two.weight_bytes + two.runtime_bytes + 2 * two.kv_bytes
    assert fit.rank_need(args, 1, "fp32", 256, 4, "cpu").total > available
    monkeypatch.setattr(fit, "host_available_bytes", lambda: available)
    out = tmp_path / "out"
    assert _sweep_cli(tiny_models["vicuna"], out, "--dtype", "fp32", "--batch-sizes", "1,2,4,8") == 0
    rows = _rows(next(out.glob("*_sweep.csv")))
    assert sorted({r["batch_size"] for r in rows}) == ["1", "2"]
    assert not list(out.glob("*_bs4*")) and not list(out.glob("*_bs8*"))
    stops = [m for m in caplog.messages if "does not fit" in m]
    assert len(stops) == 1 and "batch 4 does not fit, the sweep stops here" in stops[0] and "\n" not in stops[0]


# The tiny model (tests/tiny.py VICUNA_SHAPED) at --max-seq-len 256 in fp32, by hand from fit.py's formulas:
# one KV set = 2 x 2 layers x 8 kv heads x 8 head_dim x 256 slots x 4 bytes = 262,144 bytes a row;
# prefill activations = 4 x (256 b x (4 x 64 + 24 x 8 + 2 x 128) + b x 8 x 256 x 256) = 2,818,048 bytes a row.
# A rank opened for batch 1 that kept `room1` for KV caches has, at batch 2, room1 - 2,818,048 for them.
ACT_ROW, KV_ROW = 2_818_048, 262_144


@pytest.mark.parametrize("extra, stops", [
    (2 * 2 * KV_ROW, None),  # room at batch 2 = two batch-2 sets: the pool's reach fits
    (2 * 2 * KV_ROW - 1, "the KV cache pool opened for batch 1 may keep 0.00 GiB (up to two sets"),
    (2 * KV_ROW - 1, "batch 2: each rank needs"),  # not even one set: the fit check's own line
])
def test_check_batch_against_the_room_kept_at_load(tiny_models, extra, stops):
    from types import SimpleNamespace

    from vicuna_bench.checkpoint import read_model_args
    from vicuna_bench.errors import UserError

    spec = SimpleNamespace(world_size=1, dtype="fp32", max_seq_len=256, fit_batch=1, device="cpu",
                           kv_cache_budget_mb=None, ranks_on_host=lambda: 1)
    engine = SimpleNamespace(spec=spec, args=read_model_args(Path(tiny_models["vicuna"])),
                             rank_info=[{"kv_room_bytes": ACT_ROW + extra}])
    sweep.check_batch(engine, 1)  # the batch it was opened for always fits
    if stops is None:
        sweep.check_batch(engine, 2)
    else:
        with pytest.raises(UserError, match=re.escape(stops)):
            sweep.check_batch(engine, 2)


@pytest.mark.parametrize("args, named", [
    (["--batch-sizes", "1,two"], "--batch-sizes '1,two'"),
    (["--batch-sizes", "0,1"], "'0'"),
])
def test_bad_batch_sizes_one_line_exit_2(args, named, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert _sweep_cli(tiny_models["vicuna"], out, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not out.exists()


def test_sweep_with_baseline_is_refused(tiny_models, tmp_path, capsys):
    base = tmp_path / "base.csv"
    base.write_text("batch_size,input_seq_len(Encoding),output_seq_len(Decoding),ResponseTime(s),"
                    "forward_first_token_time(ms),forward_next_token_time(ms),pre_next_token_time(ms),"
                    "post_next_token_time_post(ms)\n1,16,4,0.01,1.0,1.0,0.0,0.0\n")
    assert _sweep_cli(tiny_models["vicuna"], tmp_path / "out", "--batch-sizes", "1,2", "--baseline", str(base)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-sizes with --baseline" in err[0], err


def test_batch_sizes_from_a_config_file(tmp_path):
    from vicuna_bench.cli import parse_args

    config = tmp_path / "perf.ini"
    config.write_text("[perf]\nbatch_sizes = 1,2,4\n")
    ns = parse_args(["perf", "--config", str(config)], env={})
    assert ns.batch_sizes == "1,2,4"
    assert parse_args(["perf", "--config", str(config), "--batch-sizes", "8"], env={}).batch_sizes == "8"
    toml = tmp_path / "perf.toml"
    toml.write_text("[perf]\nbatch-sizes = [1, 2, 4]\n")
    assert sweep.parse_batch_sizes(parse_args(["perf", "--config", str(toml)], env={}).batch_sizes) == [1, 2, 4]
