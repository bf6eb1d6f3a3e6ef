"""The FX route to ONNX: a decoder with a growing KV cache, rewritten by gsa_compile.export, is
exported with its codes cache made explicit (past/present key codes per site) and decodes in
onnxruntime like the rewritten PyTorch program."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import gsa_compile
from gsa_compile.capture.fx_examples import TinyDecoder
from gsa_compile.onnx import DOMAIN

LAYERS, PROMPT, STEPS = 2, 16, 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyDecoder(layers=LAYERS).eval()
    config = gsa_compile.GSAConfig(num_hidden_layers=LAYERS, head_dim=8, hash_bits=8, chunk_size=2,
                                   top_k_ratio_per_layer=[0.5] * LAYERS, must_select_blocks=[0],
                                   cpu_seq_len_threshold=0)
    dynamic = torch.export.Dim.DYNAMIC
    cache = [(torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)) for _ in range(LAYERS)]
    example = (torch.randint(0, 64, (2, 3)), cache)
    shapes = ({0: dynamic, 1: dynamic}, [({0: dynamic, 2: dynamic}, {0: dynamic, 2: dynamic})] * LAYERS)
    program = gsa_compile.export(model, example, config=config, dynamic_shapes=shapes)
    path = tmp_path_factory.mktemp("fx") / "decoder.onnx"
    proto = gsa_compile.export_onnx(program, example, str(path))
    return model, program, proto, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_codes_of_each_site_become_past_and_present_tensors(exported):
    _, _, proto, _ = exported
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    for site in range(LAYERS):
        assert f"past_key_codes.{site}" in inputs and f"present_key_codes.{site}" in outputs
    assert [n.op_type for n in proto.graph.node if n.domain == DOMAIN].count("Encode") == LAYERS
    assert all(not entry.domain.startswith("gsa.") for entry in proto.opset_import)


def test_onnxruntime_decodes_like_the_rewritten_program(exported):
    model, program, proto, session = exported
    names = [i.name for i in proto.graph.input]
    ids = torch.randint(0, 64, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    empty = np.zeros((2, 2, 0, 8), np.float32)
    feeds = dict(zip(names, [ids.numpy()] + [empty] * (2 * LAYERS) + [np.zeros((2, 2, 0, 1), np.uint8)] * LAYERS))
    outputs = session.run(None, feeds)
    with torch.no_grad():
        logits, cache = model(ids, model.empty_cache(2))  # the prefill is dense in both
    np.testing.assert_allclose(outputs[0], logits.numpy(), atol=1e-4)
    rewritten = program.module()
    for _ in range(STEPS):
        token = torch.from_numpy(outputs[0][:, -1:].argmax(-1))
        assert torch.equal(token, logits[:, -1:].argmax(-1))
        presents = outputs[1:]
        feeds = dict(zip(names, [token.numpy(), *presents]))
        outputs = session.run(None, feeds)
        with torch.no_grad():
            logits, cache = rewritten(token, cache)
        np.testing.assert_allclose(outputs[0], logits.numpy(), atol=1e-4)
