"""GSA under transformers' tensor parallelism, two CPU processes (gloo): every rank's sites hold
its KV heads' rows of the model's hash weights, and TP 2 generates what TP 1 generates."""

import importlib.util

import pytest
import torch

from gsa_compile.hashing import layer_hash_weight, save_hash_weights

from .conftest import WORLD, run_ranks

KV_HEADS, HEAD_DIM, LAYERS = 4, 16, 3

if importlib.util.find_spec("accelerate") is None:
    pytest.skip("transformers loads a model with tp_plan only with accelerate installed", allow_module_level=True)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank of a two-process run of tp_worker.py wrote, by rank."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=256, eos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    # Calibrated weights stand-in: any float weights of the model's shape, in the fixed format.
    from gsa_compile import GSAConfig

    drawn = GSAConfig(num_hidden_layers=LAYERS, head_dim=HEAD_DIM, hash_bits=16, hash_seed=99)
    save_hash_weights({layer: layer_hash_weight(drawn, layer, KV_HEADS, HEAD_DIM) for layer in range(LAYERS)},
                      str(root / "weights.safetensors"))
    return run_ranks("tp_worker.py", root, root / "model", root / "weights.safetensors")


CASES = ("full_budget", "small_budget", "small_budget_static", "small_budget_fixed")


@pytest.mark.parametrize("case", CASES)
def test_tp2_generates_the_tokens_of_tp1(ranks, case):
    for rank in ranks:
        result = rank[case]
        assert result["sparse_calls"] > 0
        assert torch.equal(result["tokens"], result["whole_tokens"])
        torch.testing.assert_close(result["scores"], result["whole_scores"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_its_kv_heads_rows_of_the_model_weights(ranks, case):
    for index, rank in enumerate(ranks):
        result = rank[case]
        assert set(result["weights"]) == {0, 2}  # layer 1 reuses layer 0's selection
        for layer, weight in result["weights"].items():
            shard = result["shards"][layer]
            assert (shard.first, shard.count, shard.total) == (index * KV_HEADS // WORLD, KV_HEADS // WORLD, KV_HEADS)
            assert torch.equal(weight, result["whole_weights"][layer][shard.first: shard.first + shard.count])


def test_small_budget_selects(ranks):
    """The small budget changes the output (so equal tokens above depend on equal selections);
    the full budget gives dense attention's."""
    result = ranks[0]["small_budget"]
    assert (result["whole_scores"] - result["dense_scores"]).abs().max() > 1e-3
    full = ranks[0]["full_budget"]
    torch.testing.assert_close(full["whole_scores"], full["dense_scores"], atol=1e-4, rtol=1e-4)


def test_fixed_weights_are_the_files(ranks):
    from gsa_compile import GSAConfig

    drawn = GSAConfig(num_hidden_layers=LAYERS, head_dim=HEAD_DIM, hash_bits=16, hash_seed=99)
    whole = ranks[0]["small_budget_fixed"]["whole_weights"]
    assert torch.equal(whole[0], layer_hash_weight(drawn, 0, KV_HEADS, HEAD_DIM))
