"""TensorBoard, when installed: a run writes one scalar per epoch for every metric it logs."""

import pytest

from sparsetrain.run import TrainOptions, train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.mark.slow
def test_run_writes_scalars_per_epoch(tmp_path):
    options = TrainOptions(method="feather", method_flags={"sparsity": 0.9}, epochs=2, limit=256, batch_size=64,
                           model_args={"width": 0.25}, device="cpu", out=str(tmp_path), name="run", workers=1)
    train(options, log=lambda line: None)
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "test_loss", "test_acc", "sparsity", "lr"} <= tags
    accuracy = events.Scalars("test_acc")
    assert [e.step for e in accuracy] == [1, 2]
    assert all(0.0 <= e.value <= 1.0 for e in accuracy)
    assert events.Scalars("sparsity")[-1].value == pytest.approx(0.9, abs=1e-4)  # round(0.9 N) / N on any trajectory
