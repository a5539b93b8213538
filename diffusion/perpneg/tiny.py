"""Tiny random diffusion components built offline (tests, benchmarks, CPU smoke runs): SD 1.x-style, SDXL, SD3, Flux.
Never downloads."""

from __future__ import annotations

import json
from pathlib import Path

import torch


# Copied from transformers.convert_slow_tokenizer.bytes_to_unicode (reformatted; its home moved between transformers
# versions, so the tiny tokenizer keeps its own)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tiny_clip_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json / merges.txt of a byte-level CLIP tokenizer (single bytes + a few merges) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = [("a", "n"), ("t", "h"), ("e", "r"), ("o", "n"), ("i", "n")]
    vocab_list += [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def make_tiny_components(tmp: str | Path, seed: int = 0, sample_size: int = 8, hidden: int = 32) -> dict:
    """Tiny UNet2DConditionModel / AutoencoderKL / CLIPTextModel / CLIPTokenizer / DDIMScheduler (random weights)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = write_tiny_clip_tokenizer(Path(tmp) / "tiny_tokenizer")
    tokenizer = CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden, norm_num_groups=8, attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=hidden,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
        "scheduler": scheduler, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
    }


def make_tiny_pipeline(tmp: str | Path, seed: int = 0, cls=None, **kw):
    """A tiny PerpNegStableDiffusionPipeline (or ``cls``) from random components."""
    if cls is None:
        from .pipeline import PerpNegStableDiffusionPipeline as cls
    pipe = cls(**make_tiny_components(tmp, seed=seed, **kw))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sdxl_components(tmp: str | Path, seed: int = 0) -> dict:
    """Tiny SDXL components (two CLIP text encoders, a text_time UNet, AutoencoderKL, Euler; random weights) as the
    keyword arguments of ``StableDiffusionXLPipeline`` (8x8 latents, 16x16 images)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok_dir = write_tiny_clip_tokenizer(Path(tmp) / "tiny_tokenizer")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=16 + 6 * 8,
        cross_attention_dim=32, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    cfg = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
               max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, projection_dim=16)
    return dict(
        vae=vae.eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval(), tokenizer=tok, tokenizer_2=tok,
        unet=unet.eval(), scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, timestep_spacing="leading", steps_offset=1))


def _tiny_clip_tokenizer(tmp: str | Path):
    from transformers import CLIPTokenizer

    tok_dir = write_tiny_clip_tokenizer(Path(tmp) / "tiny_tokenizer")
    return CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


def _tiny_clip_config(tok, hidden: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=hidden)


def _tiny_flow_vae(latent_channels: int, sample_size: int):
    """A two-level AutoencoderKL (vae_scale_factor 2) with SD3/Flux-style scaling and shift factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=sample_size, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def make_tiny_sd3_components(tmp: str | Path, seed: int = 0, sample_size: int = 16, hidden: int = 32,
                             num_layers: int = 2) -> dict:
    """Tiny SD3 components (an MMDiT ``SD3Transformer2DModel``, two CLIP text encoders with projection, no T5,
    AutoencoderKL, FlowMatchEuler; random weights) as the keyword arguments of ``StableDiffusion3Pipeline``.

    ``sample_size`` is the latent size (default 16: 32x32 images, 8x8 = 64 image tokens with patch 2); ``hidden`` is
    the transformer's width (the two CLIP encoders are ``hidden // 2`` wide, so their concatenation fills it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tok = _tiny_clip_tokenizer(tmp)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=8, num_attention_heads=hidden // 8, joint_attention_dim=hidden,
        caption_projection_dim=hidden, pooled_projection_dim=hidden, pos_embed_max_size=max(sample_size // 2, 8))
    vae = _tiny_flow_vae(4, sample_size * 2)
    cfg = _tiny_clip_config(tok, hidden // 2)
    return dict(
        transformer=transformer.eval(), vae=vae, text_encoder=CLIPTextModelWithProjection(cfg).eval(),
        text_encoder_2=CLIPTextModelWithProjection(cfg).eval(), tokenizer=tok, tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def make_tiny_t5_tokenizer():
    """A character-level T5TokenizerFast (Unigram over lowercase letters, digits and punctuation), built in memory."""
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def make_tiny_flux_components(tmp: str | Path, seed: int = 0, guidance_embeds: bool = True, sample_size: int = 16,
                              hidden: int = 32, num_layers: int = 1) -> dict:
    """Tiny Flux components (``FluxTransformer2DModel``, CLIPTextModel, a T5 encoder with a character-level
    tokenizer, AutoencoderKL, FlowMatchEuler with dynamic shifting as Flux.1-dev; random weights) as the keyword
    arguments of ``FluxPipeline``.

    ``guidance_embeds=True`` is a guidance-distilled (dev-like) transformer, False a CFG base. ``sample_size`` is the
    latent size (default 16: 32x32 images, 8x8 = 64 packed tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = _tiny_clip_tokenizer(tmp), make_tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_layers, attention_head_dim=16,
        num_attention_heads=hidden // 16, joint_attention_dim=hidden, pooled_projection_dim=hidden,
        guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8])
    vae = _tiny_flow_vae(4, sample_size * 2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=hidden, d_ff=2 * hidden, d_kv=8,
                                 num_layers=2, num_heads=hidden // 8, relative_attention_num_buckets=8,
                                 pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                                 decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return dict(
        transformer=transformer.eval(), vae=vae, text_encoder=CLIPTextModel(_tiny_clip_config(clip_tok, hidden)).eval(),
        tokenizer=clip_tok, text_encoder_2=t5.eval(), tokenizer_2=t5_tok, scheduler=scheduler)
