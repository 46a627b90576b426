"""Trigger tokens: which words of a prompt drive its memorization (Wen et al., Sec. 4.1).

A token's significance is the L2 norm of the gradient of the first-step magnitude
``||eps(x_T, e_prompt) - eps(x_T, e_empty)||`` with respect to that token's text-encoder output
embedding, taken on the conditional branch: the prompt's own embedding goes in the
conditional slot and the empty prompt's stays fixed in the unconditional one. (The reference
code swaps the two slots, so its guidance is inverted while it differentiates; differentiating
with respect to the empty prompt's embedding instead gives scores that merely decay along
the sequence.) The magnitude is averaged over the generations' starting noises.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from filters.magnitude import first_step_input, magnitude_gradient, unconditional_prediction
from filters.sampling import initial_latents, latent_shape


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


def token_significance(comps, prompts: list[str], seeds: list[int], num_steps: int,
                       batch_size: int) -> list[TokenSignificance]:
    """Per-token significance of every prompt, ``batch_size`` (prompt, seed) inputs per forward."""
    uncond = comps.encode_text([""])
    scheduler = comps.sampling_scheduler()
    per_batch = max(1, batch_size // len(seeds))
    out = []
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start:start + per_batch]
        latents = initial_latents([s for _ in chunk for s in seeds], latent_shape(comps.unet), comps.unet.device,
                                  comps.unet.dtype)
        x, t = first_step_input(scheduler, latents, num_steps)
        eps_uncond = unconditional_prediction(comps.unet, x, t, uncond)
        magnitude, grad = magnitude_gradient(comps.unet, scheduler, x, t, comps.encode_text(chunk), eps_uncond,
                                             len(seeds))
        norms = grad.float().norm(dim=-1).cpu()  # [P, L]
        for p, prompt in enumerate(chunk):
            tokens = prompt_tokens(comps.tokenizer, prompt)
            out.append(TokenSignificance(prompt, tokens, norms[p, 1:1 + len(tokens)].tolist(), float(magnitude[p])))
    return out


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
