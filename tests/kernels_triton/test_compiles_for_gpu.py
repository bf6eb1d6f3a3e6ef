"""The interpreter accepts code the Triton compiler rejects (Python branches on tensor values,
non-constexpr tl.arange sizes), so on a machine without a GPU every kernel is also compiled
ahead of time for an H100/H200 (sm_90) down to a cubin, in a subprocess that imports the
kernels in compile mode. Skipped on CUDA, where the other tests compile them for real."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    torch.cuda.is_available = lambda: True  # import the kernels in compile mode
    from gsa_compile.kernels.common import plane_layout, plane_weights
    from gsa_compile.kernels.triton import block_scores, decode_attention, hash_encode, selection

    def compile_for_sm90(kernel, types, constexprs, num_warps=4, num_stages=2):
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
        source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        assert compiled.asm["cubin"], kernel.fn.__name__

    compile_for_sm90(hash_encode._encode_kernel, {"x_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*u8"},
                     {"BLOCK_L": 32, "BLOCK_D": 64, "BLOCK_R": 128})
    for groups in (1, 4, 16, 128):  # 128: MLA's latent selection groups every head of DeepSeek-V3
        direct, planes, offset = plane_layout(groups)
        compile_for_sm90(hash_encode._query_planes_kernel, {"x_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*u8"},
                         {"GROUPS": groups, "BLOCK_G": min(64, max(16, groups)), "BLOCK_D": 64, "BLOCK_R": 128,
                          "DIRECT": direct,
                          "PLANES": planes, "OFFSET": offset})
        for repre, masked in ((0, False), (2, True)):
            compile_for_sm90(block_scores._block_score_kernel,
                             {"pl_ptr": "*i32", "kc_ptr": "*i32", "valid_ptr": "*u8", "norm_ptr": "*fp32",
                              "out_ptr": "*fp64"},
                             {"NUM_PLANES": direct + planes, "DIRECT": direct, "TOP": sum(plane_weights(groups)) * 128,
                              "GROUP_BITS": groups * 128, "NUM_WORDS": 4, "CHUNK": 128, "BLOCK_C": 128,
                              "BLOCKS_PER_PROGRAM": 4, "REPRE": repre, "HAS_VALID": masked, "HAS_NORMS": masked,
                              "USE_POPC": True})
    for span, key_bits, radix in ((512, 12, 4), (0, 63, 3)):
        compile_for_sm90(selection._top_blocks_kernel,
                         {"scores_ptr": "*fp64", "out_ptr": "*i32", "limit_ptr": "*i32", "must_lo": "i64",
                          "must_hi": "i64"},
                         {"BLOCK_N": 1024, "BLOCK_K": 16, "INTEGER_SPAN": span, "KEY_BITS": key_bits,
                          "RADIX_BITS": radix, "MUST_LO": 3, "MUST_HI": 1, "FIELD_BITS": 20, "HAS_LIMIT": True})
    attention = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "blocks_ptr": "*i32", "valid_ptr": "*u8",
                 "bias_ptr": "*fp32", "acc_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32", "scale": "fp32",
                 "softcap": "fp32"}
    compile_for_sm90(decode_attention._sparse_decode_split_kernel, attention,
                     {"GROUPS": 4, "BLOCK_G": 16, "DIM": 128, "BLOCK_D": 128, "DIM_V": 128, "BLOCK_DV": 128,
                      "CHUNK": 128, "BLOCK_N": 64, "TILES_PER_BLOCK": 2, "HAS_VALID": True, "HAS_BIAS": True,
                      "BIAS_PER_HEAD": True, "HAS_SOFTCAP": True, "FP32_DOT": False, "NUM_STAGES": 2,
                      "COUNT_TILE": decode_attention.COUNT_TILE})
    for sinks in (False, True):
        compile_for_sm90(decode_attention._merge_splits_kernel,
                         {"acc_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32", "sinks_ptr": "*bf16",
                          "out_ptr": "*bf16"},
                         {"GROUPS": 4, "BLOCK_G": 16, "DIM_V": 128, "BLOCK_DV": 128, "BLOCK_S": 16,
                          "HAS_SINKS": sinks})
    print("compiled")
''')


def test_every_kernel_compiles_to_a_cubin_for_sm90(real_sizes):
    if real_sizes:
        pytest.skip("on CUDA the other tests compile every kernel for the device itself")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
