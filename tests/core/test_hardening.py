"""Bad input never gives a silent wrong answer: each case is refused with a GSAError naming the
argument and what is allowed, or gives what docs/semantics.md says (non-finite values as in
SDPA, masked tokens never read, zeros for a row with nothing to attend)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import gsa_compile
from gsa_compile import GSAConfig, GSAConfigError, GSAError, GSAInputError
from gsa_compile import functional as gsa
from gsa_compile.kernels import cpu as cpu_kernels
from gsa_compile.kernels import reference as ref
from gsa_compile.kernels import validation

CHUNK = 4


def _inputs(batch=1, q_heads=4, kv_heads=2, length=12, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, 1, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    return q, k, v


def _sdpa_math(q, k, v, mask=None):
    """Dense SDPA's math definition (the fused CPU kernel zeroes a NaN query's row when no mask is
    given, the math backend and the definition keep it NaN)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


BACKENDS = {"reference": ref.sparse_attention, "cpu": cpu_kernels.sparse_attention}


def _run(backend, q, k, v, blocks, valid=None, bias=None, softcap=None):
    validation.check_sparse_attention(q, k, v, blocks, valid, bias, CHUNK)
    return BACKENDS[backend](q, k, v, blocks, valid, bias, CHUNK, None, softcap)


def _all_blocks(k):
    n = math.ceil(k.shape[2] / CHUNK)
    return torch.arange(n, dtype=torch.int32).expand(k.shape[0], k.shape[1], n).contiguous()


# ---------------------------------------------------------------------------- block ids
@pytest.mark.parametrize("blocks, words", [
    ([[0, 0, 1], [1, 2, -1]], ["more than once", "block 0"]),
    ([[0, 99, -1], [1, 2, -1]], ["blocks[0, 0, 1] = 99", "[0, 2]", "-1"]),
    ([[0, -1, 1], [1, 2, -1]], ["after a -1"]),
    ([[0, -3, -1], [1, 2, -1]], ["= -3", "[0, 2]"]),
])
def test_bad_block_ids_are_refused_by_the_op_and_the_functional_api(blocks, words):
    q, k, v = _inputs()
    blocks = torch.tensor([blocks], dtype=torch.int32)
    for call in (lambda: torch.ops.gsa.sparse_attention(q, k, v, blocks, None, None, CHUNK, None, None),
                 lambda: gsa.sparse_attention(q, k, v, blocks, chunk_size=CHUNK)):
        with pytest.raises(GSAInputError) as info:
            call()
        assert all(word in str(info.value) for word in words), str(info.value)


def test_block_ids_in_any_order_with_a_minus_one_tail_agree_across_backends():
    q, k, v = _inputs()
    blocks = torch.tensor([[[2, 0, -1], [1, -1, -1]]], dtype=torch.int32)
    expected = _run("reference", q, k, v, blocks)
    torch.testing.assert_close(_run("cpu", q, k, v, blocks), expected)
    torch.testing.assert_close(gsa.sparse_attention(q, k, v, blocks, chunk_size=CHUNK), expected)


def test_reuse_blocks_are_checked_at_the_functional_entry():
    q, k, v = _inputs()
    weight = gsa.hash_weights(2, 8, 16)
    reuse = torch.tensor([[[0, 0, -1], [0, 1, 2]]], dtype=torch.int32)
    with pytest.raises(GSAInputError, match=r"reuse_blocks\[0, 0\] lists block 0 more than once"):
        gsa.gsa_attention(q, k, v, weight, chunk_size=CHUNK, top_k_ratio=1.0, reuse_blocks=reuse)
    short = torch.tensor([[[0, 1], [0, 1]]], dtype=torch.int32)
    with pytest.raises(GSAInputError, match="reuse_blocks must be"):
        gsa.gsa_attention(q, k, v, weight, chunk_size=CHUNK, top_k_ratio=1.0, reuse_blocks=short)


def test_a_bool_attn_bias_is_refused():
    q, k, v = _inputs()
    bias = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    with pytest.raises(GSAInputError, match="attn_bias must be a float tensor.*valid"):
        gsa.sparse_attention(q, k, v, _all_blocks(k), chunk_size=CHUNK, attn_bias=bias)


