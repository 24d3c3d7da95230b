"""Reading Hugging Face checkpoints per rank, and cutting them N ways.

A rank reads only its slices: safetensors files are memory-mapped and sliced
with ``get_slice``, ``pytorch_model.bin`` files are opened with
``torch.load(weights_only=True, mmap=True)``.  Pickled weights are never
unpickled beyond what ``weights_only`` allows.  A slice is a view on the
mapped file; :func:`load_rank_weights` converts it straight into its final
place in the model (one pass, no intermediate copy), so loading a rank needs
its share of memory and not more.

Two directory kinds load:

* an *uncut* HF directory (``config.json`` + ``model.safetensors`` or a
  sharded index or ``pytorch_model.bin``): every rank slices what it needs;
* a *cut* directory in the vendor layout (``tokenizer/``,
  ``part_model/<rank>/``, ``manifest.json``): rank r reads part r, checked
  against the manifest's sha256 and world size; without ``manifest.json``
  it is the vendor tool's own cut, read the same way without checksums
  (:mod:`vicuna_bench.vendor_cut`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .config import ModelArgs
from .errors import UserError
from .sharding import VOCAB_PARALLEL, ShardPlan
from .vendor_cut import MANIFEST, check_vendor_cut, is_vendor_cut

log = logging.getLogger("vicuna_bench")

CUT_FORMAT = "vicuna-bench-cut/1"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the one name -> torch table
_CONFIG_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # config.json's torch_dtype -> name


def checkpoint_dtype(args: ModelArgs) -> str:
    """The dtype name the checkpoint states (``torch_dtype`` in config.json); fp16 where it states none."""
    return _CONFIG_DTYPES.get((args.torch_dtype or "").replace("torch.", ""), "fp16")


class TensorReader:
    """Name -> tensor (or a slice of it) over the weight files of one HF directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        index_st = directory / "model.safetensors.index.json"
        index_bin = directory / "pytorch_model.bin.index.json"
        if index_st.is_file():
            self._read_index(index_st)
        elif (directory / "model.safetensors").is_file():
            self._add_file(directory / "model.safetensors")
        elif index_bin.is_file():
            self._read_index(index_bin)
        elif (directory / "pytorch_model.bin").is_file():
            self._add_file(directory / "pytorch_model.bin")
        else:
            raise UserError(
                f"{directory}: no weights found (expected model.safetensors, "
                "model.safetensors.index.json, pytorch_model.bin or its index)"
            )

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{index}: not a valid weight index ({exc})") from None
        for name, fname in weight_map.items():
            path = self.directory / fname
            if not path.is_file():
                raise UserError(f"{index}: weight file {fname!r} (for {name}) is missing")
            self._where[name] = path

    def _add_file(self, path: Path) -> None:
        for name in self._handle(path).keys():
            self._where[name] = path

    def _handle(self, path: Path):
        handle = self._open.get(path)
        if handle is None:
            try:
                if path.suffix == ".safetensors":
                    handle = safe_open(str(path), framework="pt")
                else:
                    handle = _BinFile(path)
            except UserError:
                raise
            except Exception as exc:  # corrupt header, truncated file, ...
                raise UserError(f"{path}: cannot read weights ({exc})") from None
            self._open[path] = handle
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str, spec: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The tensor ``name``, or its ``(dim, start, stop)`` slice: a view on the memory-mapped file (no copy)."""
        if name not in self._where:
            raise UserError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        path = self._where[name]
        try:
            part = self._handle(path).get_slice(name)
            if spec is None:
                return part[:]
            dim, start, stop = spec
            index = (slice(None),) * dim + (slice(start, stop),)
            return part[index]
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{path}: cannot read tensor {name!r} ({exc})") from None

    def close(self) -> None:
        """Drop the open files (a mapping lives on while a view read from it does)."""
        self._open.clear()


class _BinFile:
    """``pytorch_model.bin`` behind the same small interface as ``safe_open``."""

    class _Slice:
        def __init__(self, tensor):
            self.tensor = tensor

        def get_shape(self):
            return list(self.tensor.shape)

        def __getitem__(self, index):
            return self.tensor[index]  # a view on the mapped file, as safetensors' slices are

    def __init__(self, path: Path):
        try:
            # str: torch 2.1 memory-maps only a file given by name (a Path is refused there).
            self.state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) files cannot be memory-mapped: every rank reads the whole file
            log.warning("%s: legacy (pre-zip) torch file: read whole into memory by every rank; "
                        "re-save it with torch.save or as safetensors to load only each rank's share", path)
            self.state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(self.state, dict):
            raise UserError(f"{path}: expected a state dict, got {type(self.state).__name__}")

    def keys(self):
        return self.state.keys()

    def get_slice(self, name):
        return self._Slice(self.state[name])


def is_cut_dir(path: Path) -> bool:
    return (path / "part_model").is_dir()


def config_path(model_path: Path) -> Path:
    """config.json of an uncut directory, or of part 0 of a cut one."""
    if is_cut_dir(model_path):
        return model_path / "part_model" / "0" / "config.json"
    return model_path / "config.json"


def tokenizer_dir(model_path: Path) -> Path:
    return model_path / "tokenizer" if is_cut_dir(model_path) else model_path


def read_model_args(model_path: Path) -> ModelArgs:
    """Validate a model directory and read its config (full-model values)."""
    if not model_path.is_dir():
        raise UserError(f"--model-path {model_path}: no such directory")
    cfg = config_path(model_path)
    if not cfg.is_file():
        raise UserError(f"{cfg}: missing (a model directory needs config.json)")
    args = ModelArgs.from_file(cfg)
    # generate() stops at generation_config.json's EOS ids too, as transformers does.
    gen = cfg.parent / "generation_config.json"
    if not gen.is_file():
        gen = tokenizer_dir(model_path) / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise UserError(f"{gen}: not valid JSON ({exc})") from None
        extra = [eos] if isinstance(eos, int) else list(eos or [])
        ids = tuple(dict.fromkeys(list(args.eos_token_ids) + [int(e) for e in extra]))
        args = dataclasses.replace(args, eos_token_ids=ids)
    return args


def check_cut_dir(model_path: Path, world_size: int) -> dict:
    """Check a cut directory's manifest (or the vendor's layout) against ``world_size``; return the manifest."""
    manifest_path = model_path / MANIFEST
    if is_vendor_cut(model_path):  # cut by the vendor's cut_weight.sh: no manifest, no checksums
        return check_vendor_cut(model_path, world_size, read_model_args(model_path))
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path}: missing (a cut directory needs the manifest written by 'vicuna-bench cut')")
    try:
        manifest = json.loads(manifest_path.read_text())
        cut_ws = int(manifest["world_size"])
        files = dict(manifest["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{manifest_path}: not a valid manifest ({exc})") from None
    if cut_ws != world_size:
        raise UserError(
            f"{model_path}: cut for world_size {cut_ws} (manifest.json) but --world-size is {world_size}; "
            f"run with --world-size {cut_ws} or cut the original again"
        )
    for rank in range(world_size):
        part = model_path / "part_model" / str(rank)
        if not part.is_dir():
            raise UserError(f"{part}: missing (cut for world_size {cut_ws})")
    return {"world_size": cut_ws, "files": files}


def verify_files(model_path: Path, files: dict[str, str], prefix: str) -> None:
    """Hash every manifest file under ``prefix``; a mismatch or absence is a UserError."""
    for rel, expected in sorted(files.items()):
        if not rel.startswith(prefix):
            continue
        path = model_path / rel
        if not path.is_file():
            raise UserError(f"{path}: missing (listed in {MANIFEST})")
        actual = sha256_file(path)
        if actual != expected:
            raise UserError(f"{path}: sha256 {actual[:16]}... does not match {MANIFEST} ({expected[:16]}...): file corrupted")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def parameter_names(args: ModelArgs) -> list[str]:
    """The tensor names of a Llama checkpoint, in model order (lm_head last)."""
    names = ["model.embed_tokens.weight"]
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        names += [
            p + "input_layernorm.weight",
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "post_attention_layernorm.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
        ]
    names += ["model.norm.weight", "lm_head.weight"]
    return names


def _open_rank_reader(model_path: Path, plan: ShardPlan) -> tuple[TensorReader, bool]:
    """The reader rank ``plan.rank`` reads from, and whether it is a cut part (checksums verified first)."""
    if is_cut_dir(model_path):
        manifest = check_cut_dir(model_path, plan.world_size)
        verify_files(model_path, manifest["files"], f"part_model/{plan.rank}/")
        return TensorReader(model_path / "part_model" / str(plan.rank)), True
    return TensorReader(model_path), False


def _rank_names(args: ModelArgs) -> list[str]:
    """The tensors a rank reads (``lm_head.weight`` left out when the embeddings are tied)."""
    return [n for n in parameter_names(args) if not (n == "lm_head.weight" and args.tie_word_embeddings)]


def _rank_view(reader: TensorReader, plan: ShardPlan, name: str, cut: bool) -> torch.Tensor:
    """This rank's part of ``name`` as a view on the file: a cut part's column/row-parallel tensors are
    already the share, everything else is sliced by ``plan`` (vocabulary padding rows not included)."""
    if cut and plan.is_tp_sliced(name):
        return reader.read(name)
    return reader.read(name, plan.slice_of(name))


def iter_rank_tensors(model_path: Path, plan: ShardPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's tensor) for every model parameter, as views on the checkpoint's files.

    ``lm_head.weight`` is left out when the embeddings are tied.  From an
    uncut directory each tensor is sliced by ``plan``; from a cut one, part
    ``plan.rank`` is read (checksums verified first).  Vocabulary-parallel
    tensors come padded to the rank's rows (a copy only where padding is due).
    """
    reader, cut = _open_rank_reader(model_path, plan)
    for name in _rank_names(plan.args):
        yield name, plan.take(name, lambda spec, name=name: _rank_view(reader, plan, name, cut))


