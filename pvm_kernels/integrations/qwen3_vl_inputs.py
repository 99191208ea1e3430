"""Qwen3-VL prompts made in code: a drawn image through the real Qwen3-VL image processor.

Used by the CLI's demo and analyze: the pixels go through transformers' own Qwen2-VL image
processor (the one Qwen3-VL checkpoints name), so ``pixel_values`` / ``image_grid_thw`` are
exactly what a user's pipeline produces. Needs Pillow.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .tiny_qwen3_vl import pad_prompts


def synthetic_image(width: int = 320, height: int = 256, seed: int = 0):
    """A PIL RGB image drawn in code: a colour gradient with a few filled shapes."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / width, ys / height, 0.5 + 0.5 * np.sin(xs / 23.0 + ys / 31.0)], -1)
    image = Image.fromarray((base * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        size = int(rng.integers(min(width, height) // 8, min(width, height) // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + size, y0 + size], fill=colour)
    return image


def image_processor_for(config, max_pixels: int = 512 * 512):
    """The real Qwen2-VL/Qwen3-VL image processor set up for ``config.vision_config``
    (patch size, temporal patch, spatial merge; mean and std 0.5 as Qwen3-VL ships)."""
    import transformers

    # transformers 5 splits the processor by backend; the PIL one needs no torchvision.
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    return cls(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
               merge_size=vision.spatial_merge_size, image_mean=[0.5] * 3, image_std=[0.5] * 3,
               min_pixels=factor * factor, max_pixels=max_pixels)


def image_prompt(config, images: Sequence, image_processor=None,
                 prefix_ids: Sequence[int] = (11, 12), suffix_ids: Sequence[int] = (13, 14, 15)) -> dict:
    """Model inputs for one prompt per image: ``prefix <vision_start> <image>*n <vision_end>
    suffix`` with n = the processor's merged patch count. Returns input_ids,
    attention_mask (left-padded), pixel_values, image_grid_thw (and mm_token_type_ids
    where the installed transformers takes it)."""
    processor = image_processor or image_processor_for(config)
    pixels = processor(images=list(images), return_tensors="pt")
    merge = config.vision_config.spatial_merge_size
    rows = []
    for grid in pixels["image_grid_thw"]:
        n = int(grid.prod()) // (merge * merge)
        rows.append(list(prefix_ids) + [config.vision_start_token_id]
                    + [config.image_token_id] * n + [config.vision_end_token_id] + list(suffix_ids))
    batch = pad_prompts(rows, config.image_token_id)
    batch["pixel_values"] = pixels["pixel_values"]
    batch["image_grid_thw"] = pixels["image_grid_thw"]
    return batch


def special_token_ids(config) -> list:
    """Vision placeholder ids a random model must never generate (an image token without
    pixels is an error in Qwen3-VL's forward)."""
    return [config.image_token_id, config.video_token_id, config.vision_start_token_id,
            config.vision_end_token_id]


def move_to(batch: dict, device: torch.device, dtype: Optional[torch.dtype] = None) -> dict:
    """The batch on ``device``; floating tensors (pixel_values) cast to ``dtype`` if given."""
    return {k: (v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device))
            for k, v in batch.items()}
