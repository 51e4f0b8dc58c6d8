"""tokenizer_assets stores every stop id: the tokenizer's eos first, then the
generation_config's (instruct models end a turn with those), without repeats."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import GenerationConfig

from sparsec.models import eos_token_ids, tokenizer_assets
from sparsec.testing import make_byte_tokenizer

EOS, IM_START, IM_END = 257, 258, 259  # make_byte_tokenizer's specials


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_byte_tokenizer()
    assert tok.eos_token_id == EOS
    return tok


@pytest.mark.parametrize(
    "generation_config, expected",
    [
        (None, EOS),  # only the tokenizer's: a single int, as before
        (GenerationConfig(), EOS),
        (GenerationConfig(eos_token_id=EOS), EOS),
        (GenerationConfig(eos_token_id=[EOS]), EOS),
        (GenerationConfig(eos_token_id=IM_END), [EOS, IM_END]),  # Phi-3: <|end|>
        # The tokenizer's first, then the config's order, each id once.
        (GenerationConfig(eos_token_id=[IM_END, EOS, IM_START, IM_END]), [EOS, IM_END, IM_START]),
        ({"eos_token_id": [IM_START, IM_END]}, [EOS, IM_START, IM_END]),
    ],
)
def test_generation_ids_order_and_dedup(tokenizer, generation_config, expected):
    generation = tokenizer_assets(tokenizer, generation_config)["generation"]
    assert generation == {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": expected}


def test_llama_31_instruct_ids():
    # Llama 3.1 Instruct: tokenizer eos <|eot_id|> 128009, generation_config
    # [<|end_of_text|>, <|eom_id|>, <|eot_id|>].
    tok = SimpleNamespace(eos_token_id=128009)
    config = GenerationConfig(eos_token_id=[128001, 128008, 128009])
    assert eos_token_ids(tok, config) == [128009, 128001, 128008]


@pytest.mark.parametrize(
    "tokenizer_eos, config_eos, expected",
    [
        (None, [7, 3], [7, 3]),  # no tokenizer eos: the config's first comes first
        (None, None, None),
        (5, [True, "x", -1, 6.0, 9], [5, 9]),  # ints only
        (5, (9, 5), [5, 9]),
    ],
)
def test_eos_token_ids_edge_cases(tokenizer_eos, config_eos, expected):
    tok = SimpleNamespace(eos_token_id=tokenizer_eos)
    assert eos_token_ids(tok, SimpleNamespace(eos_token_id=config_eos)) == expected


def test_default_assets_unchanged(tokenizer):
    # Callers that pass no generation_config (e.g. bench weights_hash) keep their output.
    assert tokenizer_assets(tokenizer) == tokenizer_assets(tokenizer, None)
    assert tokenizer_assets(tokenizer)["generation"]["eos_token_id"] == EOS
