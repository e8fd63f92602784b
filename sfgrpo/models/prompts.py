"""Prompt tokenization for FLUX.2-klein's Qwen3 text encoder, as ``Flux2KleinPipeline`` does it.

Each prompt becomes one user turn rendered with the tokenizer's chat template
(``add_generation_prompt=True, enable_thinking=False``, so the text ends with the assistant header and an
empty think block), then is tokenized with ``padding="max_length", truncation=True``. The pipeline
truncates silently (transformers does not warn either); here a truncated prompt logs a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_log = logging.getLogger(__name__)

SUBFOLDER = "tokenizer"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_SHOWN_CHARS = 80  # how much of a truncated prompt the warning quotes


def resolve_folder(path: str | os.PathLike, subfolder: str = SUBFOLDER) -> Path:
    """The tokenizer folder: ``path/<subfolder>`` (a pipeline folder) or ``path`` itself."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist or is not a folder")
    for cand in (path / subfolder, path):
        if any((cand / f).is_file() for f in _TOKENIZER_FILES):
            return cand
    raise FileNotFoundError(
        f"{str(path)!r} holds no tokenizer: none of {list(_TOKENIZER_FILES)} in it or in {path / subfolder}"
    )


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


class PromptTokenizer:
    """Prompts -> (ids, mask), each (B, max_length) int32, exactly as the klein pipeline tokenizes.

    ``path`` is a tokenizer folder or a pipeline folder with ``tokenizer/`` (``SUBFOLDER``); it is loaded
    with ``transformers.AutoTokenizer`` from local files only. A subclass renders another pipeline's chat
    turn (``render``) and may name another subfolder, padding side and truncation note.
    """

    SUBFOLDER = SUBFOLDER
    PADDING_SIDE: str | None = None  # None: the tokenizer's own
    TRUNCATION_NOTE = ""  # appended to the truncation warning

    def __init__(self, path: str | os.PathLike, max_length: int = 512) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415 - heavy import, only when a tokenizer is built

        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        self.max_length = max_length
        self.folder = resolve_folder(path, self.SUBFOLDER)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        if self.tokenizer.pad_token is None:
            raise ValueError(f"tokenizer in {self.folder} has no pad token; max_length padding needs one")
        if not self.tokenizer.chat_template:
            raise ValueError(f"tokenizer in {self.folder} has no chat template")
        if self.PADDING_SIDE is not None:
            self.tokenizer.padding_side = self.PADDING_SIDE

    @property
    def vocab_size(self) -> int:
        """Number of token ids (base vocabulary plus added tokens)."""
        return len(self.tokenizer)

    def render(self, prompt: str) -> str:
        """The chat-template text of one prompt (a single user turn, generation prompt, no thinking)."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """prompts (B strings) -> token ids (B, max_length) int32 and attention mask (B, max_length) int32."""
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
                    "from its %s%s",
                    _shorten(prompt),
                    n,
                    self.max_length,
                    n - self.max_length,
                    self.tokenizer.truncation_side,
                    self.TRUNCATION_NOTE,
                )
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        mask = np.asarray(enc["attention_mask"], dtype=np.int32)
        return ids, mask