# ---------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_nan_query_gives_nan_as_sdpa(backend, dtype):
    q, k, v = _inputs(dtype=dtype)
    q[0, 1, 0, 3] = float("nan")
    out = _run(backend, q, k, v, _all_blocks(k))
    expected = _sdpa_math(q, k, v)
    assert out[0, 1].isnan().all() and expected[0, 1].isnan().all()
    others = [0, 2, 3]
    torch.testing.assert_close(out[:, others].float(), expected[:, others].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_inf_in_an_attended_value_stays_inf(backend):
    q, k, v = _inputs()
    v[0, 0, 5, 2] = float("inf")
    out = _run(backend, q, k, v, _all_blocks(k))
    assert torch.isposinf(out[0, :2, 0, 2]).all()  # the two query heads of KV head 0
    assert torch.isfinite(out[0, 2:]).all()
    assert torch.equal(torch.isposinf(out), torch.isposinf(_sdpa_math(q, k, v)))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_non_finite_values_outside_the_attended_set_are_never_read(backend, softcap):
    q, k, v = _inputs()
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, 9] = False  # a masked key inside a selected block
    for tensor in (k, v):
        tensor[0, :, 4:8] = float("nan")  # block 1, not selected
        tensor[0, :, 9] = float("inf")
    blocks = torch.tensor([[[0, 2, -1], [2, 0, -1]]], dtype=torch.int32)
    out = _run(backend, q, k, v, blocks, valid=valid, softcap=softcap)
    assert torch.isfinite(out).all()
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[0, :, 4:8] = clean_v[0, :, 4:8] = 0
    clean_k[0, :, 9] = clean_v[0, :, 9] = 0
    expected = _run("reference", q, clean_k, clean_v, blocks, valid=valid, softcap=softcap)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_fully_masked_rows_give_zeros_as_sdpa(backend, dtype):
    q, k, v = _inputs(batch=2, dtype=dtype)
    q[1, 0, 0, 0] = float("nan")  # a row with nothing to attend gives zeros whatever its query holds
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1] = False
    valid[0, :4] = False
    blocks = torch.tensor([[[0, -1], [0, 1]], [[0, 1], [2, -1]]], dtype=torch.int32)
    out = _run(backend, q, k, v, blocks, valid=valid)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))  # KV head 0 selected only block 0
    mask = torch.zeros(2, 1, 1, 12, dtype=torch.bool)
    # SDPA agrees for a finite query (its additive masking keeps a NaN query's row NaN).
    assert torch.equal(_sdpa_math(q.nan_to_num(), k, v, mask)[1], out[1])
    # A per-head bias of -inf everywhere masks that head only.
    bias = torch.zeros(2, 4, 1, 12, dtype=dtype)
    bias[0, 3] = float("-inf")
    out = _run(backend, q, k, v, _all_blocks(k), bias=bias)
    assert torch.equal(out[0, 3], torch.zeros_like(out[0, 3])) and out[0, 2].abs().sum() > 0


def test_gsa_attention_at_full_budget_keeps_nan_like_dense_sdpa():
    q, k, v = _inputs(length=16)
    q[0, 0, 0, 0] = float("nan")
    weight = gsa.hash_weights(2, 8, 16)
    out = gsa.gsa_attention(q, k, v, weight, chunk_size=CHUNK, top_k_ratio=1.0)
    assert out[0, 0].isnan().all() and torch.isfinite(out[0, 1:]).all()


# ---------------------------------------------------------------------------- functional API arguments
def _gsa_call(**changes):
    q, k, v = _inputs(length=16)
    args = dict(query=q, key=k, value=v, weight=gsa.hash_weights(2, 8, 16), chunk_size=CHUNK, budget_tokens=8)
    args.update(changes)
    if "top_k_ratio" in changes and "budget_tokens" not in changes:
        args["budget_tokens"] = None
    return lambda: gsa.gsa_attention(**args)


def _mask(shape, dtype=torch.bool):
    return torch.ones(shape, dtype=dtype) if dtype == torch.bool else torch.zeros(shape, dtype=dtype)


