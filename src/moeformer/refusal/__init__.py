"""Refusal direction (Arditi et al. 2024): find, ablate, add and bake out the direction that mediates refusal."""
