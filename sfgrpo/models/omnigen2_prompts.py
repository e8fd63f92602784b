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

import os

from sfgrpo.models.prompts import PromptTokenizer

SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."
DEFAULT_MAX_LENGTH = 256  # the default of the pipeline's encode_prompt(max_sequence_length=...)


class OmniGen2PromptTokenizer(PromptTokenizer):
    """Prompts -> (ids, mask), each (B, max_length) int32, right-padded, rendered as OmniGen2's pipeline.

    ``path`` is a tokenizer folder or an OmniGen2 folder with ``processor/`` (what ``processor.tokenizer``
    is upstream); the rest is ``PromptTokenizer``'s.
    """

    SUBFOLDER = "processor"
    PADDING_SIDE = "right"  # valid tokens first: the transformer's text mask is a length
    TRUNCATION_NOTE = " (OmniGen2's pipeline would keep them; raise max_text_length)"

    def __init__(self, path: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        super().__init__(path, max_length)

    def render(self, prompt: str) -> str:
        """The chat-template text of one instruction (``OmniGen2Pipeline._apply_chat_template``)."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
