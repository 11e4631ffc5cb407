"""Loading a CLIP dual encoder, Long-CLIP text positions, and the features the objectives use.

Long captions need more than CLIP's 77 text positions. The text position table is extended to
77 + 248 rows: rows 0-76 are the original positions, which short captions and region phrases
keep using; rows 77-324 are a 248-position table made Long-CLIP's way (the first 20 positions
kept, the other 57 stretched by interpolation), which long captions use. The model stays a plain
`CLIPModel` that `save_pretrained`/`from_pretrained` handle; its config records the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import FgdataError, first_line

LONG_TEXT_KEY = "fgdata_long_text"  # in the text config: {"short": 77, "long": 248}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipParts:
    model: object  # transformers CLIPModel
    tokenizer: object
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_clip(reference: str, revision: str | None = None) -> ClipParts:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(reference, revision=revision, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(reference, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise FgdataError(f"cannot load CLIP model {reference!r}: {first_line(exc)}") from None
    try:
        processor = AutoImageProcessor.from_pretrained(reference, revision=revision, trust_remote_code=False)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError):
        mean, std = CLIP_MEAN, CLIP_STD
    return ClipParts(model, tokenizer, mean, std)


def short_positions(model) -> int:
    layout = getattr(model.config.text_config, LONG_TEXT_KEY, None)
    return layout["short"] if layout else model.config.text_config.max_position_embeddings


def long_positions(model) -> int:
    layout = getattr(model.config.text_config, LONG_TEXT_KEY, None)
    return layout["long"] if layout else model.config.text_config.max_position_embeddings


def extend_text_positions(model, long_tokens: int = 248, keep: int = 20) -> None:
    """Adds the Long-CLIP table after the original positions (a no-op if already extended)."""
    config = model.config.text_config
    if getattr(config, LONG_TEXT_KEY, None):
        return
    embeddings = model.text_model.embeddings
    original = embeddings.position_embedding.weight.data
    short = original.shape[0]
    if not 0 < keep < short:
        raise FgdataError(f"fgclip.keep_positions must be between 1 and {short - 1}, got {keep}")
    tail = original[keep:].T.unsqueeze(0)  # (1, dim, short - keep)
    stretched = F.interpolate(tail, size=long_tokens - keep, mode="linear", align_corners=True)[0].T
    table = torch.cat([original, original[:keep], stretched])
    embeddings.position_embedding = torch.nn.Embedding.from_pretrained(table, freeze=False)
    embeddings.register_buffer("position_ids", torch.arange(table.shape[0]).unsqueeze(0), persistent=False)
    config.max_position_embeddings = table.shape[0]
    setattr(config, LONG_TEXT_KEY, {"short": short, "long": long_tokens})


def encode_text(model, tokenizer, texts: list[str], long: bool, device) -> torch.Tensor:
    """L2-normalised text embeddings; long texts use the Long-CLIP positions when the model has them."""
    length = long_positions(model) if long else short_positions(model)
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt").to(device)
    offset = short_positions(model) if long and getattr(model.config.text_config, LONG_TEXT_KEY, None) else 0
    positions = (torch.arange(tokens.input_ids.shape[1], device=device) + offset).unsqueeze(0)
    features = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, position_ids=positions)
    features = getattr(features, "pooler_output", features)
    return F.normalize(features, dim=-1)


def image_and_patch_features(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised image embeddings (B, D), projected patch features on their grid (B, D, g, g)).

    The patch tokens of the last layer go through the same post-layernorm and projection as the
    class token, so box features pooled from them live in the joint space (FG-CLIP's dense features)."""
    vision = model.vision_model(pixel_values=pixel_values)
    pooled = model.visual_projection(vision.pooler_output)
    patches = model.visual_projection(model.vision_model.post_layernorm(vision.last_hidden_state[:, 1:, :]))
    side = int(patches.shape[1] ** 0.5)
    grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
    return F.normalize(pooled, dim=-1), grid


def box_features(grid: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """RoIAlign over the patch grid: `boxes` (R, 5) = batch index, x1, y1, x2, y2 in 0-1 units."""
    from torchvision.ops import roi_align

    if boxes.shape[0] == 0:
        return grid.new_zeros((0, grid.shape[1]))
    scaled = boxes.clone().to(grid.dtype)
    scaled[:, 1:] = scaled[:, 1:] * grid.shape[-1]
    pooled = roi_align(grid, scaled, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return F.normalize(pooled.mean(dim=(2, 3)), dim=-1)
