"""Mixture-of-Experts layers: basic (soft) MoE -> sparse top-k -> DeepSeekMoE / DeepSeek-V3."""

from moeformer.moe.balancing import LoadTracker
from moeformer.moe.experts import Experts
from moeformer.moe.layer import MoELayer, build_moe, moe_from_config, segment_experts
from moeformer.moe.router import Router, Routing, apply_capacity

__all__ = [
    "Experts",
    "LoadTracker",
    "MoELayer",
    "Router",
    "Routing",
    "apply_capacity",
    "build_moe",
    "moe_from_config",
    "segment_experts",
]
