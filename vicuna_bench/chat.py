"""Prompt formatting and the tokenizer: the checkpoint's chat template, else Vicuna v1.1."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def load_tokenizer(directory: Path):
    """The HF tokenizer saved in ``directory`` (never from a hub, never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{directory}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None


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