q0, k0, v0 = _inputs(length=16)
BAD_CALLS = [
    ("budget_tokens=-5", _gsa_call(budget_tokens=-5), ["budget_tokens", ">= 1"]),
    ("budget_tokens=0", _gsa_call(budget_tokens=0, must_select=()), ["budget_tokens", ">= 1"]),
    ("budget_tokens=2.5", _gsa_call(budget_tokens=2.5), ["budget_tokens", "integer"]),
    ("top_k_ratio=-0.5", _gsa_call(top_k_ratio=-0.5), ["top_k_ratio", "> 0"]),
    ("top_k_ratio=nan", _gsa_call(top_k_ratio=float("nan")), ["top_k_ratio", "finite"]),
    ("top_k_ratio=inf", _gsa_call(top_k_ratio=float("inf")), ["top_k_ratio", "finite"]),
    ("both budgets", _gsa_call(top_k_ratio=0.5, budget_tokens=8), ["exactly one", "top_k_ratio", "budget_tokens"]),
    ("no budget", _gsa_call(budget_tokens=None), ["exactly one"]),
    ("must_select=None", _gsa_call(must_select=None), ["must_select", "list"]),
    ("must_select=5", _gsa_call(must_select=5), ["must_select", "list"]),
    ("must_select strings", _gsa_call(must_select=["0"]), ["must_select"]),
    ("mask L+3", _gsa_call(attn_mask=_mask((1, 1, 1, 19))), ["attn_mask", "(1, 1, 1, 19)", "[B, Hq, T, L]"]),
    ("mask batch 3", _gsa_call(attn_mask=_mask((3, 1, 1, 16))), ["attn_mask", "(3, 1, 1, 16)"]),
    ("int64 mask", _gsa_call(attn_mask=_mask((1, 1, 1, 16), torch.int64)), ["attn_mask", "bool", "float", "int64"]),
    ("float mask 3 heads", _gsa_call(attn_mask=_mask((1, 3, 1, 16), torch.float32)), ["attn_mask", "(1, 3, 1, 16)"]),
    ("mask 5 dims", _gsa_call(attn_mask=_mask((1, 1, 1, 1, 16))), ["attn_mask"]),
    ("L=0", _gsa_call(key=k0[:, :, :0], value=v0[:, :, :0]), ["at least one", "key"]),
    ("B=0", _gsa_call(query=q0[:0], key=k0[:0], value=v0[:0]), ["at least one", "batch"]),
    ("chunk_size=0", _gsa_call(chunk_size=0), ["chunk_size", "positive"]),
    ("chunk_size=True", _gsa_call(chunk_size=True), ["chunk_size"]),
    ("repre", _gsa_call(repre="mean"), ["repre", "'max'"]),
    ("scope", _gsa_call(scope="global"), ["scope", "'per_head'"]),
    ("softcap=0", _gsa_call(softcap=0.0), ["softcap", "> 0"]),
    ("threshold", _gsa_call(seq_len_threshold=-1), ["seq_len_threshold", ">= 0"]),
    ("is_causal", _gsa_call(is_causal=None), ["is_causal", "bool"]),
    ("weight list", _gsa_call(weight=[1.0]), ["weight", "tensor"]),
    ("weight dims", _gsa_call(weight=gsa.hash_weights(2, 4, 16)), ["weight", "dims"]),
    ("key_norms", _gsa_call(key_norms=torch.ones(1, 2, 3)), ["key_norms", "[B, Hkv, L]"]),
    ("query list", _gsa_call(query=[0.0]), ["query", "tensor"]),
    ("query int", _gsa_call(query=q0.long()), ["query", "float"]),
    ("encode empty", lambda: gsa.encode(k0[:, :, :0], gsa.hash_weights(2, 8, 16)), ["x", "at least one"]),
    ("encode list", lambda: gsa.encode([1.0], gsa.hash_weights(2, 8, 16)), ["x", "tensor"]),
    ("key_norms list", lambda: gsa.key_norms([1.0]), ["key", "tensor"]),
    ("select must", lambda: gsa.select_blocks(q0, gsa.encode(k0, gsa.hash_weights(2, 8, 16)),
                                              gsa.hash_weights(2, 8, 16), chunk_size=CHUNK, num_blocks=2,
                                              must_select=None), ["must_select"]),
    ("select num_blocks", lambda: gsa.select_blocks(q0, gsa.encode(k0, gsa.hash_weights(2, 8, 16)),
                                                    gsa.hash_weights(2, 8, 16), chunk_size=CHUNK, num_blocks=0,
                                                    must_select=()), ["num_blocks", ">= 1"]),
    ("num_selected ratio", lambda: gsa.num_selected_blocks(100, 8, top_k_ratio=float("nan")), ["top_k_ratio"]),
    ("num_selected keys", lambda: gsa.num_selected_blocks(-1, 8, budget_tokens=8), ["num_keys", ">= 0"]),
    ("num_selected both", lambda: gsa.num_selected_blocks(100, 8), ["exactly one"]),
    ("hash_weights", lambda: gsa.hash_weights(2, 8, 12), ["hash_bits", "multiple of 8"]),
    ("sparse valid list", lambda: gsa.sparse_attention(q0, k0, v0, _all_blocks(k0), chunk_size=CHUNK, valid=[True]),
     ["valid", "tensor"]),
    ("sparse scale", lambda: gsa.sparse_attention(q0, k0, v0, _all_blocks(k0), chunk_size=CHUNK, scale="x"),
     ["scale"]),
    ("sparse blocks float", lambda: gsa.sparse_attention(q0, k0, v0, _all_blocks(k0).float(), chunk_size=CHUNK),
     ["blocks", "int32"]),
]


