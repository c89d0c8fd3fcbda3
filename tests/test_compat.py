"""compat.Pruner against an independent re-derivation of the reference recipe."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsetrain.compat import Pruner


def reference_rate(step: int, final_rate: float, t1: int, t2: int) -> float:
    """The Feather recipe: cubic from t1 to t2 = half of training (Zhu & Gupta form)."""
    if step < t1:
        return 0.0
    if step >= t2:
        return final_rate
    return final_rate - final_rate * (1 - (step - t1) / (t2 - t1)) ** 3


def reference_threshold(weights, rate: float) -> float:
    """Sort every prunable magnitude and take the k-th, k = round(rate * N)."""
    magnitudes = np.sort(np.concatenate([w.detach().numpy().ravel() for w in weights]).__abs__())
    k = round(rate * magnitudes.size)
    return float(magnitudes[k - 1]) if k > 0 else 0.0


@pytest.mark.parametrize("final_rate, t1", [(0.9, 0), (0.98, 1)])
def test_pruner_follows_the_reference_schedule_and_thresholds(tiny_net, make_batches, final_rate, t1):
    nbatches, epochs = 3, 6
    pruner = Pruner(tiny_net, "cpu", final_rate, nbatches, epochs, t1=t1)
    assert pruner.sparsifier.config.theta == (0.5 if final_rate > 0.95 else 1.0)
    weights = pruner.sparsifier.dense_weights()
    opt = torch.optim.SGD(tiny_net.parameters(), lr=0.05)
    t2 = nbatches * epochs // 2
    for step, (x, y) in enumerate(make_batches(nbatches * epochs)):
        assert pruner.thresh == reference_threshold(weights, reference_rate(step, final_rate, t1 * nbatches, t2))
        loss = F.cross_entropy(tiny_net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.update_thresh(end_of_batch=True)
    assert pruner.thresh == reference_threshold(weights, final_rate)
    n = sum(w.numel() for w in weights)
    assert pruner.print_sparsity() == pytest.approx(100 * round(final_rate * n) / n)


def test_update_without_end_of_batch_keeps_the_step(tiny_net):
    pruner = Pruner(tiny_net, "cpu", 0.5, nbatches=2, epochs=2)
    pruner.update_thresh(end_of_batch=True)
    with torch.no_grad():
        pruner.sparsifier.dense_weights()[0].mul_(10)
    pruner.update_thresh()
    assert pruner.sparsifier.step_count == 1
    assert pruner.thresh == reference_threshold(pruner.sparsifier.dense_weights(), reference_rate(1, 0.5, 0, 2))


def test_pthres_leaves_small_layers_dense_and_desparsify_gives_a_plain_model(tiny_net, capsys):
    pruner = Pruner(tiny_net, "cpu", 0.5, nbatches=1, epochs=2, pthres=320)  # fc has 320 weights
    assert "fc" not in pruner.sparsifier.names and "conv2" in pruner.sparsifier.names
    pruner.update_thresh(end_of_batch=True)
    percent = pruner.print_sparsity()
    assert f"{percent:.2f}%" in capsys.readouterr().out
    model = pruner.desparsify()
    assert set(model.state_dict()) == set(type(tiny_net)().state_dict())
