"""Weights the vendor's cut_weight.sh already cut load as they are: same tokens as the uncut model, no re-cut.

The fixture cuts by the vendor's rules (tests/vendor_cut.py, written from
shared/spec/REFERENCE.md without our cutting code): ``.bin`` parts, no
manifest, the embedding and lm_head whole on every rank.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch


from tests.vendor_cut import make_vendor_cut
from vicuna_bench.errors import UserError
from vicuna_bench.vendor_cut import cut_world_size, is_vendor_cut

pytestmark = pytest.mark.unit

PROMPT = [5, 17, 99, 3, 250, 42]
STEPS = 6


@pytest.fixture(scope="module")
def vendor_cuts(tiny_models, tmp_path_factory):
    """The Vicuna-shaped tiny model (8 heads, 8 key/value heads, vocab 1001) cut 2 and 4 ways by the vendor's rule."""
    root = tmp_path_factory.mktemp("vendor-cut")
    return {ws: make_vendor_cut(tiny_models["vicuna"], root / f"vicuna-tiny_parallel_{ws}", ws) for ws in (2, 4)}


def test_the_fixture_is_the_vendors_layout(vendor_cuts):
    out = vendor_cuts[4]
    assert sorted(p.name for p in out.iterdir()) == ["part_model", "tokenizer"]  # no manifest.json
    assert sorted(p.name for p in (out / "part_model").iterdir()) == ["0", "1", "2", "3"]
    part = torch.load(out / "part_model" / "1" / "pytorch_model.bin", weights_only=True)
    conf = json.loads((out / "part_model" / "1" / "config.json").read_text())
    assert conf["world_size"] == 4 and conf["num_attention_heads"] == 8  # full-model values kept
    assert part["model.layers.0.self_attn.q_proj.weight"].shape == (16, 64)  # 64 rows / 4
    assert part["model.layers.0.self_attn.o_proj.weight"].shape == (64, 16)
    assert part["model.layers.0.mlp.down_proj.weight"].shape == (64, 32)  # intermediate 128 / 4
    assert part["model.embed_tokens.weight"].shape == part["lm_head.weight"].shape == (1001, 64)  # whole
    assert is_vendor_cut(out) and cut_world_size(out) == 4


def test_another_world_size_is_one_line_exit_2(vendor_cuts, capsys):
    from vicuna_bench.cli import main

    assert main(["run", "--model-path", str(vendor_cuts[2]), "--world-size", "4", "--prompt-ids", "5,6"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(err) == 1, err
    assert "cut for world_size 2" in err[0] and "--world-size is 4" in err[0] and "--world-size 2" in err[0]


def test_fewer_key_value_heads_than_ranks_is_refused(tiny_models, tmp_path):
    """The vendor cuts k/v into N row chunks (half heads here); our rule replicates whole heads: refuse, one line."""
    from vicuna_bench.spec import ModelChoices, resolve_engine_spec

    cut = make_vendor_cut(tiny_models["gqa"], tmp_path / "gqa_parallel_4", 4)  # 2 key/value heads over 4 ranks
    with pytest.raises(UserError) as err:
        resolve_engine_spec(ModelChoices(cut, 4, "cpu", "fp32", 64), progress=False)
    message = str(err.value)
    assert "num_key_value_heads=2 into 4" in message and "vicuna-bench cut --world-size 4" in message
    assert "\n" not in message
    # Where the heads divide, the same GQA model loads (2 key/value heads over 2 ranks).
    two = make_vendor_cut(tiny_models["gqa"], tmp_path / "gqa_parallel_2", 2)
    assert resolve_engine_spec(ModelChoices(two, 2, "cpu", "fp32", 64), progress=False).world_size == 2


@pytest.mark.parametrize("damage, needle", [
    ("drop_part", "part_model/3: missing (cut for world_size 4)"),
    ("mix_parts", "world_size 2 disagrees with part 0's 4"),
    ("extra_part", "part_model/4: a part beyond world_size 4"),
])
def test_incomplete_or_mixed_parts_are_named(vendor_cuts, tmp_path, damage, needle):
    out = tmp_path / "cut"
    shutil.copytree(vendor_cuts[4], out)
    parts = out / "part_model"
    if damage == "drop_part":
        shutil.rmtree(parts / "3")
    elif damage == "mix_parts":
        conf = json.loads((parts / "2" / "config.json").read_text())
        (parts / "2" / "config.json").write_text(json.dumps(dict(conf, world_size=2)))
    else:
        shutil.copytree(parts / "3", parts / "4")
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        cut_world_size(out)
