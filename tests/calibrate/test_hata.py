"""HATA's loss terms and pair labels on toy problems."""

import torch

from gsa_compile.calibration import HataSettings, LayerCapture
from gsa_compile.calibration.hata import decorrelation_loss, pair_labels, sample_pairs, train_head
from gsa_compile.hashing import hash_weights


def test_pair_labels_rank_top_tenth_linearly_and_mark_the_rest():
    dots = torch.tensor([[float(v) for v in range(20)]])
    valid = torch.ones(1, 20, dtype=torch.bool)
    valid[0, 19] = False  # the best dot product is not a causal key
    labels = pair_labels(dots, valid, HataSettings())
    # 19 valid keys -> ceil(1.9) = 2 top keys: 20 for the best valid (18), 1 for the next (17)
    assert labels[0, 18] == 20 and labels[0, 17] == 1
    assert labels[0, 19] == 0
    assert torch.all(labels[0, :17] == -1)


def _toy_capture(offset: float, generator) -> LayerCapture:
    """One KV head, two query heads; keys share a mean direction, so random bits are unbalanced."""
    keys = torch.randn(1, 256, 16, generator=generator) + offset
    queries = keys[:, 128:].repeat(2, 1, 1) + 0.1 * torch.randn(2, 128, 16, generator=generator)
    return LayerCapture([queries], [keys], [128], scale=0.25)


def test_training_balances_bits_and_keeps_weights_near_orthogonal():
    generator = torch.Generator().manual_seed(0)
    capture = _toy_capture(offset=2.0, generator=generator)
    settings = HataSettings(epochs=3, iterations=10, sigma=1.0)
    initial = hash_weights(1, 16, 16, seed=1)[0]
    weight, history = train_head(capture, 0, initial, settings, generator)
    first = sum(step["bit_balance"] for step in history[:5]) / 5
    last = sum(step["bit_balance"] for step in history[-5:]) / 5
    assert last < 0.5 * first
    assert not torch.equal(weight, initial)
    # the decorrelation term bounds the drift: ||W^T W - I||^2 of a 16 x 16 W stays about 1
    assert decorrelation_loss(weight) < 1.5


def test_decorrelation_pulls_a_skewed_weight_back_towards_orthogonal():
    generator = torch.Generator().manual_seed(0)
    capture = _toy_capture(offset=0.0, generator=generator)
    skewed = hash_weights(1, 16, 16, seed=2)[0] * 1.3 + 0.05 * torch.randn(16, 16, generator=generator)
    settings = HataSettings(epochs=2, iterations=10, eps=0.0, eta=0.0)
    weight, history = train_head(capture, 0, skewed, settings, generator)
    assert history[-1]["decorrelation"] < 0.1 * history[0]["decorrelation"]
    assert decorrelation_loss(weight) < 0.1 * decorrelation_loss(skewed)


def test_sampled_pairs_are_causal_and_from_the_second_half():
    generator = torch.Generator().manual_seed(3)
    capture = _toy_capture(offset=0.0, generator=generator)
    queries, keys, positions, labels, valid = sample_pairs(capture, 0, 32, generator, HataSettings())
    assert torch.all(positions >= 128) and torch.all(positions < 256)
    assert torch.equal(valid.sum(-1), positions + 1)
    assert torch.all(labels[~valid] == 0) and torch.all((labels[valid] == -1) | (labels[valid] >= 1))
