"""The embedding cache's format: what ``fashiondiff.embed`` writes and ``fashiondiff.cache.reader`` reads.

Layout (format 2). Per image (position ``i``, memory-mapped ``.npy``): ``latents``
(MoVQ), ``image_embeds`` (CLIP), ``caption`` (int32 row of the caption arrays) and
``rows`` (position -> ``row`` of captions.parquet). Per UNIQUE caption (FashionGen's
poses of a product share their title, and many products share one): ``text_embeds``
(CLIP pooled), ``mclip_embeds`` and ``mclip_hidden`` (all 77 positions), and the CLIP
text hidden states of the caption's real tokens only, concatenated in ``text_hidden``
with ``text_offsets`` (caption ``c`` owns rows ``offsets[c]:offsets[c+1]``; its length is
the attention mask, which CLIP's tokenizer pads on the right). ``fetch`` hands training
the per-image layout of format 1: text hidden states zero-padded back to 77 positions,
the mask rebuilt from the lengths. Plus the encodings of the empty caption and of the
blank image (condition dropout, stored whole) and ``meta.json``, which records the
models and preprocessing that made it.

Why the two text arrays differ (diffusers 0.42.1, checked in its code):

* The prior never sees CLIP's padded positions. ``KandinskyPriorPipeline._encode_prompt``
  keeps the tokenizer's mask (pipelines/kandinsky/pipeline_kandinsky_prior.py:326) and
  passes it as ``attention_mask`` to the prior (:507-508); ``PriorTransformer.forward``
  turns it into an additive -10000 bias on those key positions for every query
  (models/transformers/prior_transformer.py:290-293), on top of the causal mask
  (:157-162), and reads only the last token's output (:308-309). exp(-10000 + s) is 0 in
  float32/bf16/fp16, so whatever the padded hidden states hold contributes exactly 0:
  they need not be stored (tests/test_embed.py checks the loss is bit-identical with
  zeros there). The positions still matter (fixed 81-entry positional embedding and
  causal mask, :121, :157), hence the padding back to 77 at batch time.
* The 2.1 U-Net attends to all 77 M-CLIP positions. ``KandinskyPipeline`` runs
  M-CLIP with the mask (pipelines/kandinsky/pipeline_kandinsky.py:165-168) but calls the
  U-Net without ``encoder_attention_mask`` (:360-366); ``TextImageProjection`` projects
  every position (models/embeddings.py:1267-1277, via unet_2d_condition.py:947-955) and
  the mask bias is applied only when one is given (unet_2d_condition.py:1072). XLM-R's
  outputs at padded positions depend on the caption (they attend to its tokens), so
  ``mclip_hidden`` stays whole. Its mask is not stored: nothing downstream reads it.

At full size in float16 (``embed.dtype``, recommended for real runs) this is about
50 KiB per FashionGen image against 284 KiB in format 1 (bench/bench_cache.py).
"""

from __future__ import annotations

FORMAT_VERSION = 2  # 1: every text array stored once per image, 77 positions
TEXT_LENGTH = 77  # CLIP's context length (2.1's prior has one embedding per position): stored positions

# What must match between a cache and the params that read it.
IDENTITY_KEYS = ("prior", "decoder", "clip_image_size", "resolution", "dtype")

IMAGE_ARRAYS = ("latents", "image_embeds")
CAPTION_ARRAYS = ("text_embeds", "mclip_embeds", "mclip_hidden")  # one row per unique caption
FIELDS = IMAGE_ARRAYS + CAPTION_ARRAYS + ("text_hidden", "text_mask")  # what ``Cache.fetch`` hands out


def cache_identity(prior: str, decoder: str, clip_image_size: int, resolution: int, dtype: str) -> dict:
    return {"prior": prior, "decoder": decoder, "clip_image_size": clip_image_size,
            "resolution": resolution, "dtype": dtype}
