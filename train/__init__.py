"""The Hydra entry point and the accelerate training loop."""

import train.assets  # noqa: F401  registers ${memsieve_asset:NAME} before any config is resolved
