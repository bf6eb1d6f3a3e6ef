"""GSAConfig: shipped configs, JSON round trip, validation errors, derivation, live keys."""

import json

import pytest
import torch

import gsa_compile
from gsa_compile import GSAConfig, GSAConfigError, load_config
from gsa_compile.hashing import layer_hash_weight, save_hash_weights

SHIPPED = {
    "Qwen/Qwen3-4B": (36, 2, (2048, 4), (2048, 4), False),
    "Qwen/Qwen3-32B": (64, 2, (32768, 12), (16384, 8), False),
    "Qwen/QwQ-32B": (64, 2, (32768, 12), (16384, 8), False),
    "Qwen/Qwen3-Coder-30B-A3B-Instruct": (48, 3, (32768, 12), (16384, 8), False),
    "deepseek-ai/DeepSeek-V2-Lite": (27, 2, (2048, 4), (2048, 4), True),
    "cognitivecomputations/DeepSeek-R1-AWQ": (61, 2, (16384, 4), (16384, 4), True),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_carry_the_seed_values(name):
    layers, dense_first, gpu, npu, mla = SHIPPED[name]
    config = load_config(name)
    assert config.num_hidden_layers == layers and config.is_mla == mla
    assert config.thresholds("cuda") == gpu and config.thresholds("npu") == npu
    policies = [config.layer_policy(layer) for layer in range(layers)]
    assert policies == ["dense"] * dense_first + ["sparse"] * (layers - dense_first - 3) + ["dense"] * 3
    assert config.chunk_size == 128 and config.chunk_repre_method == "max"
    assert config.must_select_blocks == [0, -2, -1]
    assert config.hash_bits == (576 if mla else 128)


def test_json_round_trip(tmp_path):
    config = GSAConfig(num_hidden_layers=4, head_dim=64, hash_bits=64, budget_tokens=512, selection_scope="shared",
                       top_k_ratio_per_layer=[1, 0.2, 0.2, 0.5], top_k_index_reuse=[-1, -1, 1, -1])
    path = tmp_path / "c.json"
    config.save(str(path))
    assert GSAConfig.load(str(path)) == config
    assert json.loads(path.read_text())["top_k_index_reuse"] == [-1, -1, 1, -1]
    assert load_config(str(path)) == config


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(bogus=1), "unknown config key"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
        (dict(chunk_size="128"), "chunk_size must be of type int"),
        (dict(hash_bits=100), "multiple of 8"),
        (dict(chunk_repre_method="mean"), "chunk_repre_method must be one of"),
        (dict(hash_weight_type="trained"), "hash_weight_type must be one of"),
        (dict(top_k_ratio_per_layer=[0.3] * 3), "has 3 entries but num_hidden_layers is 4"),
        (dict(top_k_ratio_per_layer=[1, 0.3, 0, 0.3]), r"top_k_ratio_per_layer\[2\]"),
        (dict(top_k_index_reuse=[-1, -1, 3, -1]), "only an earlier layer"),
        (dict(top_k_index_reuse=[-1, -1, 0, -1]), "layer 0 is dense"),
        (dict(top_k_ratio_per_layer=[0.3, 0.3, 1, 0.3], top_k_index_reuse=[-1, -1, 0, -1]), "layer 2 is dense"),
        (dict(top_k_index_reuse=[-1, -1, 1, 2]), "layer 2 is reuse"),
        (dict(budget_tokens=128, chunk_size=128), "must_select_blocks"),
        (dict(must_select_blocks=[0, "last"]), "must_select_blocks must be a list of integers"),
        (dict(hash_weight_type="fixed"), "hash_weight must name a safetensors file"),
        (dict(is_mla=True), "kv_lora_rank must be set"),
        (dict(gpu_seq_len_threshold=-1), "gpu_seq_len_threshold must be an integer >= 0"),
        (dict(is_mla="yes"), "is_mla must be of type bool"),
    ],
)
def test_bad_fields_name_the_field_and_what_is_allowed(changes, message):
    base = dict(num_hidden_layers=4, top_k_ratio_per_layer=[1, 0.3, 0.3, 0.3])
    base.update(changes)
    with pytest.raises(GSAConfigError, match=message):
        GSAConfig.from_dict(base)


def test_mla_bits_must_add_up():
    with pytest.raises(GSAConfigError, match="hash_bits_kv_lora \\+ hash_bits_qk_rope"):
        GSAConfig(is_mla=True, kv_lora_rank=512, qk_rope_head_dim=64, head_dim=576, hash_bits_kv_lora=512,
                  hash_bits_qk_rope=64, hash_bits=512)
    with pytest.raises(GSAConfigError, match="head_dim \\(128\\) must equal kv_lora_rank"):
        GSAConfig(is_mla=True, kv_lora_rank=512, qk_rope_head_dim=64, head_dim=128, hash_bits_kv_lora=512,
                  hash_bits_qk_rope=64, hash_bits=576)


def test_unknown_shipped_name_lists_the_shipped_ones():
    with pytest.raises(GSAConfigError, match="Qwen/Qwen3-4B"):
        load_config("Qwen/Qwen3-999B")