@pytest.mark.parametrize("name, call, words", BAD_CALLS, ids=[case[0] for case in BAD_CALLS])
def test_every_bad_functional_argument_raises_a_gsa_error_naming_it(name, call, words):
    with pytest.raises(GSAError) as info:
        call()
    assert all(word in str(info.value) for word in words), str(info.value)


def test_a_tiny_ratio_still_selects_one_block():
    assert gsa.num_selected_blocks(40, 4, top_k_ratio=1e-12, must_select=()) == 1
    q, k, v = _inputs(length=16)
    out = gsa.gsa_attention(q, k, v, gsa.hash_weights(2, 8, 16), chunk_size=CHUNK, top_k_ratio=1e-12, must_select=())
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("fields, words", [
    (dict(top_k_ratio_per_layer=0.3), ["top_k_ratio_per_layer must be a list", "0.3"]),
    (dict(top_k_index_reuse=-1), ["top_k_index_reuse must be a list"]),
    (dict(must_select_blocks=None), ["must_select_blocks must be a list", "None"]),
    (dict(must_select_blocks=5), ["must_select_blocks must be a list", "5"]),
    (dict(top_k_ratio_per_layer=[float("nan")] * 2), ["top_k_ratio_per_layer[0]", "> 0"]),
    (dict(budget=2048), ["unknown config key(s) ['budget']", "allowed keys", "budget_tokens"]),
    (dict(num_hidden_layers="2"), ["num_hidden_layers", "int"]),
])
def test_bad_config_fields_are_named(fields, words):
    fields = {"num_hidden_layers": 2, **fields}
    with pytest.raises(GSAConfigError) as info:
        GSAConfig(**fields)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_for_model_overrides_name_unknown_keys_like_the_json_path():
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2))
    with pytest.raises(GSAConfigError, match=r"unknown config key\(s\) \['budget'\]; allowed keys"):
        GSAConfig.for_model(model, budget=2048)
    with pytest.raises(GSAConfigError, match=r"unknown config key\(s\) \['budget'\]; allowed keys"):
        GSAConfig.from_dict({"budget": 2048})


def test_a_non_utf8_or_missing_config_file_is_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"model_name": "\xff\xfe"}')
    with pytest.raises(GSAConfigError, match="not UTF-8"):
        GSAConfig.load(str(path))
    with pytest.raises(GSAConfigError, match="cannot read GSA config"):
        GSAConfig.load(str(tmp_path / "missing.json"))
    (tmp_path / "ok.json").write_text(json.dumps({"num_hidden_layers": 2, "model_name": "caf\u00e9"}), encoding="utf-8")
    assert GSAConfig.load(str(tmp_path / "ok.json")).model_name == "caf\u00e9"


def test_a_config_changed_after_construction_is_validated_on_use():
    config = GSAConfig(num_hidden_layers=6)
    config.chunk_size = 0
    with pytest.raises(GSAConfigError, match="chunk_size must be an integer >= 1, got 0"):
        config.attention_kwargs(3, "cpu")
    with pytest.raises(GSAConfigError, match="chunk_size"):
        config.num_selected_blocks(3, 4096)
    config.chunk_size = 128
    config.top_k_ratio_per_layer.pop()  # edited in place
    with pytest.raises(GSAConfigError, match="top_k_ratio_per_layer has 5 entries but num_hidden_layers is 6"):
        config.layer_policy(2)
    config.top_k_ratio_per_layer.append(1)
    assert config.layer_policy(2) == "sparse" and config.attention_kwargs(2, "cpu")["chunk_size"] == 128
    config.must_select_blocks = None
    with pytest.raises(GSAConfigError, match="must_select_blocks must be a list"):
        config.selection_source(2)


