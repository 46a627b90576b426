"""Zero-cost detection while generating with a diffusers ``StableDiffusionPipeline``.

With classifier-free guidance the pipeline already predicts the noise for the prompt and for
the empty prompt at every step; their difference is the magnitude (in epsilon space, through the
pipeline's scheduler at the UNet's timestep: :mod:`filters.magnitude`). The monitor reads it from
the UNet's output through a forward hook (the pipeline passes no noise prediction to its
callbacks) and, as the pipeline's ``callback_on_step_end``, files one row of magnitudes per step
and flags each image once the steps of its calibrated threshold are done::

    monitor = MemorizationMonitor.from_file("detect/threshold.json")
    with monitor.attach(pipe):
        images = pipe(prompts, callback_on_step_end=monitor).images
    monitor.scores, monitor.flagged
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from filters.detection import DetectionThreshold
from filters.magnitude import text_conditional_magnitude


class MemorizationMonitor:
    """Records each image's magnitude at every guided step and flags it against ``threshold``.

    ``scores`` is the mean magnitude over the first ``steps`` steps, the detector's score for
    one generation; ``flagged`` is ``scores > threshold`` once those steps have run.
    """

    def __init__(self, threshold: float | None = None, steps: int = 1):
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.threshold, self.steps = threshold, steps
        self.magnitudes: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> MemorizationMonitor:
        """A monitor with a threshold calibrated by ``memsieve-detect`` (its ``threshold.json``)."""
        calibrated = DetectionThreshold.load(path)
        return cls(calibrated.threshold, calibrated.steps)

    @contextmanager
    def attach(self, pipe) -> Iterator[MemorizationMonitor]:
        """Hook ``pipe.unet`` for one or more pipeline calls; records start afresh."""
        self.magnitudes, self._pending = [], None
        handle = pipe.unet.register_forward_hook(
            lambda module, args, kwargs, output: self._record(pipe, args, kwargs, output), with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def _record(self, pipe, args: tuple, kwargs: dict, output) -> None:
        if not pipe.do_classifier_free_guidance:
            raise ValueError("the memorization monitor needs classifier-free guidance: guidance_scale > 1")
        sample = output[0] if isinstance(output, tuple) else output.sample
        eps_uncond, eps_cond = sample.detach().chunk(2)  # the pipeline's order: empty prompt first
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self._pending = text_conditional_magnitude(eps_cond, eps_uncond, pipe.scheduler, timestep).cpu()

    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end``: file this step's magnitudes; tensors pass through unchanged."""
        if self._pending is None:
            raise RuntimeError("no UNet output recorded this step; use the monitor inside `with monitor.attach(pipe)`")
        self.magnitudes.append(self._pending)
        self._pending = None
        return callback_kwargs

    @property
    def per_step(self) -> torch.Tensor:
        """Magnitudes ``[images, steps_run]``."""
        return torch.stack(self.magnitudes, dim=1)

    @property
    def scores(self) -> torch.Tensor:
        """Mean magnitude of each image over the first ``steps`` steps."""
        if len(self.magnitudes) < self.steps:
            raise RuntimeError(f"only {len(self.magnitudes)} steps recorded; the score needs {self.steps}")
        return self.per_step[:, : self.steps].mean(dim=1)

    @property
    def flagged(self) -> torch.Tensor:
        """Which images score above the threshold."""
        if self.threshold is None:
            raise ValueError("the monitor has no threshold; use MemorizationMonitor.from_file(threshold.json)")
        return self.scores > self.threshold
