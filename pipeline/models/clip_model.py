"""Loading a CLIP dual encoder, Long-CLIP text positions, and the features the objectives use.

Long captions need more than CLIP's 77 text positions. The text position table is extended to
77 + 248 rows: rows 0-76 are the original positions, which short captions and region phrases
keep using; rows 77-324 are a 248-position table made Long-CLIP's way (`long_clip_positions`),
which long captions use. Both parts stay trainable, as in FG-CLIP (fgclip.py:84-120).

Long captions also get their own projection, `text_filip_projection` (FG-CLIP fgclip.py:69,
227-230, 358-360), copied from `text_projection` when the table is extended (fgclip.py:124-126).
In memory the model is a `CLIPModel` subclass that only adds that projection when its config
records the extended layout.

On disk a model is read in one of three layouts, told apart by its weight names:
- OpenAI's CLIP (77 positions, no long projection): the table is extended on first training;
- fgdata's earlier outputs: one 77 + 248 row table, the layout recorded in the text config;
- FG-CLIP's (`FGCLIPModel`, fgclip.py:62-74, modeling_clip.py:257-265): `position_embedding` (77),
  `position_embedding_res` and `position_embedding_ori` (248 each; a long caption's position i
  takes `_ori` below 20 and `_res` from 20 on, modeling_clip.py:262-265, 293-294),
  `text_filip_projection`, and the regional and hard-negative temperatures
  `logit_scale_finegraind` and `logit_scale_hardneg`.
Anything else is refused. `save_clip` writes FG-CLIP's layout, which FG-CLIP's own class loads and
a plain `CLIPModel` reads as an OpenAI CLIP.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.errors import FgdataError, first_line, shown

LONG_TEXT_KEY = "fgdata_long_text"  # in the text config: {"short": 77, "long": 248}
LONG_PROJECTION = "text_filip_projection"  # FG-CLIP's name for the long-caption projection
_POSITIONS = "text_model.embeddings.position_embedding.weight"
# FG-CLIP's long-caption tables and where its mask switches from the first to the second
# (modeling_clip.py:260-265: fixed at 20, whatever the config says)
FGCLIP_ORI, FGCLIP_RES, FGCLIP_MASK_SPLIT = "text_model.embeddings.position_embedding_ori.weight", "text_model.embeddings.position_embedding_res.weight", 20
# FG-CLIP's names for the regional and hard-negative temperatures (fgclip.py:73-74)
REGION_SCALE, HARD_NEGATIVE_SCALE = "logit_scale_finegraind", "logit_scale_hardneg"
_FGCLIP_EXTRAS = {FGCLIP_ORI, FGCLIP_RES, f"{LONG_PROJECTION}.weight", REGION_SCALE, HARD_NEGATIVE_SCALE}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_INTERPOLATION = 4  # Long-CLIP stretches every position after the kept ones 4 times


@dataclass
class ClipParts:
    model: object  # transformers CLIPModel
    tokenizer: object
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    logit_scales: dict = field(default_factory=dict)  # REGION_SCALE / HARD_NEGATIVE_SCALE: floats an FG-CLIP layout holds


_MODEL_CLASS = None


def clip_class():
    """CLIPModel with FG-CLIP's long-caption projection when the config says the model has one
    (made on first use: importing transformers is slow and most commands never need it)."""
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        from transformers import CLIPModel

        class FgdataClipModel(CLIPModel):
            def __init__(self, config):
                super().__init__(config)
                if getattr(config.text_config, LONG_TEXT_KEY, None):
                    self.add_module(LONG_PROJECTION, torch.nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False))

        _MODEL_CLASS = FgdataClipModel
    return _MODEL_CLASS


def load_clip(reference: str, revision: str | None = None) -> ClipParts:
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        model, info = clip_class().from_pretrained(reference, revision=revision, use_safetensors=True, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(reference, revision=revision, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a weight of another shape
        raise FgdataError(f"cannot load CLIP model {reference!r}: {first_line(exc)}") from None
    scales = {}
    if _layout(reference, model, info) == "fgclip":
        stored = _stored_tensors(reference, revision, _FGCLIP_EXTRAS & set(info["unexpected_keys"]))
        _check_fgclip_shapes(reference, model, stored)
        ori, res = stored[FGCLIP_ORI], stored[FGCLIP_RES]
        long_table = torch.where(torch.arange(res.shape[0]).unsqueeze(1) < FGCLIP_MASK_SPLIT, ori, res)
        _add_long_text(model, long_table, stored[f"{LONG_PROJECTION}.weight"])
        scales = {name: float(stored[name]) for name in (REGION_SCALE, HARD_NEGATIVE_SCALE) if name in stored}
    elif hasattr(model, LONG_PROJECTION) and f"{LONG_PROJECTION}.weight" in info["missing_keys"]:
        # saved before the long projection existed: long captions went through text_projection
        _copy_projection(model)
    try:
        processor = AutoImageProcessor.from_pretrained(reference, revision=revision, trust_remote_code=False)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError):
        mean, std = CLIP_MEAN, CLIP_STD
    return ClipParts(model, tokenizer, mean, std, scales)


def _layout(reference: str, model, info: dict) -> str:
    """"clip" (OpenAI's, or fgdata's one-table layout) or "fgclip" by the weights the checkpoint
    holds beside those the model expects; FgdataError when they match neither: a weight left
    random or one thrown away must never pass unnoticed."""
    missing = set(info["missing_keys"])
    unexpected = {k for k in info["unexpected_keys"] if not k.endswith("position_ids")}  # buffers older checkpoints saved
    if is_extended(model):
        missing.discard(f"{LONG_PROJECTION}.weight")  # fgdata's outputs before the long projection
    if not missing and not unexpected:
        return "clip"
    needed = {FGCLIP_ORI, FGCLIP_RES, f"{LONG_PROJECTION}.weight"}
    if not missing and not is_extended(model) and needed <= unexpected <= _FGCLIP_EXTRAS:
        return "fgclip"
    # names from the file: quoted and cut short, a few of each kind
    found = ", ".join(f"{kind} {', '.join(map(shown, sorted(keys)[:3]))}{' ...' if len(keys) > 3 else ''}" for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
    raise FgdataError(f"cannot load CLIP model {reference!r}: its weights match neither a CLIP's nor FG-CLIP's layout ({found})")


def _check_fgclip_shapes(reference: str, model, stored: dict) -> None:
    """FG-CLIP's extras fit the model: two long tables of one shape, longer than the rows its mask
    takes from the first, as wide as the text tower; a projection like text_projection; scalar
    temperatures. Anything else would fail mid-load or train a misread table."""
    width, projection = model.config.text_config.hidden_size, tuple(model.text_projection.weight.shape)
    res, ori, own = (tuple(stored[name].shape) for name in (FGCLIP_RES, FGCLIP_ORI, f"{LONG_PROJECTION}.weight"))
    problems = []
    if res != ori or len(res) != 2 or res[0] <= FGCLIP_MASK_SPLIT or res[1] != width:
        problems.append(f"{FGCLIP_RES} and {FGCLIP_ORI} are {res} and {ori}, not two (rows > {FGCLIP_MASK_SPLIT}, {width}) tables")
    if own != projection:
        problems.append(f"{LONG_PROJECTION} is {own}, not {projection} as text_projection")
    problems += [f"{name} holds {stored[name].numel()} values, not one" for name in (REGION_SCALE, HARD_NEGATIVE_SCALE) if name in stored and stored[name].numel() != 1]
    if problems:
        raise FgdataError(f"cannot load CLIP model {reference!r} in FG-CLIP's layout: {'; '.join(problems)}")


def _stored_tensors(reference: str, revision: str | None, names: set[str]) -> dict:
    """The tensors `names` as a checkpoint (a folder or a hub id; one safetensors file or shards)
    stores them: the weights `from_pretrained` set aside as unexpected."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def path(name: str) -> str | None:
        return cached_file(reference, name, revision=revision, _raise_exceptions_for_missing_entries=False)

    single = path("model.safetensors")
    if single:
        files = {name: single for name in names}
    else:
        index = json.loads(Path(path("model.safetensors.index.json")).read_text())["weight_map"]
        files = {name: path(index[name]) for name in names}
    found = {}
    for name, file in files.items():
        with safe_open(file, framework="pt") as opened:
            found[name] = opened.get_tensor(name)
    return found


