"""PromptTokenizer against Flux2KleinPipeline's own tokenization (the ids and mask its text encoder gets)."""

import logging

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from tiny_tokenizer import build_tokenizer
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from sfgrpo.models.prompts import PromptTokenizer

PROMPTS = [
    "Move the red cube to the left of the table.",
    "A dog",
    "",
    "Make the old house stand behind the window at night, 3 times; keep everything else unchanged!",
    "Ünïcödé prompt with émojis 🙂 and\nnew lines",
]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A pipeline-shaped folder: the tiny tokenizer in ``tokenizer/``."""
    root = tmp_path_factory.mktemp("klein")
    build_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def recorder(pipeline_dir):
    """A one-layer Qwen3 whose forward records the (input_ids, attention_mask) the pipeline passes it."""
    vocab = len(AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer"))
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    seen = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append((kwargs["input_ids"], kwargs["attention_mask"])), with_kwargs=True
    )
    return model, seen


def pipeline_tokens(recorder, folder, prompts, max_length):
    """The ids and mask Flux2KleinPipeline._get_qwen3_prompt_embeds feeds its text encoder."""
    model, seen = recorder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seen.clear()
    with torch.no_grad():
        Flux2KleinPipeline._get_qwen3_prompt_embeds(
            model, tokenizer, prompts, max_sequence_length=max_length, hidden_states_layers=(0,)
        )
    ids, mask = seen[0]
    return ids.numpy(), mask.numpy()


@pytest.mark.parametrize("max_length", [48, 512])
def test_tokens_match_pipeline(pipeline_dir, recorder, max_length):
    tok = PromptTokenizer(pipeline_dir, max_length=max_length)
    ids, mask = tok(PROMPTS)
    ref_ids, ref_mask = pipeline_tokens(recorder, pipeline_dir / "tokenizer", PROMPTS, max_length)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    # Real tokens then padding (right padding), and lengths differ across prompts.
    lengths = mask.sum(axis=1)
    assert len(set(lengths.tolist())) > 1
    for row, n in zip(ids, lengths, strict=True):
        assert (row[n:] == tok.tokenizer.pad_token_id).all()
    # The chat template wraps the prompt and ends with the empty think block.
    text = tok.render("A dog")
    assert text.startswith("<|im_start|>user\nA dog<|im_end|>\n<|im_start|>assistant\n")
    assert text.endswith("<think>\n\n</think>\n\n")


def test_truncation_warns_and_matches_pipeline(pipeline_dir, recorder, caplog):
    long_prompt = "The red cube moves to the left of the table " * 20
    tok = PromptTokenizer(pipeline_dir / "tokenizer", max_length=32)
    with caplog.at_level(logging.WARNING, logger="sfgrpo.models.prompts"):
        ids, mask = tok(["A dog", long_prompt])
    assert ids.shape == mask.shape == (2, 32)
    assert mask[1].all() and not mask[0].all()
    warnings = [r.getMessage() for r in caplog.records if r.name == "sfgrpo.models.prompts"]
    assert len(warnings) == 1, warnings
    assert "max_length=32" in warnings[0] and "The red cube moves" in warnings[0]
    assert long_prompt not in warnings[0]  # shortened
    ref_ids, ref_mask = pipeline_tokens(recorder, pipeline_dir / "tokenizer", ["A dog", long_prompt], 32)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


def test_bad_input(pipeline_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptTokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        PromptTokenizer(tmp_path)
    with pytest.raises(ValueError, match="max_length"):
        PromptTokenizer(pipeline_dir, max_length=0)
    tok = PromptTokenizer(pipeline_dir, max_length=16)
    with pytest.raises(TypeError, match="sequence of strings"):
        tok("a bare string")
    with pytest.raises(ValueError, match="empty"):
        tok([])
