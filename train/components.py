"""Stable Diffusion's components, built from config (``model=embedded``) or loaded (``model=sd``).

Both paths produce the same :class:`Components`, so the loop, the filter and evaluation never
know which they got. ``vae`` is ``None`` for pixel-space models: latents are then pixels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from train.model_source import check_pretrained, goes_online, hub_error

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
# eager: diffusers' plain matmul-softmax attention; sdpa: torch's scaled_dot_product_attention
# (flash / memory-efficient kernels where the device has them).
ATTENTION = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}


@dataclass
class Components:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerFast
    noise_scheduler: DDPMScheduler
    vae: AutoencoderKL | None

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor if self.vae is not None else 1.0

    def sampling_scheduler(self) -> DDIMScheduler:
        """DDIM with the training scheduler's noise schedule, as SD's pipelines sample."""
        return DDIMScheduler.from_config(self.noise_scheduler.config)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Text-encoder output embeddings (SD's ``encoder_hidden_states``)."""
        ids = self.tokenizer(captions, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: list[torch.Generator] | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] to the latents the UNet denoises; ``generator`` (one per image) draws
        the VAE posterior sample."""
        if self.vae is None:
            return pixels
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.sample(generator=generator) * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to pixels in [0, 1]."""
        if self.vae is not None:
            latents = self.vae.decode(latents.to(self.vae.dtype) / self.latent_scale).sample
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def for_inference(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Components:
        """Every module frozen, in eval mode, on ``device`` in ``dtype``: how detection and
        re-evaluation use a loaded model (gradients still reach inputs such as prompt embeddings)."""
        for module in (self.unet, self.text_encoder, self.vae):
            if module is not None:
                place(module.requires_grad_(False).eval(), device, dtype)
        return self

    def save(self, path: str | Path) -> None:
        """Write the model where ``model=sd`` loads it.

        With a VAE (every SD model) this is a complete ``StableDiffusionPipeline`` folder
        (``model_index.json`` plus one subfolder per component, no safety checker) that
        ``StableDiffusionPipeline.from_pretrained`` loads. A pixel-space model (the embedded
        default, no VAE) fits no diffusers pipeline: it gets the same subfolders without
        ``model_index.json``.
        """
        path = Path(path)
        if self.vae is None:
            self.unet.save_pretrained(path / "unet")
            self.text_encoder.save_pretrained(path / "text_encoder")
            self.tokenizer.save_pretrained(path / "tokenizer")
            self.noise_scheduler.save_pretrained(path / "scheduler")
            return
        from diffusers import StableDiffusionPipeline  # imports image processors; only needed here

        # The pipeline would rewrite these two legacy settings in place (with warnings); set them
        # on a copy so the training scheduler (and evaluation's DDIM built from it) stays as loaded.
        scheduler = DDPMScheduler.from_config(self.noise_scheduler.config, steps_offset=1, clip_sample=False)
        StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                unet=self.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(path)


def place(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(device, dtype)``. diffusers warns on every dtype cast that modules "should be kept
    in float32: []" even when its list is empty; only a model with such modules goes through its check."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device, dtype=dtype)
    return torch.nn.Module.to(module, device, dtype=dtype)


def set_attention(unet: UNet2DConditionModel, kind: str) -> None:
    """Use the attention implementation ``train.attention`` names for every attention layer."""
    if kind not in ATTENTION:
        raise ValueError(f"train.attention={kind!r}; expected one of {sorted(ATTENTION)}")
    unet.set_attn_processor(ATTENTION[kind]())


def word_tokenizer(words: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A CLIP-style word-level tokenizer made locally: lowercase, one token per word, digits split.

    Unknown words map to ``<|unk|>``; sequences are ``<|startoftext|> ... <|endoftext|>`` padded
    with ``<|endoftext|>`` as SD v1 pads.
    """
    vocab = {tok: i for i, tok in enumerate([BOS, EOS, UNK, *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=EOS, model_max_length=max_length)


def build_embedded(cfg: DictConfig, vocabulary: list[str]) -> Components:
    """Stable Diffusion's architecture at toy size, randomly initialised from ``cfg``."""
    tokenizer = word_tokenizer(vocabulary, cfg.text_encoder.max_length)
    te = cfg.text_encoder
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=te.hidden_size, intermediate_size=te.hidden_size * 4,
        num_hidden_layers=te.layers, num_attention_heads=te.heads, max_position_embeddings=te.max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(te.seed)  # the frozen random encoder is part of the world: same seed, same embeddings
    text_encoder.apply(text_encoder._init_weights)
    vae = None
    if cfg.vae is not None:
        vae = AutoencoderKL(**OmegaConf.to_container(cfg.vae, resolve=True))
    unet = UNet2DConditionModel(**OmegaConf.to_container(cfg.unet, resolve=True),
                                cross_attention_dim=te.hidden_size)
    scheduler = DDPMScheduler(**OmegaConf.to_container(cfg.scheduler, resolve=True))
    return Components(unet, text_encoder, tokenizer, scheduler, vae)


def load_pretrained(path: str, revision: str | None = None, variant: str | None = None,
                    local_files_only: bool = False) -> Components:
    """Load any diffusers model folder or hub id (SD 1.x/2.x layout, VAE optional)."""
    check_pretrained(path)  # a wrong local path fails here in one line, not as a loader traceback
    root = Path(path).expanduser()
    local = root.is_dir()
    online = goes_online(path, local_files_only)
    kw = {"revision": revision, "local_files_only": not online}
    source = str(root) if local else path
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub an argument it has deprecated: a warning on every hub load.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant, **kw) \
                if not local or (root / "vae").is_dir() else None
            return Components(
                unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant, **kw),
                text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant, **kw),
                tokenizer=AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
                noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
                vae=vae,
            )
    except OSError as err:  # diffusers/transformers report a missing hub model or cache entry as OSError
        if local:
            raise
        raise hub_error(path, local_files_only, err, online=online) from None


def build_components(cfg: DictConfig, vocabulary: list[str]) -> Components:
    """Build or load per ``cfg.kind``; freeze the text encoder and VAE as SD fine-tuning does."""
    if cfg.kind == "embedded":
        comps = build_embedded(cfg, vocabulary)
    elif cfg.kind == "pretrained":
        comps = load_pretrained(cfg.pretrained, cfg.get("revision"), cfg.get("variant"),
                                cfg.get("local_files_only", False))
    else:
        raise ValueError(f"model.kind={cfg.kind!r}; expected 'embedded' or 'pretrained'")
    for frozen in (comps.text_encoder, comps.vae):
        if frozen is not None:
            frozen.requires_grad_(False).eval()
    return comps