@dataclasses.dataclass
class LoadStats:
    """What loading one rank read: bytes of checkpoint data (in the file's dtype) and tensors."""

    bytes_read: int = 0
    tensors: int = 0


def load_rank_weights(model_path: Path, plan: ShardPlan, targets: dict[str, torch.Tensor],
                      progress: bool = False) -> LoadStats:
    """Read rank ``plan.rank``'s share into ``targets`` (name -> preallocated tensor of its final dtype/device).

    Each tensor is read from the mapped file, converted and written once,
    straight into its target (rows of a fused matrix included): the rank
    needs its share of memory, plus on an accelerator one tensor in flight
    on the host.  Vocabulary padding rows are zeroed.  A target left
    unwritten, or a shape that disagrees with config.json, is an error.
    """
    from tqdm import tqdm

    reader, cut = _open_rank_reader(model_path, plan)
    names = _rank_names(plan.args)
    missing = set(targets) - set(names)
    if missing:  # the model has a parameter the checkpoint layout does not name: a bug
        raise RuntimeError(f"model parameters with no checkpoint tensor: {sorted(missing)}")
    stats = LoadStats()
    bar = tqdm(names, desc=f"load rank {plan.rank}/{plan.world_size}", unit="tensor", disable=not progress,
               leave=False)
    with torch.no_grad():
        for name in bar:
            target = targets[name]
            src = _rank_view(reader, plan, name, cut)
            rows = target.shape[0]
            if name in VOCAB_PARALLEL:  # the last ranks' rows may run past the vocabulary: zero padding
                dim, start, stop = plan.slice_of(name)
                rows = stop - start
            if tuple(src.shape) != (rows,) + tuple(target.shape[1:]):
                raise UserError(
                    f"{model_path}: tensor {name!r} has shape {tuple(src.shape)}, expected "
                    f"{(rows,) + tuple(target.shape[1:])} for rank {plan.rank} of {plan.world_size} "
                    "(config.json and weights disagree)"
                )
            target[:rows].copy_(src)
            if rows < target.shape[0]:
                target[rows:].zero_()
            stats.bytes_read += src.numel() * src.element_size()
            stats.tensors += 1
    reader.close()
    return stats


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      on_tensor=lambda: None) -> None:
    """Write ``tensors`` (views on mapped files welcome) as one safetensors file, a tensor at a time.

    The header is known from the shapes alone, so each tensor is made
    contiguous and written in turn: writing needs the memory of one tensor,
    not of the whole file (safetensors' ``save_file`` wants every tensor
    contiguous at once: a part's column-sliced matrices all copied together).
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has dtype {t.dtype} (supported: fp32, fp16, bf16)")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for t in tensors.values():
            f.write(memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B") if t.numel() else b"")
            on_tensor()


def cut_checkpoint(input_dir: Path, output_dir: Path, world_size: int, progress: bool = True) -> dict:
    """Write ``input_dir`` cut ``world_size`` ways in the vendor layout; return the manifest.

    Column/row-parallel tensors are stored as each rank's share (key/value
    heads replicated where ``world_size`` exceeds their count); embedding,
    lm_head and norms whole, as the vendor tool does.  Written to a temporary
    sibling and renamed, so a failure leaves nothing half-written.
    """
    from tqdm import tqdm

    input_dir = Path(input_dir)
    output_dir = Path(output_dir)
    args = read_model_args(input_dir)
    if is_cut_dir(input_dir):
        raise UserError(f"--input-dir {input_dir}: already a cut directory (part_model/ present); cut the original")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise UserError(f"--output-dir {output_dir}: exists and is not empty")
    plans = [ShardPlan(args, world_size, r) for r in range(world_size)]
    reader = TensorReader(input_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        tok = tmp / "tokenizer"
        tok.mkdir()
        from .chat import TOKENIZER_COMPANIONS, TOKENIZER_FILES

        for fname in TOKENIZER_FILES + TOKENIZER_COMPANIONS:
            if (input_dir / fname).is_file():
                shutil.copy2(input_dir / fname, tok / fname)
        config = json.loads((input_dir / "config.json").read_text())
        config["world_size"] = world_size
        names = parameter_names(args)
        if args.tie_word_embeddings and "lm_head.weight" not in reader:
            names.remove("lm_head.weight")  # tied: the embedding serves both
        bar = tqdm(total=world_size * len(names), desc=f"cut x{world_size}", unit="tensor", disable=not progress)
        for plan in plans:
            part = tmp / "part_model" / str(plan.rank)
            part.mkdir(parents=True)
            views = {name: reader.read(name, plan.slice_of(name) if plan.is_tp_sliced(name) else None)
                     for name in names}
            write_safetensors(part / "model.safetensors", views, {"format": "pt"}, on_tensor=lambda: bar.update(1))
            (part / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            del views
        bar.close()
        files = {
            str(p.relative_to(tmp)): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {"format": CUT_FORMAT, "world_size": world_size, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


__all__ = [
    "TensorReader",
    "cut_checkpoint",
    "LoadStats",
    "iter_rank_tensors",
    "load_rank_weights",
    "read_model_args",
    "checkpoint_dtype",
]
