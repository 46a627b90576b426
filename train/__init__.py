"""The Hydra entry point and the accelerate training loop."""
