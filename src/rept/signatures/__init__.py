"""Signatures: RepT's [h; g] at layer L (extract), the phase-transition layer (layers), and the
per-token gradients behind word scores (tokens)."""
