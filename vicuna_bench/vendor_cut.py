"""Directories cut by the vendor's ``cut_weight.sh``: recognised by layout, loaded as cut, without checksums.

The vendor's tool writes ``tokenizer/`` and ``part_model/<r>/`` for r in
0..N-1, each a ``save_pretrained`` directory whose ``config.json`` keeps the
full model's head counts and intermediate size and adds ``"world_size": N``
(shared/spec/REFERENCE.md, "Weight cutting").  That is the layout of our own
cut (:func:`vicuna_bench.checkpoint.cut_checkpoint`) less ``manifest.json``,
so the loader reads it the same way: q/k/v/gate/up/o/down as stored (each
rank's share), the whole embedding and lm_head sliced per rank by
:mod:`vicuna_bench.sharding`, norms whole.  What differs is checked here:

* the world size comes from the parts' ``config.json`` and directories, not a
  manifest, and a run at another world size is refused;
* there are no checksums to verify (said once, with how to make a verified cut);
* the vendor cuts k_proj/v_proj into N equal row chunks, so where N does not
  divide the key/value heads its ranks hold parts of heads, while our rule
  replicates whole heads: such a cut is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import ModelArgs
from .errors import UserError
from .settings import flag

log = logging.getLogger("vicuna_bench")

# Our own cut's manifest (vicuna_bench.checkpoint writes it): its absence is what tells a vendor cut apart.
MANIFEST = "manifest.json"

_ANNOUNCED: set[str] = set()  # directories whose missing checksums were already said, in this process


def is_vendor_cut(path: Path) -> bool:
    """A cut directory (``part_model/``) without our ``manifest.json``: the vendor's tool made it."""
    return (path / "part_model").is_dir() and not (path / MANIFEST).exists()


def _part_world_size(config_file: Path) -> int | None:
    """``"world_size"`` of one part's config.json, None when absent; UserError when unreadable or not >= 1."""
    try:
        doc = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{config_file}: missing (each part of a cut directory has its config.json)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc})") from None
    value = doc.get("world_size") if isinstance(doc, dict) else None
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{config_file}: world_size={value!r} is not an integer >= 1")
    return value


def cut_world_size(path: Path) -> int:
    """The world size a vendor cut was made for: its parts' ``world_size``, else the number of parts."""
    parts = path / "part_model"
    ranks = sorted(int(p.name) for p in parts.iterdir() if p.is_dir() and p.name.isdigit())
    if not ranks:
        raise UserError(f"{parts}: no part directories 0, 1, ... (a cut directory holds part_model/<rank>/)")
    declared = _part_world_size(parts / "0" / "config.json")
    world_size = declared if declared is not None else len(ranks)
    for rank in range(world_size):
        if rank not in ranks:
            raise UserError(f"{parts / str(rank)}: missing (cut for world_size {world_size})")
        other = _part_world_size(parts / str(rank) / "config.json")
        if other is not None and other != world_size:
            raise UserError(f"{parts / str(rank) / 'config.json'}: world_size {other} disagrees with part 0's "
                            f"{world_size} (parts of different cuts mixed)")
    extra = [r for r in ranks if r >= world_size]
    if extra:
        raise UserError(f"{parts / str(extra[0])}: a part beyond world_size {world_size} "
                        "(parts of different cuts mixed)")
    return world_size


def check_vendor_cut(path: Path, world_size: int, args: ModelArgs) -> dict:
    """Check a vendor cut against ``world_size`` and our split rule; ``{"world_size": N, "files": {}}``.

    ``files`` is empty: there are no checksums to verify (the loader's
    verification then has nothing to do).  Says so once per directory.
    """
    cut_ws = cut_world_size(path)
    if cut_ws != world_size:
        raise UserError(
            f"{path}: cut for world_size {cut_ws} (part_model/0/config.json, the vendor's cut_weight.sh layout) "
            f"but {flag('model.world_size')} is {world_size}; run with {flag('model.world_size')} {cut_ws}, or cut "
            f"the original for {world_size} with 'vicuna-bench cut --world-size {world_size}'"
        )
    if args.n_kv_heads % cut_ws:
        raise UserError(
            f"{path}: the vendor's cut splits num_key_value_heads={args.n_kv_heads} into {cut_ws} equal row chunks, "
            f"parts of heads, which this engine does not run (it gives each rank whole key/value heads); cut the "
            f"original with 'vicuna-bench cut --world-size {cut_ws}' (scripts/cut_weight.sh --float {cut_ws})"
        )
    key = str(path.resolve())
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        log.info(
            "%s: cut by the vendor's cut_weight.sh (no %s): no checksums to verify; for a verified cut, cut the "
            "original with 'vicuna-bench cut --input-dir ORIGINAL --output-dir OUT --world-size %d' "
            "(scripts/cut_weight.sh --float %d)", path, MANIFEST, cut_ws, cut_ws,
        )
    return {"world_size": cut_ws, "files": {}}
