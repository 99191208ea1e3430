"""Small random Qwen3-VL models built from transformers itself, and synthetic inputs.

No weights are downloaded. The tests' tiny model is a configuration checked to build, run
and generate on transformers 4.57 and 5.x (text hidden 64, 4 layers, 4 heads, 2 KV heads,
head_dim 16; vision depth 2, patch 8, spatial merge 2, temporal patch 2; docs/qwen3_vl.md,
"The tiny test and demo models"); the CLI's small model is a little larger and uses
Qwen3-VL's real patch size, so the real image processor can feed it.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 500, 501, 502, 503
PATCH, MERGE, TEMPORAL = 8, 2, 2


_TINY_TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=192)
_TINY_VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                    patch_size=PATCH, num_position_embeddings=64)
# The CLI's default model: still seconds on a CPU, with Qwen3-VL's real patch size (16) so the
# real image processor's output feeds it, and the 8B block's head layout (H 4, Hkv 1 at P 128).
_SMALL_TEXT = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                   head_dim=32, intermediate_size=768)
_SMALL_VISION = dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=256,
                     patch_size=16, num_position_embeddings=256)
SMALL_PVM_HIDDEN_SIZE = 128


def _qwen3_vl_config(text_fields: dict, vision_fields: dict, text_overrides: dict):
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=512, max_position_embeddings=4096,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                              "mrope_interleaved": True},
                rms_norm_eps=1e-6, tie_word_embeddings=False, **text_fields)
    text.update(text_overrides)
    vision = dict(spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3,
                  deepstack_visual_indexes=[0, 1], **vision_fields)
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                         video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                         vision_end_token_id=VISION_END)


def tiny_qwen3_vl_config(**text_overrides):
    """Qwen3VLConfig of the tests' tiny model (text fields overridable, e.g. num_hidden_layers)."""
    return _qwen3_vl_config(_TINY_TEXT, _TINY_VISION, text_overrides)


def small_qwen3_vl_config(**text_overrides):
    """Qwen3VLConfig of the CLI's default model: text D 256, 6 layers, 8 heads / 2 KV heads of
    32, vision patch 16 (Qwen3-VL's), spatial merge 2; PVM at P 128 gives H 4, Hkv 1."""
    return _qwen3_vl_config(_SMALL_TEXT, _SMALL_VISION, text_overrides)


def _build(config, seed: int, dtype: torch.dtype):
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).to(dtype).eval()


def tiny_qwen3_vl(seed: int = 0, dtype: torch.dtype = torch.float32, **text_overrides):
    """The tiny Qwen3VLForConditionalGeneration with random weights (eval mode)."""
    return _build(tiny_qwen3_vl_config(**text_overrides), seed, dtype)


def small_qwen3_vl(seed: int = 0, dtype: torch.dtype = torch.float32, **text_overrides):
    """The CLI's small Qwen3VLForConditionalGeneration with random weights (eval mode)."""
    return _build(small_qwen3_vl_config(**text_overrides), seed, dtype)


