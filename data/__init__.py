"""Image-caption sources, the embedded world and duplicate injection."""
