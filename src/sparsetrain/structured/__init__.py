"""Structured (channel-level) pruning: channel surgery and GDP gates."""

from sparsetrain.structured.gdp import GDP
from sparsetrain.structured.surgery import (
    ChannelGroup,
    channel_groups,
    count_flops_params,
    layer_shapes,
    rebuild,
    remove_channels,
)

__all__ = ["GDP", "ChannelGroup", "channel_groups", "count_flops_params", "layer_shapes", "rebuild", "remove_channels"]
