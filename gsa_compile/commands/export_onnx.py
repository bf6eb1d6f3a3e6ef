"""`gsa-compile export-onnx`: a transformers causal LM as an ONNX decode step with gsa-domain ops.

    gsa-compile export-onnx qwen3 --out step.onnx --verify 16        # tiny random-weight Qwen3
    gsa-compile export-onnx ./my-llama --config Qwen/Qwen3-4B --out step.onnx

MODEL is a local transformers model directory (read with local_files_only) of any causal LM the
Hugging Face route optimizes, or a model type (TINY_MODEL_TYPES) to build a tiny random-weight
model for trying the pipeline."""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)

# Model types whose tiny random-weight model commands.inspect.tiny_transformers_model builds.
TINY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "phi3")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-onnx", help="export a transformers causal LM as an ONNX decode step with gsa custom ops",
        description="Writes one ONNX graph serving prefill and decode: past/present key, value and key "
                    "codes per layer, a gsa.Attention node per GSA site (docs/onnx.md).",
    )
    parser.add_argument("model", help="local transformers model directory, or a model type "
                                      f"({', '.join(TINY_MODEL_TYPES)}) for a tiny random-weight model")
    parser.add_argument("--out", required=True, help="path of the .onnx file to write")
    parser.add_argument("--config", help="GSA config: shipped model name or JSON path (default: derived from the model)")
    parser.add_argument("--layers", type=int, default=4, help="layers of a tiny random-weight model (default 4)")
    parser.add_argument("--device-type", default="cpu", choices=["cpu", "cuda", "npu"],
                        help="whose seq_len/concurrency thresholds the graph uses (default cpu)")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="also decode N tokens greedily in onnxruntime and in PyTorch and compare them")
    parser.set_defaults(handler=run)


# A tiny model's prompt is short: 4-token blocks and low thresholds so --verify decodes sparse.
TINY_MODEL_GSA = dict(chunk_size=4, must_select_blocks=[0, -1], cpu_seq_len_threshold=16,
                      gpu_seq_len_threshold=16, npu_seq_len_threshold=16)


def load_model(name: str, layers: int):
    """A local model directory, or a tiny random-weight model of a supported type."""
    from ..errors import GSAConfigError

    if os.path.isdir(name):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name, local_files_only=True, torch_dtype="float32").eval()
    if name not in TINY_MODEL_TYPES:
        raise GSAConfigError(
            f"model must be a local model directory or one of {list(TINY_MODEL_TYPES)}, got {name!r}"
        )
    if layers < 1:
        raise GSAConfigError(f"--layers must be a positive integer, got {layers}")
    from .inspect import tiny_transformers_model

    model = tiny_transformers_model(name, layers)
    # Mistral configs default to a 4096-token window, which keeps every layer dense.
    model.config.sliding_window = None
    return model


def run(args) -> int:
    import numpy as np
    import onnxruntime as ort

    from ..config import GSAConfig, load_config
    from ..onnx import DOMAIN, DecodeStep, export_decode_step, greedy_decode, onnx_runner, torch_runner

    model = load_model(args.model, args.layers)
    if args.config:
        config = load_config(args.config)
    else:
        tiny = not os.path.isdir(args.model)
        config = GSAConfig.for_model(model, **(TINY_MODEL_GSA if tiny else {}))
    step = DecodeStep(model, config, device_type=args.device_type)
    started = time.perf_counter()
    proto = export_decode_step(step, args.out)
    gsa_ops = sorted(node.op_type for node in proto.graph.node if node.domain == DOMAIN)
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s: {len(proto.graph.input)} inputs, "
          f"{len(proto.graph.output)} outputs, gsa nodes: {', '.join(gsa_ops)}")
    if args.verify > 0:
        session = ort.InferenceSession(args.out, providers=["CPUExecutionProvider"])
        vocab = model.get_input_embeddings().weight.shape[0]
        prompt = np.random.default_rng(0).integers(0, vocab, (1, 32))
        onnx_tokens = greedy_decode(onnx_runner(session, step), step, prompt, args.verify)
        torch_tokens = greedy_decode(torch_runner(step), step, prompt, args.verify)
        agree = int((onnx_tokens == torch_tokens).sum())
        print(f"greedy decode of {args.verify} tokens: onnxruntime and PyTorch agree on {agree}/{args.verify}")
        return 0 if agree == args.verify else 1
    return 0
