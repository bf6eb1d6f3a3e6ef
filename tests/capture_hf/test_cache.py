"""The codes state: each key encoded once, codes follow every cache operation, every cache kind."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, StaticCache

from gsa_compile.capture.hf import cache_argument, optimize_transformers
from gsa_compile.capture.hf_attention import DecodeStep
from gsa_compile.capture.hf_cache import CodesDynamicLayer, CodesStaticLayer

from .helpers import CHUNK, assert_codes_match_keys, decode_logits, generated_cache, gsa_config
from .tiny_models import VOCAB, build

PROMPT = 40
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def pair():
    original = build("llama")
    return original, optimize_transformers(copy.deepcopy(original), gsa_config(original))


def _prompt(batch=1, length=PROMPT, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_each_key_is_encoded_once(pair):
    _, model = pair
    model.gsa_runtime.reset_stats()
    out = model.generate(_prompt(), max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    # generate feeds back all new tokens but the last: PROMPT + NEW_TOKENS - 1 keys enter the cache.
    assert generated_cache(out).get_seq_length() == PROMPT + NEW_TOKENS - 1
    encoded = {site.layer: site.stats.encoded_tokens for site in model.gsa_runtime.sites.values()}
    assert encoded == {0: 0, 1: PROMPT + NEW_TOKENS - 1, 2: 0, 3: PROMPT + NEW_TOKENS - 1}
    assert assert_codes_match_keys(generated_cache(out)) == 2


def test_beam_search_reorders_codes(pair):
    original, model = pair
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False, return_dict_in_generate=True)
    out = model.generate(_prompt(batch=2), **kwargs)
    expected = original.generate(_prompt(batch=2), **kwargs)
    assert torch.equal(out.sequences, expected.sequences)
    assert assert_codes_match_keys(generated_cache(out)) == 2


def test_sampling_matches_original_at_full_budget(pair):
    original, model = pair
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    got = model.generate(_prompt(), **kwargs)
    torch.manual_seed(7)
    assert torch.equal(got, original.generate(_prompt(), **kwargs))


def test_left_padding_matches_original_and_never_selects_padding():
    original = build("llama")
    prompts = _prompt(batch=2, length=64)
    mask = torch.ones_like(prompts)
    mask[0, : 3 * CHUNK + 2] = 0  # row 0: three whole blocks of padding, then a partial one
    prompts = prompts.masked_fill(mask == 0, original.config.pad_token_id)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)

    full = optimize_transformers(copy.deepcopy(original), gsa_config(original))
    assert torch.equal(full.generate(prompts, **kwargs), original.generate(prompts, **kwargs))

    small = optimize_transformers(full, gsa_config(original, budget_tokens=3 * CHUNK))
    _, cache = decode_logits(small, prompts, NEW_TOKENS, attention_mask=mask)
    # One more decode step with a DecodeStep of our own, to read the selection it made.
    step = DecodeStep(small.gsa_runtime, cache)
    longer = torch.cat([mask, torch.ones(2, NEW_TOKENS + 1, dtype=mask.dtype)], dim=-1)
    with torch.no_grad():
        small(prompts[:, -1:], attention_mask=longer, use_cache=True, gsa_step=step, **{cache_argument(small): cache})
    blocks = step.selections[1]
    assert cache.get_seq_length() > 2 * 3 * CHUNK  # the cache holds more blocks than the 3 selected
    # Row 0's blocks 0-2 are all padding: never selected, not even must-select block 0.
    assert not torch.isin(blocks[0], torch.tensor([0, 1, 2])).any()
    assert (blocks >= 0).sum(-1).eq(3).all()


def test_static_cache_matches_original(pair):
    original, model = pair
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    out = model.generate(_prompt(), **kwargs)
    assert torch.equal(out.sequences, original.generate(_prompt(), **kwargs).sequences)
    cache = generated_cache(out)
    assert isinstance(cache.layers[1], CodesStaticLayer)
    assert assert_codes_match_keys(cache) == 2


def test_crop_and_batch_operations_keep_codes_aligned(pair):
    _, model = pair
    cache = DynamicCache(config=model.config)
    decode_logits(model, _prompt(batch=3), 4, cache=cache)
    assert isinstance(cache.layers[1], CodesDynamicLayer)
    cache.crop(-5)
    assert cache.get_seq_length() == PROMPT + 4 - 5
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([4, 0, 3]))
    cache.reorder_cache(torch.tensor([2, 2, 1]))
    assert cache.layers[1].codes.shape[:3] == (3, 2, PROMPT - 1)
    assert assert_codes_match_keys(cache) == 2


def test_filled_plain_cache_is_encoded_once_when_it_reaches_gsa(pair):
    original, model = pair
    cache = DynamicCache(config=original.config)
    with torch.no_grad():
        original(_prompt(), use_cache=True, **{cache_argument(original): cache})
    model.gsa_runtime.reset_stats()
    expected, _ = decode_logits(original, _prompt()[:, -1:], 3, cache=copy.deepcopy(cache))
    got, _ = decode_logits(model, _prompt()[:, -1:], 3, cache=cache)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.gsa_runtime.sites[1].stats.encoded_tokens == PROMPT + 4
    assert model.gsa_runtime.sites[1].stats.sparse_calls == 4


def test_static_cache_passed_to_forward(pair):
    original, model = pair
    name = cache_argument(model)
    static = StaticCache(config=model.config, max_cache_len=PROMPT + 8)
    expected, _ = decode_logits(original, _prompt(), 4, cache=StaticCache(config=original.config, max_cache_len=PROMPT + 8))
    got, _ = decode_logits(model, _prompt(), 4, cache=static)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert name in ("cache", "past_key_values")
    assert assert_codes_match_keys(static) == 2


@pytest.mark.parametrize("is_mla, code_heads", [(True, 1), (False, None)])
def test_mla_codes_are_codes_of_latent_or_expanded_keys(is_mla, code_heads):
    original = build("deepseek_v3")
    config = gsa_config(original)
    if not is_mla:  # selection over the expanded per-head keys
        head_dim = original.config.qk_nope_head_dim + original.config.qk_rope_head_dim
        config = config.replace(is_mla=False, head_dim=head_dim, hash_bits=8 * -(-head_dim // 8))
    model = optimize_transformers(original, config)
    out = model.generate(_prompt(), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = generated_cache(out)
    assert cache.layers[1].codes.shape[1] == (code_heads or original.config.num_attention_heads)
    assert assert_codes_match_keys(cache) == 2


def test_reoptimizing_reencodes_a_cache_once_with_the_new_weights():
    original = build("llama")
    model = optimize_transformers(original, gsa_config(original))
    cache = DynamicCache(config=model.config)
    decode_logits(model, _prompt(), 2, cache=cache)
    model = optimize_transformers(model, gsa_config(original, hash_seed=5))
    decode_logits(model, _prompt()[:, :1], 1, cache=cache)
    assert model.gsa_runtime.sites[1].stats.encoded_tokens == PROMPT + 2 + 2
    assert assert_codes_match_keys(cache) == 2


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_key_norms_are_stored_beside_codes(cache_implementation):
    original = build("llama")
    model = optimize_transformers(copy.deepcopy(original), gsa_config(original, key_norm_weighting=True))
    kwargs = dict(max_new_tokens=6, num_beams=2, do_sample=False, return_dict_in_generate=True,
                  cache_implementation=cache_implementation)
    out = model.generate(_prompt(), **kwargs)
    assert torch.equal(out.sequences, original.generate(_prompt(), **kwargs).sequences)
    assert assert_codes_match_keys(generated_cache(out)) == 2


def test_codes_stay_aligned_while_gsa_is_disabled(pair):
    from gsa_compile.capture.hf import gsa_disabled

    original, model = pair
    cache = DynamicCache(config=model.config)
    decode_logits(model, _prompt(), 2, cache=cache)
    with gsa_disabled(model):
        decode_logits(model, _prompt()[:, :1], 2, cache=cache)
    assert cache.get_seq_length() == PROMPT + 2 + 3
    assert assert_codes_match_keys(cache) == 2
