"""A tensor-parallel rank's hash weight: its KV heads' rows of the model's (one process)."""

import pytest
import torch

from gsa_compile import GSAConfig
from gsa_compile.errors import GSAConfigError, GSAError
from gsa_compile.hashing import layer_hash_weight, save_hash_weights
from gsa_compile.sharding import HeadShard


@pytest.mark.parametrize("size", [1, 2, 4])
def test_rank_weights_are_rows_of_the_model_weight(size):
    config = GSAConfig(num_hidden_layers=2, head_dim=16, hash_bits=32, hash_seed=5)
    whole = layer_hash_weight(config, 1, 8, 16)
    parts = [layer_hash_weight(config, 1, 8 // size, 16, HeadShard.even(rank, size, 8 // size)) for rank in range(size)]
    assert torch.equal(torch.cat(parts), whole)


def test_fixed_weights_are_sliced_from_the_file(tmp_path):
    weights = {0: torch.randn(4, 16, 16)}
    save_hash_weights(weights, str(tmp_path / "w.safetensors"))
    config = GSAConfig(num_hidden_layers=1, head_dim=16, hash_bits=16, hash_weight_type="fixed",
                       hash_weight=str(tmp_path / "w.safetensors"))
    assert torch.equal(layer_hash_weight(config, 0, 2, 16, HeadShard(2, 2, 4)), weights[0][2:])


def test_bad_shards_are_refused():
    config = GSAConfig(num_hidden_layers=1, head_dim=16, hash_bits=16)
    with pytest.raises(GSAConfigError, match="first=3, count=2, total=4"):
        HeadShard(3, 2, 4)
    with pytest.raises(GSAConfigError, match="0 <= rank < size"):
        HeadShard.even(2, 2, 4)
    with pytest.raises(GSAError, match="holds 2 KV heads but its keys have 4"):
        layer_hash_weight(config, 0, 4, 16, HeadShard(0, 2, 4))


@pytest.mark.parametrize("value", [(2, 2), (0,), (-1, 2), ("0", 2), (True, 2)])
def test_tensor_parallel_option_is_rank_and_size(value):
    from gsa_compile.capture.dynamo_backend import tensor_parallel_option

    with pytest.raises(GSAConfigError, match="tensor_parallel must be"):
        tensor_parallel_option(value)


def test_transformers_models_take_no_tensor_parallel_option():
    from transformers import LlamaConfig, LlamaForCausalLM

    import gsa_compile

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(GSAConfigError, match="tp_plan"):
        gsa_compile.optimize(model, tensor_parallel=(0, 2))
