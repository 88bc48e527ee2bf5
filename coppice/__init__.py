"""Coppice: the composition root (the CLI, settings, and `serve`, which wires the planes)."""
