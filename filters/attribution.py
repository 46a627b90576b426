"""Trigger tokens: which words of a prompt drive its memorization (Wen et al., Sec. 4.1).

A token's significance is the L2 norm of the gradient of the first-step magnitude
``||eps(x_T, e_prompt) - eps(x_T, e_empty)||`` with respect to that token's text-encoder output
embedding, taken on the conditional branch: the prompt's own embedding goes in the
conditional slot and the empty prompt's stays fixed in the unconditional one. (The reference
code swaps the two slots, so its guidance is inverted while it differentiates; differentiating
with respect to the empty prompt's embedding instead gives scores that merely decay along
the sequence.) The magnitude is averaged over the generations' starting noises.

With ``steps`` = k > 1 the significance is averaged over the first k steps of a correctly
guided trajectory (the reference averages it over its trajectory's steps): at each step the
gradient is taken at the current latent, then the latent takes the guided DDIM step with the
prompt's own prediction. The default is the first step alone: it is exactly the gradient of the
score ``memsieve-detect`` flags by default (first step, verified against finite differences),
costs one forward and backward per prompt instead of about 2k, and the first steps are where
the magnitude separates memorized prompts (Wen et al.).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from filters.magnitude import magnitude_gradient, predict_pair, unconditional_prediction
from filters.sampling import Seeds, latent_shape, pair_latents


@dataclass
class TokenSignificance:
    """One prompt's tokens (start, end and padding left out) and their significance."""

    prompt: str
    tokens: list[str]
    scores: list[float]
    magnitude: float

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "magnitude": self.magnitude,
                "tokens": [{"token": t, "significance": s} for t, s in zip(self.tokens, self.scores)]}


def token_significance(comps, prompts: list[str], seeds: Seeds, num_steps: int, batch_size: int,
                       steps: int = 1, guidance_scale: float = 7.5) -> list[TokenSignificance]:
    """Per-token significance of every prompt over the first ``steps`` guided steps of ``num_steps``,
    ``batch_size`` (prompt, generation) inputs per forward; ``magnitude`` is the mean over those steps."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"triggers.steps={steps} must lie in [1, num_inference_steps={num_steps}]")
    uncond = comps.encode_text([""])
    scheduler = comps.sampling_scheduler()
    per_batch = max(1, batch_size // len(seeds))
    out = []
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start:start + per_batch]
        pairs = [(start + p, j) for p in range(len(chunk)) for j in range(len(seeds))]
        latents = pair_latents(seeds, pairs, latent_shape(comps.unet), comps.unet.device, comps.unet.dtype)
        magnitude, norms = trajectory_significance(comps.unet, scheduler, comps.encode_text(chunk), uncond, latents,
                                                   num_steps, steps, guidance_scale, len(seeds))
        for p, prompt in enumerate(chunk):
            tokens = prompt_tokens(comps.tokenizer, prompt)
            out.append(TokenSignificance(prompt, tokens, norms[p, 1:1 + len(tokens)].tolist(), float(magnitude[p])))
    return out


def trajectory_significance(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor,
                            num_steps: int, steps: int, guidance_scale: float,
                            generations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean magnitude ``[P]`` and mean per-token gradient norm ``[P, L]`` over the first ``steps`` steps.

    ``latents`` are the unscaled starting noises of ``P * generations`` samples, prompt-major.
    Between gradient steps each sample takes the guided step with its own prompt's prediction.
    """
    scheduler.set_timesteps(num_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    magnitudes, norms = [], []
    for i, t in enumerate(scheduler.timesteps[:steps]):
        x = scheduler.scale_model_input(latents, t)
        tt = t.expand(x.shape[0])
        if i + 1 < steps:
            with torch.no_grad():
                eps_cond, eps_uncond = predict_pair(unet, x, tt, cond.repeat_interleave(generations, dim=0), uncond)
            latents = scheduler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, latents).prev_sample
        else:
            eps_uncond = unconditional_prediction(unet, x, tt, uncond)
        magnitude, grad = magnitude_gradient(unet, scheduler, x, tt, cond, eps_uncond, generations)
        magnitudes.append(magnitude)
        norms.append(grad.float().norm(dim=-1).cpu())
    return torch.stack(magnitudes).mean(dim=0), torch.stack(norms).mean(dim=0)


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens as the text encoder sees them (truncated like it), start and end tokens left out."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids[1:-1])]


def highlight(sig: TokenSignificance, top_fraction: float = 0.5, color: bool | None = None) -> str:
    """The prompt's tokens with those scoring at least ``top_fraction`` of the maximum highlighted.

    In colour (a terminal without ``NO_COLOR``) highlighted tokens are bold on red, others dimmed
    by their share of the maximum; otherwise highlighted tokens are wrapped in ``[[...]]``.
    """
    if color is None:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    top = max(sig.scores, default=0.0) or 1.0
    words = []
    for token, score in zip(sig.tokens, sig.scores):
        hot = score >= top_fraction * top
        if color:
            words.append(f"\033[1;37;41m{token}\033[0m" if hot else f"\033[{'2;' if score < 0.25 * top else ''}37m"
                         f"{token}\033[0m")
        else:
            words.append(f"[[{token}]]" if hot else token)
    return " ".join(words)