def test_policy_budget_and_thresholds_are_live():
    config = GSAConfig(num_hidden_layers=4, top_k_ratio_per_layer=[1, 0.25, 0.5, 0.5],
                       top_k_index_reuse=[-1, -1, -1, 1], chunk_size=64, cpu_seq_len_threshold=100,
                       cpu_concurrency_threshold=2, gpu_seq_len_threshold=7, must_select_blocks=[0])
    assert [config.layer_policy(i) for i in range(4)] == ["dense", "sparse", "sparse", "reuse"]
    assert config.num_selected_blocks(1, 64 * 40) == 10
    assert config.num_selected_blocks(2, 64 * 40) == 20
    assert config.num_selected_blocks(3, 64 * 40) == 10  # reuse uses its source's budget
    kwargs = config.attention_kwargs(2, "cpu")
    assert kwargs["seq_len_threshold"] == 100 and kwargs["concurrency_threshold"] == 2
    assert kwargs["chunk_size"] == 64 and kwargs["must_select"] == [0] and kwargs["top_k_ratio"] == 0.5
    assert config.attention_kwargs(2, "cuda")["seq_len_threshold"] == 7
    budgeted = config.replace(budget_tokens=640)
    assert budgeted.num_selected_blocks(1, 64 * 40) == 10 and budgeted.attention_kwargs(1, "cpu")["top_k_ratio"] is None
    with pytest.raises(GSAConfigError, match="layer 0 is dense"):
        config.attention_kwargs(0, "cpu")


def test_ratio_ceiling_is_not_fooled_by_float_rounding():
    from gsa_compile.functional import num_selected_blocks

    assert num_selected_blocks(1280, 128, top_k_ratio=0.3, must_select=[]) == 3
    assert num_selected_blocks(1281, 128, top_k_ratio=0.3, must_select=[]) == 4
    assert num_selected_blocks(128, 128, top_k_ratio=0.01, must_select=[0, -1]) == 1
    assert num_selected_blocks(100, 16, budget_tokens=10_000) == 7


def test_hash_seed_and_fixed_weights_change_the_weights(tmp_path):
    config = GSAConfig(num_hidden_layers=2, head_dim=16, hash_bits=16, top_k_ratio_per_layer=[0.5, 0.5])
    first = layer_hash_weight(config, 1, 2, 16)
    assert torch.equal(first, layer_hash_weight(config, 1, 2, 16))
    assert not torch.equal(first, layer_hash_weight(config.replace(hash_seed=9), 1, 2, 16))
    assert not torch.equal(first, layer_hash_weight(config, 0, 2, 16))
    trained = {0: torch.randn(2, 16, 16), 1: torch.randn(2, 16, 16)}
    save_hash_weights(trained, str(tmp_path / "w.safetensors"))
    fixed = GSAConfig.from_dict({**config.to_dict(), "hash_weight_type": "fixed", "hash_weight": "w.safetensors"},
                                source_dir=str(tmp_path))
    assert torch.equal(layer_hash_weight(fixed, 1, 2, 16), trained[1])
    with pytest.raises(GSAConfigError, match="has shape"):
        layer_hash_weight(fixed, 1, 4, 16)


def test_mla_weights_are_block_diagonal():
    config = load_config("deepseek-ai/DeepSeek-V2-Lite")
    weight = layer_hash_weight(config, 3, 2, 192)
    assert weight.shape == (2, 192, 576)
    assert weight[:, :128, 512:].abs().max() == 0 and weight[:, 128:, :512].abs().max() == 0


def test_for_model_derives_from_transformers_configs():
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(num_hidden_layers=6, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    config = GSAConfig.for_model(llama)
    assert config.num_hidden_layers == 6 and config.head_dim == 64 and config.hash_bits == 64
    assert [config.layer_policy(i) for i in range(6)] == ["dense", "dense", "sparse", "dense", "dense", "dense"]
    deepseek = transformers.DeepseekV3Config(num_hidden_layers=3, kv_lora_rank=32, qk_rope_head_dim=16,
                                             qk_nope_head_dim=32, v_head_dim=32)
    mla = GSAConfig.for_model(deepseek)
    assert mla.is_mla and mla.hash_bits == 48 and mla.kv_lora_rank == 32
    gpt2 = GSAConfig.for_model(transformers.GPT2Config(n_layer=5, n_embd=128, n_head=4), budget_tokens=512)
    assert gpt2.num_hidden_layers == 5 and gpt2.head_dim == 32 and gpt2.budget_tokens == 512


def test_for_model_on_plain_modules():
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(64, 4), torch.nn.MultiheadAttention(64, 4))
    config = GSAConfig.for_model(model)
    assert config.num_hidden_layers == 2 and config.head_dim == 16
    with pytest.raises(GSAConfigError, match="found no attention module"):
        GSAConfig.for_model(torch.nn.Linear(3, 3))


def test_package_exports():
    assert callable(gsa_compile.load_config) and gsa_compile.GSAConfig is GSAConfig


def test_attention_kwargs_follow_every_edit_and_are_the_callers_own():
    # Made once per state of the fields (attention calls read them every decode step): an edit,
    # also inside a list field, applies to the next call; a caller changing its copy changes nothing.
    config = GSAConfig(num_hidden_layers=8)
    mine = config.attention_kwargs(3, "cpu")
    mine["must_select"].append(9)
    mine["chunk_size"] = 1
    assert config.attention_kwargs(3, "cpu")["must_select"] == [0, -2, -1]
    assert config.attention_kwargs(3, "cpu")["chunk_size"] == 128
    config.chunk_size = 64
    config.must_select_blocks.append(5)
    config.gpu_seq_len_threshold = 7
    assert config.attention_kwargs(3, "cpu")["chunk_size"] == 64
    assert config.attention_kwargs(3, "cpu")["must_select"] == [0, -2, -1, 5]
    assert config.attention_kwargs(3, "cuda")["seq_len_threshold"] == 7
    config.chunk_size = -1
    with pytest.raises(GSAConfigError, match="chunk_size"):
        config.attention_kwargs(3, "cpu")


def test_a_bad_config_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"num_hidden_layers": 4, "chunk_size": -3}))
    with pytest.raises(GSAConfigError, match=r"mine\.json: chunk_size must be an integer >= 1, got -3"):
        GSAConfig.load(str(path))
