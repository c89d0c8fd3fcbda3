"""Run by test_lightning.py: Trainer(strategy="ddp") on 2 CPU processes with a Sparsify callback; each
rank saves its final weights. Lightning starts rank 1 by running this script again."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_lightning import METHODS, Classifier, sample_loader  # noqa: E402

from sparsetrain.integrations.lightning import Sparsify  # noqa: E402

if __name__ == "__main__":
    method, out = sys.argv[1], Path(sys.argv[2])
    module = Classifier()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Sparsify(method, **METHODS[method])])
    trainer.fit(module, sample_loader(shuffle=False))
    torch.save(module.state_dict(), out / f"rank{trainer.global_rank}.pt")
