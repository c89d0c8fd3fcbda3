"""Structured (channel-level) building blocks: channel surgery on Torch-Pruning's dependency
graph and layer-wise relevance propagation. The methods built on them (GDP, FRS) live in
:mod:`sparsetrain.methods`."""

from sparsetrain.structured.surgery import (
    ChannelGroup,
    channel_groups,
    count_flops_params,
    layer_shapes,
    rebuild,
    remove_channels,
    remove_channels_,
    resize_,
)

__all__ = ["ChannelGroup", "channel_groups", "count_flops_params", "layer_shapes", "rebuild", "remove_channels",
           "remove_channels_", "resize_"]
