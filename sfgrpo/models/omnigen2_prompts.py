"""Prompt tokenization for OmniGen2's Qwen2.5-VL text encoder, as ``OmniGen2Pipeline`` does it.

``OmniGen2Pipeline._apply_chat_template`` renders each instruction with the processor's tokenizer's chat
template as two turns, a fixed system message and the user's instruction, with
``add_generation_prompt=False`` (the text ends with the user turn's ``<|im_end|>\\n``); the empty negative
prompt is rendered the same way. ``_get_qwen2_prompt_embeds`` then tokenizes one prompt per call with
``padding="longest"`` and no effective length limit (the pipeline's ``max_sequence_length`` is None).

Here every prompt is padded on the RIGHT to a fixed ``max_length`` (static shapes compile once), with an
attention mask: the text encoder is causal and the OmniGen2 transformer masks text padding, so every valid
token's features equal the pipeline's. Prompts longer than ``max_length`` are truncated (their end is cut),
which the pipeline never does, with a logged warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_log = logging.getLogger(__name__)

SUBFOLDER = "processor"  # where an OmniGen2 folder keeps the Qwen2.5-VL processor (and its tokenizer)
SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."
DEFAULT_MAX_LENGTH = 256  # the default of the pipeline's encode_prompt(max_sequence_length=...)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_SHOWN_CHARS = 80  # how much of a truncated prompt the warning quotes


def resolve_folder(path: str | os.PathLike) -> Path:
    """The tokenizer folder: ``path/processor`` (an OmniGen2 folder) or ``path`` itself."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist or is not a folder")
    for cand in (path / SUBFOLDER, path):
        if any((cand / f).is_file() for f in _TOKENIZER_FILES):
            return cand
    raise FileNotFoundError(
        f"{str(path)!r} holds no tokenizer: none of {list(_TOKENIZER_FILES)} in it or in {path / SUBFOLDER}"
    )


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


class OmniGen2PromptTokenizer:
    """Prompts -> (ids, mask), each (B, max_length) int32, right-padded, rendered as OmniGen2's pipeline.

    ``path`` is a tokenizer folder or an OmniGen2 folder with ``processor/``; it is loaded with
    ``transformers.AutoTokenizer`` from local files only (what ``processor.tokenizer`` is upstream).
    """

    def __init__(self, path: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415 - heavy import, only when a tokenizer is built

        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        self.max_length = max_length
        self.folder = resolve_folder(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        if self.tokenizer.pad_token is None:
            raise ValueError(f"tokenizer in {self.folder} has no pad token; max_length padding needs one")
        if not self.tokenizer.chat_template:
            raise ValueError(f"tokenizer in {self.folder} has no chat template")
        # Valid tokens first: the transformer's text mask is a length (see the module docstring).
        self.tokenizer.padding_side = "right"

    @property
    def vocab_size(self) -> int:
        """Number of token ids (base vocabulary plus added tokens)."""
        return len(self.tokenizer)

    def render(self, prompt: str) -> str:
        """The chat-template text of one instruction (``OmniGen2Pipeline._apply_chat_template``)."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """prompts (B strings) -> token ids (B, max_length) int32 and attention mask (B, max_length) int32,
        1 for the valid tokens, which come first."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a sequence of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty")
        texts = [self.render(p) for p in prompts]
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        for prompt, n in zip(prompts, lengths, strict=True):
            if n > self.max_length:
                _log.warning(
                    "prompt %r is %d tokens with the chat template, over max_length=%d: %d tokens are cut "
                    "from its %s (OmniGen2's pipeline would keep them; raise max_text_length)",
                    _shorten(prompt),
                    n,
                    self.max_length,
                    n - self.max_length,
                    self.tokenizer.truncation_side,
                )
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        mask = np.asarray(enc["attention_mask"], dtype=np.int32)
        return ids, mask