def test_optimize_revalidates_a_mutated_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    config = GSAConfig.for_model(model)
    config.top_k_ratio_per_layer = [0.5] * 3
    with pytest.raises(GSAConfigError, match="top_k_ratio_per_layer has 3 entries but num_hidden_layers is 6"):
        gsa_compile.optimize(model, config)


def test_restore_transformers_twice_is_a_no_op():
    from transformers import LlamaConfig, LlamaForCausalLM

    from gsa_compile.capture.hf import restore_transformers

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    implementation = model.config._attn_implementation
    gsa_compile.optimize(model)
    assert restore_transformers(model) is model
    assert restore_transformers(model) is model
    assert model.config._attn_implementation == implementation and not hasattr(model, "gsa_runtime")


def test_check_key_dim_names_the_head_dim_mismatch():
    config = GSAConfig(num_hidden_layers=2, head_dim=128)
    config.check_key_dim(1, 128)
    with pytest.raises(GSAConfigError, match=r"head_dim=128 but layer 1's keys have 16 dims; set head_dim=16"):
        config.check_key_dim(1, 16)
    mla = GSAConfig(num_hidden_layers=1, is_mla=True, head_dim=576, kv_lora_rank=512, qk_rope_head_dim=64,
                    hash_bits=576, hash_bits_kv_lora=512, hash_bits_qk_rope=64)
    mla.check_key_dim(0, 192)  # latents expanded into nope + rope dims
    with pytest.raises(GSAConfigError, match="qk_rope_head_dim"):
        mla.check_key_dim(0, 64)


# ---------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, words", [
    (["inspect", "notamodel"], ["gsa-compile inspect:", "notamodel"]),
    (["inspect", "decoder", "--config", "/nonexistent/gsa.json"], ["gsa-compile inspect:", "gsa.json"]),
    (["configs", "notaname"], ["gsa-compile configs:", "notaname"]),
    (["export-onnx", "notamodel", "--out", "/nonexistent/unused.onnx"], ["gsa-compile export-onnx:", "notamodel"]),
    (["demo", "--budget-tokens", "-5"], ["gsa-compile demo:", "--budget-tokens", "-5"]),
    (["calibrate", "--model", "/nonexistent/model", "--out", "/nonexistent/unused.safetensors"], ["gsa-compile calibrate:"]),
    (["eval", "--model", "/nonexistent/model"], ["gsa-compile eval:", "/nonexistent/model"]),
    (["npu-check"], ["gsa-compile npu-check:"]),
    (["bench", "--keys", "8"], ["gsa-compile bench:"]),
])
def test_a_failing_cli_command_prints_one_line_and_exits_non_zero(capsys, argv, words):
    from gsa_compile.cli import main

    if argv[0] in ("npu-check", "bench") and (torch.cuda.is_available() or hasattr(torch, "npu")):
        pytest.skip("this machine can run the command")
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and len(err) < 600, err
    assert all(word in err for word in words), err


def test_a_cli_usage_error_is_argparse_s_one_line_and_exit_2(capsys):
    from gsa_compile.cli import main

    with pytest.raises(SystemExit) as info:
        main(["demo", "--budget-tokens", "many"])
    assert info.value.code == 2 and "--budget-tokens" in capsys.readouterr().err.strip().splitlines()[-1]


def _tiny_module():
    return torch.nn.Sequential(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("call, error, words", [
    (lambda: gsa_compile.optimize("notamodel"), GSAInputError, ["nn.Module", "str"]),
    (lambda: gsa_compile.optimize(_tiny_module(), 5), GSAConfigError, ["config must be", "int"]),
    (lambda: gsa_compile.optimize(_tiny_module(), compiler="gcc"), GSAConfigError, ["compiler", "'gcc'"]),
    (lambda: gsa_compile.optimize(_tiny_module(), "no/such-config"), GSAConfigError, ["no/such-config", "shipped"]),
    (lambda: gsa_compile.inspect(_tiny_module(), torch.ones(1, 4), config=3.5), GSAConfigError, ["config must be"]),
    (lambda: gsa_compile.load_config("no/such-config"), GSAConfigError, ["no/such-config"]),
    (lambda: gsa_compile.export(_tiny_module(), (torch.ones(1, 4),), config=7), GSAConfigError, ["config must be"]),
    (lambda: gsa_compile.use_backend("cuda-fast").__enter__(), gsa_compile.GSABackendUnavailable, ["'cuda-fast'"]),
])
def test_every_public_entry_point_names_a_bad_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert all(word in str(info.value) for word in words), str(info.value)
