"""Structured (channel-level) building blocks: channel surgery on Torch-Pruning's dependency
graph and layer-wise relevance propagation. The methods built on them (GDP, FRS) live in
:mod:`sparsetrain.methods`; the measuring helpers (FLOPs, parameters, widths) in
:mod:`sparsetrain.measure`. This package never imports the model zoo (:mod:`sparsetrain.models`)."""

from sparsetrain.structured.surgery import (
    ChannelGroup,
    channel_groups,
    layer_shapes,
    remove_channels,
    remove_channels_,
    resize_,
    with_shapes,
)

__all__ = ["ChannelGroup", "channel_groups", "layer_shapes", "remove_channels", "remove_channels_", "resize_",
           "with_shapes"]
