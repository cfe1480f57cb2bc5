"""Tiny, real diffusers ``FluxPipeline`` and ``WanPipeline`` objects, built offline from configs.

For tests and benchmarks of ``bac.diffusers`` on the real pipelines (their text encoding, latent packing,
schedulers, classifier-free guidance in ``transformer.cache_context("cond" / "uncond")`` and VAE decoding)
without downloading anything: every model has random weights drawn from ``seed``, every tokenizer is built
from a small in-memory vocabulary, and every model is in ``eval()`` mode (constructors leave train mode,
where T5's dropout would make two identical calls differ). The shapes are in each builder's docstring.

::

    from benchmarks.tiny_pipelines import call_kwargs, tiny_flux_pipeline
    pipe = tiny_flux_pipeline()
    latents = pipe(**call_kwargs("flux", num_inference_steps=6)).images
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = ["call_kwargs", "tiny_flux_pipeline", "tiny_wan_pipeline"]

TEXT_TOKENS = 8  # max_sequence_length of the T5 / UMT5 prompts (FLUX and Wan default to 512)
CLIP_TOKENS = 77  # CLIP's model_max_length, as released
TEXT_DIM = 16  # width of every text encoder
WORDS = ("a", "an", "the", "cat", "dog", "robot", "arm", "red", "blue", "cube", "photo", "of", "on", "table",
         "blurry", "low", "quality", "picks", "up", "video")
PROMPTS = ["a photo of a cat", "a robot picks up a red cube"]  # each fits in TEXT_TOKENS with </s>
NEGATIVE_PROMPT = "blurry low quality video"


def _t5_tokenizer() -> T5Tokenizer:
    """A Unigram tokenizer in T5's layout (<pad>=0, </s>=1, <unk>=2), whole words plus single letters."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in letters]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TEXT_TOKENS)


def _clip_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE with letters as the whole vocabulary (no merges): prompts are spelled out letter by letter."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [c + "</w>" for c in letters]:  # </w>: the last letter of a word
        vocab[token] = len(vocab)
    # FluxPipeline pads CLIP prompts to tokenizer.model_max_length
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_TOKENS)


def _seeded(seed: int, build):
    """``build()``'s model with weights drawn from ``seed``, in eval mode; the caller's global RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A ``FluxPipeline`` with tiny random FLUX.1 transformer, CLIP and T5 encoders and VAE.

    With :func:`call_kwargs`' defaults (two prompts, one output per prompt): 16x16 RGB images; the VAE
    (``AutoencoderKL``, block_out_channels (8, 8)) halves the side into 4-channel 8x8 latents, which the
    pipeline packs into 2x2 patches: the transformer (``FluxTransformer2DModel``: 2 dual-stream + 2
    single-stream blocks, 2 heads of dimension 8, RoPE axes (2, 2, 4)) sees 16 image tokens of 16 channels
    and 8 text tokens (T5 encoder, width 16; CLIP's pooled output, width 16). ``output_type="latent"`` gives
    the packed latents, (2, 16, 16).
    """
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    clip = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=CLIP_TOKENS, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)))  # eos_token_id not 2: the pooled output is read at each prompt's first eos
    t5 = _seeded(seed + 1, lambda: T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")))
    transformer = _seeded(seed + 2, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False, axes_dims_rope=(2, 2, 4)))  # FLUX.1-schnell style: no distilled guidance input
    vae = _seeded(seed + 3, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=16, scaling_factor=0.3611, shift_factor=0.1159,  # FLUX.1's VAE constants
        use_quant_conv=False, use_post_quant_conv=False))
    # FLUX.1-dev's scheduler config: the shift follows the image's token count
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5,
                        tokenizer_2=t5_tokenizer, transformer=transformer)


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """A ``WanPipeline`` (Wan 2.1 text-to-video): tiny random transformer, UMT5 encoder and VAE.

    With :func:`call_kwargs`' defaults (two prompts, one output per prompt): 5 frames of 16x16 RGB video;
    the VAE (``AutoencoderKLWan``, one spatial and temporal downsampling) gives 4-channel latents of 3
    frames x 8x8, which the transformer (``WanTransformer3DModel``: 2 blocks, 2 heads of dimension 12,
    patch (1, 2, 2)) sees as 3 x 4 x 4 = 48 tokens, with 8 text tokens (UMT5 encoder, width 16).
    ``output_type="latent"`` gives latents of shape (2, 4, 3, 8, 8).
    """
    tokenizer = _t5_tokenizer()
    umt5 = _seeded(seed, lambda: UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")))
    transformer = _seeded(seed + 1, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32))
    # One down/upsampling level, in space and time: the pipeline reads the scale factors from the config
    vae = _seeded(seed + 2, lambda: AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2, scale_factor_spatial=2))
    # Wan 2.1's released scheduler: UniPC on flow-matching sigmas
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=umt5, vae=vae, scheduler=scheduler, transformer=transformer)


def call_kwargs(
    kind: Literal["flux", "wan"],
    *,
    num_inference_steps: int = 6,
    seed: int = 0,
    guidance: bool = True,
    per_prompt: int = 1,
    output_type: str = "latent",
) -> dict[str, Any]:
    """The keyword arguments of one call of the ``kind`` pipeline, so tests and benchmarks call them alike.

    Two prompts, ``per_prompt`` outputs each, 16x16 pixels (Wan: 5 frames), 8 text tokens, a fresh
    generator seeded with ``seed`` (build new kwargs for every call: the generator's state is consumed).
    With ``guidance``, classifier-free guidance with a negative prompt: the transformer runs twice per
    step, in ``cache_context("cond")`` and ``("uncond")`` (FLUX: ``true_cfg_scale=2``; Wan:
    ``guidance_scale=3``); without, once (FLUX's ``true_cfg_scale=1``; Wan's ``guidance_scale=1``).
    """
    kwargs: dict[str, Any] = dict(prompt=list(PROMPTS), height=16, width=16, num_inference_steps=num_inference_steps,
                                  max_sequence_length=TEXT_TOKENS, generator=torch.Generator().manual_seed(seed),
                                  output_type=output_type)
    if guidance:
        kwargs["negative_prompt"] = [NEGATIVE_PROMPT] * len(PROMPTS)  # FLUX does not broadcast one
    if kind == "flux":
        return {**kwargs, "true_cfg_scale": 2.0 if guidance else 1.0, "num_images_per_prompt": per_prompt}
    if kind == "wan":
        return {**kwargs, "num_frames": 5, "guidance_scale": 3.0 if guidance else 1.0,
                "num_videos_per_prompt": per_prompt}
    raise ValueError(f"unknown pipeline kind {kind!r}: 'flux' or 'wan'")
