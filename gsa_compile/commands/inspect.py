"""`gsa-compile inspect`: build a model (a transformers model from a tiny config, or a built-in
example), capture it with torch.compile and print every attention site and what was left dense."""

from __future__ import annotations

import difflib

from ..errors import GSAError
from . import deferred_help


def _examples() -> tuple:
    from ..capture.fx_examples import EXAMPLES

    return EXAMPLES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="list the attention sites the FX route finds in a model, with their GSA policy",
        description="Builds the model with random weights (no download) and runs it once on example inputs.",
    )
    model = parser.add_argument("model", help="a transformers model type (llama, qwen3, gpt2, ...) or a built-in "
                                              "example: %(examples)s")
    deferred_help(model, examples=lambda: ", ".join(_examples()))
    parser.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens of the example input (default 16)")
    parser.add_argument("--config", help="GSA config: shipped model name or JSON path (default: derived)")
    parser.set_defaults(handler=run)


def tiny_transformers_model(model_type: str, layers: int):
    """A transformers causal LM of `model_type` from a tiny config with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING), n=3, cutoff=0.75)
        raise GSAError(
            f"{model_type!r} is neither a transformers model type nor a built-in example "
            f"({', '.join(_examples())})" + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = AutoConfig.for_model(model_type, **sizes)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


def run(args) -> int:
    import torch

    from ..api import inspect
    from ..capture.fx_examples import build_example

    if args.model in _examples():
        model, example = build_example(args.model, layers=args.layers)
        kwargs = {}
    else:
        model = tiny_transformers_model(args.model, args.layers)
        example, kwargs = (torch.randint(0, 128, (1, args.seq_len)),), {"use_cache": False}
    print(inspect(model, *example, config=args.config, **kwargs).table())
    return 0
