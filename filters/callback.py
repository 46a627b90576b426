"""Zero-cost detection while generating with a diffusers ``StableDiffusionPipeline``.

With classifier-free guidance the pipeline already predicts the noise for the prompt and for
the empty prompt at every step; their difference is the magnitude (in epsilon space, through the
pipeline's scheduler at the UNet's timestep: :mod:`filters.magnitude`). The monitor reads it from
the UNet's output through a forward hook (the pipeline passes no noise prediction to its
callbacks) and, as the pipeline's ``callback_on_step_end``, files one row of magnitudes per step
and flags each image once the steps of its calibrated threshold are done, by the threshold
(a fixed false-positive rate) or by Benjamini-Hochberg on its empirical p-value (a chosen
false-discovery rate over the images generated)::

    monitor = MemorizationMonitor.from_file("detect/threshold.json", fdr=0.05)
    with monitor.attach(pipe):
        images = pipe(prompts, callback_on_step_end=monitor).images
    monitor.scores, monitor.flagged, monitor.p_values, monitor.fdr_flagged
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from filters.detection import DetectionThreshold, benjamini_hochberg
from filters.magnitude import text_conditional_magnitude


class MemorizationMonitor:
    """Records each image's magnitude at every guided step and flags it against ``threshold``.

    ``scores`` is the mean magnitude over the first ``steps`` steps, the detector's score for
    one generation; ``flagged`` is ``scores > threshold`` once those steps have run. With the
    ``calibration`` a ``threshold.json`` holds, ``p_values`` are each image's empirical p-values
    against its calibration prompts and ``fdr_flagged`` flags the images Benjamini-Hochberg
    rejects at ``fdr``; every pipeline call is checked against the setting it was calibrated on.
    """

    def __init__(self, threshold: float | None = None, steps: int = 1,
                 calibration: DetectionThreshold | None = None, fdr: float = 0.05):
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if not 0 < fdr < 1:
            raise ValueError(f"fdr={fdr} must lie in (0, 1)")
        self.threshold, self.steps, self.calibration, self.fdr = threshold, steps, calibration, fdr
        self.magnitudes: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None

    @classmethod
    def from_file(cls, path: str | Path, fdr: float = 0.05) -> MemorizationMonitor:
        """A monitor with a threshold calibrated by ``memsieve-detect`` (its ``threshold.json``).

        The monitor scores one image at a time, so the threshold must be a one-generation one.
        """
        calibrated = DetectionThreshold.load(path)
        if calibrated.generations != 1:
            raise ValueError(f"the monitor scores one image, so it needs a one-generation threshold; {path} was "
                             f"calibrated on {calibrated.setting()}: run memsieve-detect with detection.generations=1")
        return cls(calibrated.threshold, calibrated.steps, calibrated, fdr)

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
        if step_index == 0 and self.calibration is not None:
            self.calibration.check("this pipeline call", self.steps, 1, pipe.num_timesteps, pipe.guidance_scale,
                                   getattr(pipe, "name_or_path", None))
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

    @property
    def p_values(self) -> torch.Tensor:
        """Each image's empirical p-value against the calibration prompts' scores."""
        if self.calibration is None:
            raise ValueError("p-values need the calibration scores; use MemorizationMonitor.from_file(threshold.json)")
        return torch.from_numpy(self.calibration.p_values(self.scores.numpy()))

    @property
    def fdr_flagged(self) -> torch.Tensor:
        """The images Benjamini-Hochberg flags at ``fdr`` over all images recorded since ``attach``."""
        return torch.from_numpy(benjamini_hochberg(self.p_values.numpy(), self.fdr).astype(np.bool_))