def _copy_projection(model) -> None:
    with torch.no_grad():
        getattr(model, LONG_PROJECTION).weight.copy_(model.text_projection.weight)


def short_positions(model) -> int:
    layout = getattr(model.config.text_config, LONG_TEXT_KEY, None)
    return layout["short"] if layout else model.config.text_config.max_position_embeddings


def long_positions(model) -> int:
    layout = getattr(model.config.text_config, LONG_TEXT_KEY, None)
    return layout["long"] if layout else model.config.text_config.max_position_embeddings


def long_clip_positions(original: torch.Tensor, long_tokens: int = 248, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's table (longclip.py:233-251): rows 0..keep-1 as trained; row keep + 4i + j
    (j = 0..3) is (1 - j/4) p[keep+i] + j/4 p[keep+i+1]; after the last original position the same
    quarter steps go on along the slope p[-1] - p[-2]. With 77 positions, keep 20 and 248 rows:
    rows 20-243 interpolate, row 244 is p[76], rows 245-247 extrapolate. Other lengths cut or
    extend the same rule."""
    short = original.shape[0]
    if not 1 < keep < short - 1:
        raise FgdataError(f"fgclip.keep_positions must be between 2 and {short - 2}, got {keep}")
    rows = torch.arange(long_tokens - keep, dtype=torch.float64)
    where = keep + rows / _INTERPOLATION  # the (fractional) original position each new row stands for
    low = where.floor().long().clamp(max=short - 2)  # past the end: extrapolate from the last pair
    weight = (where - low).unsqueeze(1)
    base = original.double()
    stretched = (1 - weight) * base[low] + weight * base[low + 1]
    return torch.cat([original[:keep], stretched.to(original.dtype)])


def extend_text_positions(model, long_tokens: int = 248, keep: int = 20) -> None:
    """Adds the Long-CLIP table after the original positions and the long-caption projection,
    a copy of `text_projection` (FG-CLIP's `from_openai` start, train_fgclip.py:389-393).
    A no-op if already extended."""
    if is_extended(model):
        return
    original = model.text_model.embeddings.position_embedding.weight.data
    _add_long_text(model, long_clip_positions(original, long_tokens, keep), model.text_projection.weight.data)


def _add_long_text(model, long_table: torch.Tensor, projection: torch.Tensor) -> None:
    """The long-caption rows after the original positions, and the long-caption projection."""
    config, embeddings = model.config.text_config, model.text_model.embeddings
    original = embeddings.position_embedding.weight.data
    table = torch.cat([original, long_table.to(original.device, original.dtype)])
    embeddings.position_embedding = torch.nn.Embedding.from_pretrained(table, freeze=False)
    embeddings.register_buffer("position_ids", torch.arange(table.shape[0], device=table.device).unsqueeze(0), persistent=False)
    config.max_position_embeddings = table.shape[0]
    setattr(config, LONG_TEXT_KEY, {"short": original.shape[0], "long": long_table.shape[0]})
    own = model.text_projection.weight
    model.add_module(LONG_PROJECTION, torch.nn.Linear(own.shape[1], own.shape[0], bias=False).to(own.device, own.dtype))
    with torch.no_grad():
        getattr(model, LONG_PROJECTION).weight.copy_(projection)


def save_clip(model, tokenizer, out_dir: Path, logit_scales: dict | None = None) -> None:
    """`model`, its tokenizer and `logit_scales` ({REGION_SCALE: tensor, ...}) in FG-CLIP's layout:
    the short table as `position_embedding`, the long rows as both `position_embedding_res` and
    `_ori` (FG-CLIP's mask reads each row from one of them, the same row either way), and a config
    of 77 positions, so `FGCLIPModel.from_pretrained` and `load_clip` read the same weights."""
    from safetensors.torch import save_file

    # cloned: safetensors refuses tensors that share memory
    state = {name: value.detach().clone().contiguous().cpu() for name, value in model.state_dict().items()}
    config = copy.deepcopy(model.config)
    if is_extended(model):
        short, table = short_positions(model), state[_POSITIONS]
        state[_POSITIONS], state[FGCLIP_ORI], state[FGCLIP_RES] = table[:short].clone(), table[short:].clone(), table[short:].clone()
        config.text_config.max_position_embeddings = short
        delattr(config.text_config, LONG_TEXT_KEY)
    state.update({name: value.detach().clone().reshape(()).cpu() for name, value in (logit_scales or {}).items()})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def is_extended(model) -> bool:
    return bool(getattr(model.config.text_config, LONG_TEXT_KEY, None))


def text_tokens(model, tokenizer, texts: list[str], long: bool, device):
    """Token ids and mask of `texts`, cut to the long (248) or short (77) table's length."""
    length = long_positions(model) if long else short_positions(model)
    return tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt").to(device)


def embed_tokens(model, tokens, long: bool) -> torch.Tensor:
    """L2-normalised text embeddings of tokenised texts: long texts take the Long-CLIP rows and the
    long-caption projection when the model has them; short texts the original rows and projection."""
    long = long and is_extended(model)
    offset = short_positions(model) if long else 0
    positions = (torch.arange(tokens.input_ids.shape[1], device=tokens.input_ids.device) + offset).unsqueeze(0)
    pooled = model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, position_ids=positions).pooler_output
    projection = getattr(model, LONG_PROJECTION) if long else model.text_projection
    return F.normalize(projection(pooled), dim=-1)


def encode_text(model, tokenizer, texts: list[str], long: bool, device) -> torch.Tensor:
    """L2-normalised text embeddings (see `embed_tokens`)."""
    return embed_tokens(model, text_tokens(model, tokenizer, texts, long, device), long)


def _last_block_without_attention(layer, hidden: torch.Tensor) -> torch.Tensor:
    """FG-CLIP's `forward_without_attn` (fgclip.py:247-261): the last block with attention replaced
    by its value and output projections, so each patch keeps to itself."""
    attention = layer.self_attn
    hidden = hidden + attention.out_proj(attention.v_proj(layer.layer_norm1(hidden)))
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def image_and_patch_features(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised image embeddings (B, D), projected patch features on their grid (B, D, g, g)).

    The dense map is FG-CLIP's (fgclip.py:183-189, 379-387): the input of the last block
    (hidden_states[-2]) through that block without attention, then the post-layernorm and
    the visual projection the class token takes, so box features live in the joint space."""
    vision = model.vision_model(pixel_values=pixel_values, output_hidden_states=True)
    pooled = model.visual_projection(vision.pooler_output)
    dense = _last_block_without_attention(model.vision_model.encoder.layers[-1], vision.hidden_states[-2])[:, 1:, :]
    patches = model.visual_projection(model.vision_model.post_layernorm(dense))
    side = int(patches.shape[1] ** 0.5)
    grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
    return F.normalize(pooled, dim=-1), grid


def box_features(grid: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """L2-normalised box features: `boxes` (R, 5) = batch index, x1, y1, x2, y2 in 0-1 units,
    scaled to the patch grid and pooled as FG-CLIP does (fgclip.py:390, 394): one RoIAlign bin,
    adaptive sampling, aligned, in fp32."""
    from torchvision.ops import roi_align

    if boxes.shape[0] == 0:
        return grid.new_zeros((0, grid.shape[1]))
    scaled = boxes.to(device=grid.device, dtype=torch.float32).clone()
    scaled[:, [1, 3]] *= grid.shape[-1]
    scaled[:, [2, 4]] *= grid.shape[-2]
    pooled = roi_align(grid.float(), scaled, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1, aligned=True)[..., 0, 0]
    return F.normalize(pooled, dim=-1)
