"""Prompt formatting and the tokenizer: the checkpoint's chat template, else Vicuna v1.1.

A checkpoint that ships a SentencePiece ``tokenizer.model`` (every Llama-2
model, Vicuna included) is tokenized by the ``sentencepiece`` library
itself, as the vendor's SDK (``use_fast=False``) and FastChat do:
transformers' converted Llama tokenizer gives other ids for texts that
start with whitespace (``" Hello world"``: ``[15043, 3186]`` where
SentencePiece gives ``[29871, 15043, 3186]``).  Any other checkpoint gets
its transformers tokenizer (``tokenizer.json``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .config import read_json_object
from .errors import UserError

log = logging.getLogger("vicuna_bench")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# The files any tokenizer we can load would consist of (generation_config.json is not one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# What travels with them when a checkpoint is cut (vicuna_bench.checkpoint): templates, merges, special tokens.
TOKENIZER_COMPANIONS = ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                        "merges.txt", "generation_config.json")


class SentencePieceTokenizer:
    """The ``tokenizer.model`` of a Llama-style checkpoint, through the ``sentencepiece`` library.

    The slice of the transformers tokenizer interface vicuna-bench uses:
    ``tok(text)["input_ids"]``, ``decode``, ``chat_template`` and
    ``apply_chat_template``.  BOS / EOS are added as ``tokenizer_config.json``
    says (``add_bos_token`` default true, ``add_eos_token`` default false, as
    transformers' LlamaTokenizer).
    """

    def __init__(self, model_file: Path, processor, config: dict):
        self.model_file = model_file
        self.sp = processor
        self.add_bos = bool(config.get("add_bos_token", True))
        self.add_eos = bool(config.get("add_eos_token", False))
        self.bos_token_id = processor.bos_id()
        self.eos_token_id = processor.eos_id()
        self.bos_token = processor.id_to_piece(self.bos_token_id) if self.bos_token_id >= 0 else ""
        self.eos_token = processor.id_to_piece(self.eos_token_id) if self.eos_token_id >= 0 else ""
        specials = [p for p in (self.bos_token, self.eos_token) if p]
        self._special = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        template = config.get("chat_template")
        self.chat_template = template if isinstance(template, str) else None

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_file}, {len(self)} pieces)"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; a literal ``<s>`` / ``</s>`` in it (a rendered chat template) becomes its id.

        The text between special tokens is encoded piece by piece, each with
        SentencePiece's dummy prefix, as Meta's Llama-2 chat code concatenates
        ``encode()`` results.
        """
        ids: list[int] = []
        for i, part in enumerate(self._special.split(text) if self._special else [text]):
            if i % 2:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids += self.sp.encode(part)
        if add_special_tokens:
            if self.add_bos and self.bos_token_id >= 0:
                ids = [self.bos_token_id] + ids
            if self.add_eos and self.eos_token_id >= 0:
                ids = ids + [self.eos_token_id]
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens (``<s>``, ``</s>``, ``<unk>``) dropped or written as their pieces."""
        size = len(self)
        out, run = [], []
        for i in (int(i) for i in ids):
            if 0 <= i < size and not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                run.append(i)
            elif not skip_special_tokens:  # SentencePiece itself drops them: write them as transformers does
                out += [self.sp.decode(run), self.sp.id_to_piece(i) if 0 <= i < size else ""]
                run = []
        return "".join(out) + self.sp.decode(run)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False):
        """The checkpoint's own Jinja chat template (sandboxed), as transformers renders it."""
        if self.chat_template is None:
            raise UserError(f"{self.model_file.parent}/tokenizer_config.json: no chat_template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _read_tokenizer_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    return read_json_object(path) if path.is_file() else {}


def _sentencepiece(directory: Path, config: dict) -> SentencePieceTokenizer | None:
    """The SentencePiece tokenizer of ``directory``, or None when its tokenizer.model is not one.

    Llama-3's ``tokenizer.model`` is a tiktoken file, not a SentencePiece
    model; such a file falls through to transformers.
    """
    model_file = directory / "tokenizer.model"
    try:
        import sentencepiece
    except ImportError:
        raise UserError(
            f"{model_file}: reading a SentencePiece tokenizer needs the `sentencepiece` package "
            "(pip install sentencepiece)"
        ) from None
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_file.read_bytes())
    except (RuntimeError, OSError, TypeError):
        return None
    added = config.get("added_tokens_decoder") or {}
    beyond = sorted(int(i) for i in added if str(i).isdigit() and int(i) >= processor.get_piece_size())
    if beyond:  # tokens the SentencePiece model does not know: only transformers' tokenizer has them
        log.info("%s: tokenizer_config.json adds ids %s beyond the SentencePiece vocabulary", model_file, beyond[:5])
        return None
    return SentencePieceTokenizer(model_file, processor, config)


def load_tokenizer(directory: Path, required: bool = True):
    """The tokenizer saved in ``directory`` (never from a hub, never remote code).

    SentencePiece ``tokenizer.model`` first (see the module docstring), else
    transformers' AutoTokenizer.  Without tokenizer files: a UserError naming
    the directory, or None when not ``required``.
    """
    directory = Path(directory)
    if not has_tokenizer_files(directory):
        if not required:
            return None
        raise UserError(
            f"{directory}: no tokenizer files (expected tokenizer.model or tokenizer.json with tokenizer_config.json)"
        )
    config = _read_tokenizer_config(directory)
    if (directory / "tokenizer.model").is_file():
        tok = _sentencepiece(directory, config)
        if tok is not None:
            log.info(
                "tokenizer: SentencePiece %s (%d pieces, BOS %s, EOS %s)", tok.model_file, len(tok),
                "added" if tok.add_bos else "not added", "added" if tok.add_eos else "not added",
            )
            return tok
    if not (directory / "tokenizer.json").is_file() and not (directory / "vocab.json").is_file():
        if (directory / "tokenizer.model").is_file():
            raise UserError(f"{directory / 'tokenizer.model'}: not a SentencePiece model, and there is no tokenizer.json")
        named = config.get("tokenizer_class") or "a tokenizer"
        raise UserError(
            f"{directory}: tokenizer_config.json names {named} but its tokenizer.model (or tokenizer.json) is missing"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except ImportError as exc:
        raise UserError(f"{directory}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{directory}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    log.info("tokenizer: transformers %s from %s (%d tokens)", type(tok).__name__, directory, len(tok))
    return tok


def vicuna_v11_prompt(user_text: str) -> str:
    """One-turn Vicuna v1.1 conversation, open for the assistant's answer."""
    return f"{VICUNA_SYSTEM} USER: {user_text} ASSISTANT:"


def encode_prompt(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids for a user message: chat-formatted unless ``chat`` is False.

    With the checkpoint's own template the rendered text already carries any
    BOS it wants; the Vicuna v1.1 text and plain text get the tokenizer's
    default special tokens (BOS for Llama tokenizers).
    """
    if chat and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if chat:
        text = vicuna_v11_prompt(text)
    return list(tokenizer(text)["input_ids"])
