"""torch.compile(model, backend="gsa"): decode with GSA attention in a tiny decoder (CPU, seconds).

    python examples/compile_backend.py

The model keeps its KV cache as tensors it concatenates to (a growing cache); the backend finds
each attention, rewrites it into gsa::attention and keeps the keys' hash codes beside the cache,
so every key is encoded once. With a budget that covers the whole cache the logits equal the
original model's; with a small budget the decode steps attend only the selected blocks."""

import torch

from gsa_compile import GSAConfig
from gsa_compile.capture.fx_examples import TinyDecoder


def generate(model, ids, steps):
    logits, cache = model(ids, model.empty_cache())
    outputs = [logits[:, -1]]
    for _ in range(steps):
        logits, cache = model(logits[:, -1:].argmax(-1), cache)
        outputs.append(logits[:, -1])
    return torch.stack(outputs, 1)


def main():
    torch.manual_seed(0)
    model = TinyDecoder(layers=4).eval()
    ids = torch.randint(0, 64, (1, 48))
    for budget in (64, 16):
        # Thresholds 0 so the sparse path runs at this toy length; chunks of 8 tokens.
        config = GSAConfig.for_model(model, chunk_size=8, budget_tokens=budget, must_select_blocks=[0, -1],
                                     cpu_seq_len_threshold=0, cpu_concurrency_threshold=0)
        reports = []
        compiled = torch.compile(model, backend="gsa", options={"config": config, "compiler": "eager",
                                                                "reports": reports})
        with torch.no_grad():
            dense, sparse = generate(model, ids, 8), generate(compiled, ids, 8)
        torch._dynamo.reset()
        print(reports[0].table())
        print(f"budget {budget} tokens: max |logit difference| over 8 decode steps = "
              f"{(dense - sparse).abs().max().item():.2e}\n")


if __name__ == "__main__":
    main()
