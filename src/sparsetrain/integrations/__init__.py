"""Drive any registered method from the trainers people already use.

``sparsetrain.integrations.lightning.Sparsify`` (PyTorch Lightning) and
``sparsetrain.integrations.hf.SparsifyCallback`` (Hugging Face ``Trainer``) call the method
protocol at the matching hooks. They are optional extras: importing :mod:`sparsetrain` never
imports Lightning or Transformers; import the submodule you need.
"""
