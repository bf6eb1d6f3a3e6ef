"""The Ascend NPU backend: GSA ops lowered to torch_npu operators.

- encode            float32 projection + torch_npu.npu_sign_bits_pack
- select_blocks     torch_npu.npu_sign_bits_unpack (+-1 codes) + matmul, block reduction, top-k
- sparse_attention  torch_npu.npu_fused_infer_attention_score with a block table of the
                    selected blocks

The dispatcher imports this package the first time it sees an "npu" tensor (or on
use_backend("npu")). Importing it never imports torch_npu, so gsa_compile works where torch_npu
is absent or broken; availability() says whether torch_npu can serve here, and why not, and the
dispatcher turns that reason into use_backend's error. What has and has not run on Ascend
hardware is in docs/npu.md."""

from .. import register_kernel
from .attention import sparse_attention, supports_sparse_attention
from .encode import encode, supports_encode
from .runtime import availability
from .select import select_blocks, supports_select_blocks

register_kernel("encode", "npu", encode, supports_encode)
register_kernel("select_blocks", "npu", select_blocks, supports_select_blocks)
register_kernel("sparse_attention", "npu", sparse_attention, supports_sparse_attention)

__all__ = ["availability", "encode", "select_blocks", "sparse_attention"]
