"""Evaluation: generation, copy and alignment metrics, detection, grids and comparisons."""
