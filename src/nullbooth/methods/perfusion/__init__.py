"""Perfusion (Tewel et al., SIGGRAPH 2023): key-locked, gated rank-1 edits of the cross-attention K/V projections."""
