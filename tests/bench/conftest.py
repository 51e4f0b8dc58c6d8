"""The tiny model with a BPE tokenizer that has merges: llama.cpp refuses a "gpt2"
vocabulary whose merges list is empty (the shared tiny model's byte tokenizer)."""

from __future__ import annotations

import pytest

MERGES = [("t", "h"), ("h", "e"), ("Ġ", "t")]


def make_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from sparsec.testing import CHAT_TEMPLATE, SPECIAL_TOKENS

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    # specials keep the ids of the tiny config (bos 256, eos 257); merges come after
    vocab.update({t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)})
    vocab.update({a + b: 256 + len(SPECIAL_TOKENS) + i for i, (a, b) in enumerate(MERGES)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", vocab["<|bos|>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_bpe_dir(tiny_model, tmp_path_factory):
    from sparsec.models import save_model

    model, _ = tiny_model
    tokenizer = make_bpe_tokenizer()
    th, e = tokenizer.convert_tokens_to_ids(["th", "e"])
    assert tokenizer("the").input_ids[1:] == [th, e]  # the merges are used
    return save_model(model, tokenizer, tmp_path_factory.mktemp("bpe") / "tiny-bpe")
