"""First-token and next-token latency of our engine beside transformers' ``generate``.

Same model, same machine, same run: the figures are reported as a ratio and
written to ``--perf-output-dir`` (default ``perf-results/``); the test never
fails on time, only if the two disagree on the greedy tokens (fp32: all of
them; bf16: the first, since rounding may let later ones drift) or a run is
not repeatable.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

from tests.specs import spec_for

pytestmark = pytest.mark.perf

SEQ_IN, SEQ_OUT, REPEATS = 256, 64, 3


class _TokenClock:
    """A transformers streamer that timestamps each new token."""

    def __init__(self):
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def _hf_run(model, prompt: torch.Tensor):
    clock = _TokenClock()
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=SEQ_OUT, min_new_tokens=SEQ_OUT,
                         do_sample=False, streamer=clock, pad_token_id=0)
    first = (clock.stamps[0] - start) * 1e3
    gaps = [(b - a) * 1e3 for a, b in zip(clock.stamps, clock.stamps[1:])]
    return out[0, prompt.shape[1]:].tolist(), first, statistics.mean(gaps)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_embedded_model_latency_vs_transformers(dtype, perf_output_dir, engine_factory, smollm2_path):
    from transformers import LlamaForCausalLM

    spec = spec_for(smollm2_path, 1, "cpu", dtype, max_seq_len=SEQ_IN + SEQ_OUT)
    engine = engine_factory(spec)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, engine.args.vocab_size, (1, SEQ_IN), generator=g)
    ids = prompt[0].tolist()
    engine.generate([ids], 4, ignore_eos=True)  # warm-up
    ours = [engine.generate([ids], SEQ_OUT, ignore_eos=True) for _ in range(REPEATS)]

    hf = LlamaForCausalLM.from_pretrained(str(smollm2_path), dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    hf.eval()
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        _hf_run(hf, prompt[:, :32])  # warm-up
        theirs = [_hf_run(hf, prompt) for _ in range(REPEATS)]

    row = {
        "model": "SmolLM2-135M-Instruct", "device": "cpu", "dtype": dtype, "world_size": 1,
        "seq_in": SEQ_IN, "seq_out": SEQ_OUT, "repeats": REPEATS, "threads": torch.get_num_threads(),
        "ours_first_token_ms": statistics.median(r.first_token_ms for r in ours),
        "ours_next_token_ms": statistics.median(r.next_token_ms for r in ours),
        "hf_first_token_ms": statistics.median(t[1] for t in theirs),
        "hf_next_token_ms": statistics.median(t[2] for t in theirs),
    }
    row["first_token_speedup"] = row["hf_first_token_ms"] / row["ours_first_token_ms"]
    row["next_token_speedup"] = row["hf_next_token_ms"] / row["ours_next_token_ms"]
    perf_output_dir.mkdir(parents=True, exist_ok=True)
    (perf_output_dir / f"engine_vs_transformers_{dtype}.json").write_text(json.dumps(row, indent=2) + "\n")
    print("\n" + json.dumps(row, indent=2))
    assert all(len(r.output_ids[0]) == SEQ_OUT for r in ours) and all(len(t[0]) == SEQ_OUT for t in theirs)
    assert all(r.output_ids == ours[0].output_ids for r in ours), "greedy decoding is not repeatable"
    if dtype == "fp32":
        assert ours[0].output_ids[0] == theirs[0][0], "greedy tokens differ from transformers"
    else:
        # bf16 rounds differently in the two implementations, so later tokens may drift apart once two logits
        # tie within bf16's precision; the first token, from the same prompt, must agree.
        assert ours[0].output_ids[0][0] == theirs[0][0][0], "bf16: first greedy token differs from transformers"
