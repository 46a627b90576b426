"""A complete Stable Diffusion pipeline folder at toy size, written on the fly.

Every component is the real diffusers/transformers class with random weights (UNet, VAE, CLIP
text model, a CLIP BPE tokenizer from vocab and merges files written here, DDPM scheduler), saved
with ``StableDiffusionPipeline.save_pretrained`` so the folder has the layout of SD v1.4's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

MERGED_WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "blue", "circle", "square")


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """CLIP's byte-level BPE: every byte as a token (plain and word-final), plus merges that
    make a few whole words single tokens."""
    symbols = list(bytes_to_unicode().values())
    vocab_tokens = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in MERGED_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab_tokens.append(pieces[0])
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


# SD v1.4's component sizes (860M-parameter UNet, 84M VAE, 123M CLIP ViT-L/14 text encoder).
SD14 = {
    "text": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "hidden_act": "quick_gelu"},
    "vae": {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32},
    "unet": {"layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280],
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 768,
             "attention_head_dim": 8, "norm_num_groups": 32},
}
TINY = {
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "vae": {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8},
    "unet": {"layers_per_block": 1, "block_out_channels": [32, 64],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 32,
             "attention_head_dim": 8, "norm_num_groups": 8},
}


def write_tiny_sd(path: str | Path, resolution: int = 32, seed: int = 0, max_length: int = 77,
                  sizes: dict = TINY) -> Path:
    """Write a loadable SD pipeline folder (latents at ``resolution // 2`` with the tiny VAE, // 8 with
    SD's) and return its path. ``sizes=SD14`` writes one of SD v1.4's size (random weights, about
    4.3 GB in float32: for benchmarks on a GPU machine)."""
    path = Path(path)
    write_tokenizer_files(path / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(path / "_tokenizer_src", model_max_length=max_length)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **{"vocab_size": len(tokenizer), **sizes["text"]}, max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=resolution, **sizes["vae"])
    downsampling = 2 ** (len(sizes["vae"]["block_out_channels"]) - 1)
    unet = UNet2DConditionModel(sample_size=resolution // downsampling, in_channels=4, out_channels=4,
                                **sizes["unet"])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    for leftover in (path / "_tokenizer_src").iterdir():
        leftover.unlink()
    (path / "_tokenizer_src").rmdir()
    return path
