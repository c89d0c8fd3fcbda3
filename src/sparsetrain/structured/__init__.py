"""Structured (channel-level) pruning: channel surgery, GDP gates and FRS relevance pruning."""

from sparsetrain.structured.frs import FRS
from sparsetrain.structured.gdp import GDP
from sparsetrain.structured.surgery import (
    ChannelGroup,
    channel_groups,
    count_flops_params,
    layer_shapes,
    rebuild,
    remove_channels,
)

__all__ = ["FRS", "GDP", "ChannelGroup", "channel_groups", "count_flops_params", "layer_shapes", "rebuild", "remove_channels"]
