"""A tiny Qwen3-style tokenizer built offline, for tests and tiny pipeline folders (no hub downloads).

:func:`build_tokenizer` trains a byte-level BPE (the ``tokenizers`` library, Qwen2's pre-tokenizer regex)
on a few hundred generated English sentences, wraps it as a transformers ``Qwen2TokenizerFast`` with
Qwen3's special tokens and a chat template that renders like Qwen3's, and saves it with
``save_pretrained``. ``AutoTokenizer.from_pretrained(directory)`` loads it with no network.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AddedToken, Qwen2TokenizerFast

VOCAB_SIZE = 600

# Qwen3's special tokens: <|endoftext|> is pad (and unk/eos for the base tokenizer), the chat markers,
# and the think block that the template emits when thinking is off.
ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, THINK, END_THINK)

# Qwen2's pre-tokenizer split (contractions, letter runs with one leading non-letter, single digits, ...).
_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# The rendering of Qwen3's template for plain-text messages: each turn is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens the assistant turn and, with
# enable_thinking=False, adds the empty think block. (Qwen3's full template also handles tools and
# reasoning content, which the pipeline never uses.)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_SUBJECTS = ("the red cube", "a blue sphere", "the green cone", "a small dog", "the old house", "a tall tree")
_VERBS = ("moves", "sits", "turns", "appears", "stands", "floats")
_PLACES = (
    "to the left of the table",
    "on top of the box",
    "behind the window",
    "next to the river",
    "under the bright sky",
    "in front of the wall",
)
_EXTRAS = ("", " slowly", " at night", ", 3 times", " with 2 friends", "!")


def sentences() -> list[str]:
    """Deterministic English training sentences (a few hundred), with digits and punctuation."""
    out = []
    for i, (s, v, p) in enumerate(itertools.product(_SUBJECTS, _VERBS, _PLACES)):
        out.append(f"{s.capitalize()} {v} {p}{_EXTRAS[i % len(_EXTRAS)]}.")
        out.append(f"Make {s} {v.rstrip('s')} {p}; keep everything else unchanged.")
    # The chat template's own words and blank lines, so they get merged tokens as in Qwen's vocabulary.
    out += ["user\nsystem\nassistant\n\n"] * 20
    return out


def _train(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences(), trainer=trainer)
    return tok


def build_tokenizer(directory: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> Path:
    """Writes the tiny tokenizer into ``directory`` (created if needed) and returns its path.

    The vocabulary has ``vocab_size`` entries at most (the 256 byte symbols, the special tokens and the
    learned merges); special token ids are 0..4 in ``SPECIAL_TOKENS`` order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trained = _train(vocab_size)
    vocab = trained.get_vocab()
    merges = [tuple(m) for m in _merges(trained)]
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    # As in Qwen3, the think markers are added tokens (matched whole) that are not special.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    tokenizer.save_pretrained(directory)
    return directory


def _merges(tok: Tokenizer) -> list[list[str]]:
    """The learned merges, in rank order, read from the serialised model."""
    model = json.loads(tok.to_str())["model"]
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
