"""The norm-scaled sharpness of HATA's relaxed sign, and the attention-mass recall of codes."""

import dataclasses

import pytest
import torch

from gsa_compile.calibration import HataSettings, LayerCapture
from gsa_compile.calibration.hata import hata_loss, sample_pairs, train_head
from gsa_compile.calibration.recall import mass_recall, recall_table
from gsa_compile.calibration.scale import norm_scaled_sigma, norm_statistics
from gsa_compile.hashing import hash_weights


def test_norm_scaled_sigma_gives_the_relaxed_sign_argument_the_temperature_as_rms():
    generator = torch.Generator().manual_seed(0)
    weight = hash_weights(1, 128, 128, seed=3)[0]  # orthonormal columns
    for scale in (0.5, 14.0, 300.0):
        x = scale * torch.randn(4096, 128, generator=generator)
        sigma = norm_scaled_sigma(x, 1.5)
        argument = sigma * (x @ weight)
        assert float(argument.pow(2).mean().sqrt()) == pytest.approx(1.5, rel=0.05)
    assert float(norm_scaled_sigma(10 * x, 1.0)) == pytest.approx(float(norm_scaled_sigma(x, 1.0)) / 10, rel=1e-5)
    with pytest.raises(ValueError, match="positive"):
        norm_scaled_sigma(x, 0.0)


def _capture(generator, q_scale=1.0, k_scale=1.0) -> LayerCapture:
    keys = torch.randn(1, 256, 32, generator=generator) + 0.5
    queries = keys[:, 128:].repeat(2, 1, 1) + 0.3 * torch.randn(2, 128, 32, generator=generator)
    return LayerCapture([q_scale * queries], [k_scale * keys], [128], scale=32 ** -0.5)


def test_with_a_temperature_the_loss_and_training_ignore_the_scale_of_queries_and_keys():
    base = _capture(torch.Generator().manual_seed(1))
    scaled = LayerCapture([7.0 * base.queries[0]], [0.2 * base.keys[0]], base.query_start, base.scale)
    weight = hash_weights(1, 32, 32, seed=2)[0]
    scaled_settings = HataSettings(temperature=1.0)
    for settings, same in ((scaled_settings, True), (HataSettings(sigma=0.1), False)):
        a = hata_loss(weight, *sample_pairs(base, 0, 16, torch.Generator().manual_seed(5), settings), settings)[1]
        b = hata_loss(weight, *sample_pairs(scaled, 0, 16, torch.Generator().manual_seed(5), settings), settings)[1]
        assert (a["similarity"] == pytest.approx(b["similarity"], rel=1e-4)) is same
        assert (a["bit_balance"] == pytest.approx(b["bit_balance"], rel=1e-4)) is same
    settings = dataclasses.replace(scaled_settings, epochs=2, iterations=5)
    trained_base, history = train_head(base, 0, weight, settings, torch.Generator().manual_seed(9))
    trained_scaled, _ = train_head(scaled, 0, weight, settings, torch.Generator().manual_seed(9))
    assert not torch.equal(trained_base, weight)
    assert torch.allclose(trained_base, trained_scaled, atol=1e-4)


def test_norm_statistics_report_the_rms_norms_and_the_papers_temperature():
    capture = _capture(torch.Generator().manual_seed(2), q_scale=3.0, k_scale=2.0)
    (row,) = norm_statistics({4: capture}, temperature=1.0, paper_sigma=0.1)
    assert row["layer"] == 4 and row["kv_head"] == 0 and row["head_dim"] == 32
    keys = capture.keys[0][0]
    assert row["key_rms_norm"] == pytest.approx(float(keys.pow(2).sum(-1).mean().sqrt()), rel=1e-5)
    assert row["sigma_k"] == pytest.approx(32 ** 0.5 / row["key_rms_norm"], rel=1e-5)
    assert row["paper_temperature_q"] == pytest.approx(0.1 * row["query_rms_norm"] / 32 ** 0.5, rel=1e-6)


def test_recall_is_the_attention_mass_inside_the_selection():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 512, 64, generator=generator)
    queries = 4.0 * keys[:, -8:].repeat_interleave(4, dim=0)  # every query attends to its own key
    capture = LayerCapture([queries], [keys], [504], scale=0.125)
    weight = hash_weights(2, 64, 64, seed=1)
    every = mass_recall({0: capture}, {"random": {0: weight}}, chunk_size=16, budget=1.0, must_select=[0, -1])
    assert every["random"][0] == pytest.approx(1.0, abs=1e-5) and every["exact"][0] == pytest.approx(1.0, abs=1e-5)
    # at 2 blocks (the must-select floor: the first and the last block) the query's own key is
    # in the last block, and it holds almost all of the mass
    floor = mass_recall({0: capture}, {"random": {0: weight}}, chunk_size=16, budget=0.01, must_select=[0, -1])
    assert floor["random"][0] == pytest.approx(floor["exact"][0]) and floor["exact"][0] > 0.9
    # diffuse attention: k of n blocks hold about k/n of the mass, whatever selects them
    flat = LayerCapture([torch.zeros(8, 8, 64)], [keys], [504], scale=0.125)
    share = mass_recall({0: flat}, {"random": {0: weight}}, chunk_size=16, budget=0.25, must_select=[0])
    assert share["exact"][0] == pytest.approx(0.25, abs=0.03)
    assert "mean" in recall_table(share) and "exact" in recall_table(share)