def synthetic_image_patches(grid_hw: Tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Patch rows of a smooth synthetic image for a (1, h, w) grid: [h * w, 3 * 2 * 8 * 8]."""
    h, w = grid_hw
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, h * PATCH)[:, None]
    xs = torch.linspace(-1, 1, w * PATCH)[None, :]
    phase = torch.rand(3, generator=g) * 6.28
    image = torch.stack([torch.sin(3 * xs + 2 * ys + p) for p in phase])  # [3, H, W]
    # Patch rows in the processor's order: (patch row, patch col) then (C, T, ph, pw).
    patches = image.reshape(3, h, PATCH, w, PATCH).permute(1, 3, 0, 2, 4)  # h, w, C, ph, pw
    patches = patches[:, :, :, None].expand(h, w, 3, TEMPORAL, PATCH, PATCH)
    return patches.reshape(h * w, 3 * TEMPORAL * PATCH * PATCH).contiguous()


def pad_prompts(rows: Sequence[Sequence[int]], image_token_id: int = IMAGE_TOKEN) -> dict:
    """Left-pad token rows to one length (pad id 0, attention_mask 0), as for generation.

    Returns input_ids and attention_mask [B, L] int64, plus mm_token_type_ids (1 at image
    tokens) where the installed transformers' Qwen3-VL forward takes it.
    """
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = torch.tensor(list(r), dtype=torch.long)
        attention_mask[i, length - len(r):] = 1
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if _takes_mm_token_type_ids():  # transformers 5.24 requires it, 4.57 rejects it
        batch["mm_token_type_ids"] = (input_ids == image_token_id).long()
    return batch


def _takes_mm_token_type_ids() -> bool:
    import inspect

    from transformers import Qwen3VLForConditionalGeneration
    return "mm_token_type_ids" in inspect.signature(Qwen3VLForConditionalGeneration.forward).parameters


def tiny_batch(image_grids: Sequence[Union[None, Tuple[int, int], Sequence[Tuple[int, int]]]],
               text_len: int = 6, seed: int = 0) -> dict:
    """Model inputs for a batch: row i has an image of grid image_grids[i] (None: text only;
    a list of grids: that many images in the row, text between them).

    Rows are left-padded to one length (pad id 0, attention_mask 0), as for generation.
    Returns input_ids, attention_mask, mm_token_type_ids (where the installed transformers
    takes it) and, when any row has an image, pixel_values and image_grid_thw.
    """
    g = torch.Generator().manual_seed(seed)
    rows: List[List[int]] = []
    pixels, grids = [], []
    for i, row_grids in enumerate(image_grids):
        text = torch.randint(1, 400, (text_len,), generator=g).tolist()
        if row_grids is None:
            rows.append(text)
            continue
        if isinstance(row_grids[0], int):
            row_grids = [row_grids]
        row = text[:2]
        for j, grid in enumerate(row_grids):
            n_tokens = grid[0] * grid[1] // (MERGE * MERGE)
            row += [VISION_START] + [IMAGE_TOKEN] * n_tokens + [VISION_END] + text[2 + j:3 + j]
            pixels.append(synthetic_image_patches(grid, seed + i + 7 * j))
            grids.append([1, grid[0], grid[1]])
        rows.append(row + text[2 + len(row_grids):])
    batch = pad_prompts(rows)
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.tensor(grids)
    return batch


def tiny_processor(config):
    """A Qwen3VLProcessor for the tiny models, made offline: a word-level tokenizer whose
    words are ``w0`` ... ``w499`` (ids 0-499), Qwen3-VL's vision tokens at their ids
    (``<|image_pad|>`` 500, ...) and ``<|endoftext|>`` 511, with the real image processor
    (qwen3_vl_inputs.image_processor_for). What ``pipeline("image-text-to-text")`` needs to
    run a tiny model saved with it; Qwen3-VL's video processor needs torchvision."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from .qwen3_vl_inputs import image_processor_for

    specials = {"<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": VIDEO_TOKEN,
                "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END,
                "<|endoftext|>": 511}
    vocab = {f"w{i}": i for i in range(IMAGE_TOKEN)}
    vocab.update({f"<|unused{i}|>": i for i in range(VISION_END + 1, 511)}, **specials)
    words = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()  # words joined with spaces (no "##" in this vocab)

    def make(cls):
        return cls(tokenizer_object=words, unk_token="w0", pad_token="w0",
                   eos_token="<|endoftext|>", additional_special_tokens=list(specials)[:4])

    image_processor = image_processor_for(config)
    video_processor = transformers.Qwen3VLVideoProcessor()
    # transformers 5 saves and reloads a generic fast tokenizer as it is (its Qwen2Tokenizer
    # rebuilds a byte-level BPE on load); 4.57's processor takes only Qwen2TokenizerFast.
    try:
        return transformers.Qwen3VLProcessor(image_processor=image_processor,
                                             tokenizer=make(transformers.PreTrainedTokenizerFast),
                                             video_processor=video_processor)
    except TypeError:
        return transformers.Qwen3VLProcessor(image_processor=image_processor,
                                             tokenizer=make(transformers.Qwen2TokenizerFast),
                                             video_processor=video_processor)
