"""Continuing from FG-CLIP's own weights, and writing weights FG-CLIP's code reads.

FG-CLIP 1 (360CVGroup/FG-CLIP at 0fcea59) stores a model as `FGCLIPModel.save_pretrained` writes
it. The names and rules below are written out from its code, so the tests need no copy of it:
- fgclip/model/clip_strc/modeling_clip.py:257-261: `text_model.embeddings.position_embedding`
  (config.max_position_embeddings = 77 rows), `position_embedding_res` and `position_embedding_ori`
  (248 rows each);
- modeling_clip.py:262-265, 291-294: a long caption's position i adds `_ori[i]` for i < 20 and
  `_res[i]` from 20 on (mask1 / mask2);
- fgclip/model/clip_strc/fgclip.py:69, 72-74: `text_filip_projection`, `logit_scale`,
  `logit_scale_finegraind`, `logit_scale_hardneg`.
scripts/train.sh starts stage 2 from `openai/clip-vit-base-patch16` or `qihoo360/fg-clip-base`,
switched by --from_openai (train_fgclip.py:389-393: only the OpenAI start builds the long table).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import FgclipTrainConfig
from pipeline.errors import FgdataError
from pipeline.models.clip_model import encode_text, extend_text_positions, load_clip, save_clip
from pipeline.train.objectives import FgclipModule

POSITIONS = "text_model.embeddings.position_embedding.weight"  # modeling_clip.py:257
RES = "text_model.embeddings.position_embedding_res.weight"  # modeling_clip.py:260
ORI = "text_model.embeddings.position_embedding_ori.weight"  # modeling_clip.py:261
FILIP = "text_filip_projection.weight"  # fgclip.py:69
SCALES = ("logit_scale", "logit_scale_finegraind", "logit_scale_hardneg")  # fgclip.py:72-74
MASK_SPLIT = 20  # modeling_clip.py:263-265
LONG_ROWS = 248  # modeling_clip.py:260-261


@pytest.fixture(scope="module")
def openai_clip(tmp_path_factory):
    from pipeline.models.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", ["a red circle on the left of a blue square"] * 20)


def fgclip_checkpoint(openai_clip, out, **changes):
    """The tiny CLIP in FG-CLIP's layout, its own tables and temperatures made distinct; `changes`
    replace (None: remove) weights by name."""
    shutil.copytree(openai_clip, out)
    weights = load_file(openai_clip / "model.safetensors")
    width = weights[POSITIONS].shape[1]
    generator = torch.Generator().manual_seed(7)
    weights.update({
        RES: torch.randn(LONG_ROWS, width, generator=generator), ORI: torch.randn(LONG_ROWS, width, generator=generator),
        FILIP: torch.randn(weights["text_projection.weight"].shape, generator=generator),
        "logit_scale_finegraind": torch.tensor(3.25), "logit_scale_hardneg": torch.tensor(2.75),
    })
    for name, value in changes.items():
        weights.pop(name) if value is None else weights.__setitem__(name, value)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, weights


def fgclip_long_text(weights, tokens) -> torch.Tensor:
    """FG-CLIP's long-caption position rows for `tokens` positions (modeling_clip.py:291-294)."""
    mask1 = torch.zeros(LONG_ROWS, 1)
    mask1[:MASK_SPLIT] = 1
    return (weights[ORI] * mask1 + weights[RES] * (1 - mask1))[:tokens]


def test_an_fgclip_checkpoint_loads_as_it_is(openai_clip, tmp_path):
    path, weights = fgclip_checkpoint(openai_clip, tmp_path / "fgclip")
    parts = load_clip(str(path))
    model = parts.model
    table = model.text_model.embeddings.position_embedding.weight
    assert table.shape[0] == 77 + LONG_ROWS
    assert torch.equal(table[:77], weights[POSITIONS])  # short texts: the original rows
    assert torch.equal(table[77:], fgclip_long_text(weights, LONG_ROWS))  # not re-interpolated from the 77
    assert torch.equal(model.text_filip_projection.weight, weights[FILIP])  # not re-copied from text_projection
    assert parts.logit_scales == {"logit_scale_finegraind": 3.25, "logit_scale_hardneg": 2.75}
    # training on it is a no-op for the table: it is already FG-CLIP's
    extend_text_positions(model)
    assert torch.equal(model.text_model.embeddings.position_embedding.weight[77:], fgclip_long_text(weights, LONG_ROWS))


def test_the_long_text_embedding_is_fgclips(openai_clip, tmp_path):
    """fgdata's long embedding equals a CLIP whose position table is FG-CLIP's long rows and whose
    text projection is text_filip_projection (fgclip.py:227-230: get_text_features, walk_short_pos False)."""
    from transformers import CLIPModel

    path, weights = fgclip_checkpoint(openai_clip, tmp_path / "fgclip")
    parts = load_clip(str(path))
    config = parts.model.config.__class__.from_pretrained(openai_clip)
    config.text_config.max_position_embeddings = LONG_ROWS
    reference = CLIPModel(config).eval()
    plain = {k: v for k, v in load_file(openai_clip / "model.safetensors").items()}
    plain.update({POSITIONS: fgclip_long_text(weights, LONG_ROWS), "text_projection.weight": weights[FILIP]})
    reference.load_state_dict(plain, strict=False)
    text = "a red circle on the left of a blue square"
    tokens = parts.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.text_projection(reference.text_model(**tokens).pooler_output), dim=-1)
        assert torch.allclose(encode_text(parts.model.eval(), parts.tokenizer, [text], True, "cpu"), expected, atol=1e-6)


def test_the_stored_temperatures_are_restarted_as_fgclips_trainer_does_or_kept(openai_clip, tmp_path):
    """train_fgclip.py:386-387 sets both to logit_scale on every start; keep_logit_scales keeps them."""
    parts = load_clip(str(fgclip_checkpoint(openai_clip, tmp_path / "fgclip")[0]))
    assert FgclipTrainConfig().keep_logit_scales is False
    restarted, kept = FgclipModule(parts.model), FgclipModule(parts.model, parts.logit_scales)
    start = parts.model.logit_scale.item()
    assert restarted.region_logit_scale.item() == pytest.approx(start) == restarted.hard_negative_logit_scale.item()
    assert (kept.region_logit_scale.item(), kept.hard_negative_logit_scale.item()) == (3.25, 2.75)


@pytest.mark.parametrize(
    "changes",
    [
        {ORI: None},  # half of FG-CLIP's long table
        {RES: None, ORI: None},  # a long projection without the long table
        {"visual_projection.weight": None},  # a weight the model needs, missing: it would be random
        {"head.weight": torch.zeros(2, 2)},  # a weight nobody reads
    ],
    ids=["no_ori", "projection_only", "missing_weight", "stray_weight"],
)
def test_a_checkpoint_of_neither_layout_is_refused_in_one_line(openai_clip, tmp_path, changes):
    path, _ = fgclip_checkpoint(openai_clip, tmp_path / "odd", **changes)
    with pytest.raises(FgdataError, match="match neither a CLIP's nor FG-CLIP's layout") as caught:
        load_clip(str(path))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "changes",
    [
        {RES: torch.zeros(100, 64)},  # the two long tables of different lengths
        {RES: torch.zeros(10, 64), ORI: torch.zeros(10, 64)},  # shorter than the rows the mask takes from _ori
        {RES: torch.zeros(248, 32), ORI: torch.zeros(248, 32)},  # narrower than the text tower
        {FILIP: torch.zeros(3, 64)},
        {"logit_scale_hardneg": torch.zeros(2)},
    ],
    ids=["unequal_tables", "short_tables", "narrow_tables", "projection_shape", "scale_not_scalar"],
)
def test_fgclip_extras_of_the_wrong_shape_are_refused_in_one_line(openai_clip, tmp_path, changes):
    path, _ = fgclip_checkpoint(openai_clip, tmp_path / "odd", **changes)
    with pytest.raises(FgdataError, match="in FG-CLIP's layout") as caught:
        load_clip(str(path))
    assert "\n" not in str(caught.value)


def test_openai_and_fgdata_layouts_still_load(openai_clip, tmp_path):
    parts = load_clip(str(openai_clip))
    assert parts.model.text_model.embeddings.position_embedding.weight.shape[0] == 77 and not parts.logit_scales
    extend_text_positions(parts.model)
    parts.model.save_pretrained(tmp_path / "one_table")  # fgdata's earlier outputs: one 325-row table
    parts.tokenizer.save_pretrained(tmp_path / "one_table")
    again = load_clip(str(tmp_path / "one_table"))
    assert torch.equal(again.model.text_model.embeddings.position_embedding.weight, parts.model.text_model.embeddings.position_embedding.weight)


def test_saved_models_are_in_fgclips_layout_and_load_back_the_same(openai_clip, tmp_path):
    parts = load_clip(str(openai_clip))
    extend_text_positions(parts.model)
    with torch.no_grad():  # a trained long table: its first 20 rows no longer equal the short ones
        parts.model.text_model.embeddings.position_embedding.weight[77:].add_(torch.randn(LONG_ROWS, 64))
    save_clip(parts.model, parts.tokenizer, tmp_path / "out", {"logit_scale_finegraind": torch.tensor(1.5), "logit_scale_hardneg": torch.tensor(1.25)})
    weights = load_file(tmp_path / "out" / "model.safetensors")
    table = parts.model.text_model.embeddings.position_embedding.weight.detach()
    assert {RES, ORI, FILIP, *SCALES} <= set(weights)
    assert weights[POSITIONS].shape[0] == 77 and torch.equal(weights[POSITIONS], table[:77])
    assert torch.equal(fgclip_long_text(weights, LONG_ROWS), table[77:])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["max_position_embeddings"] == 77
    back = load_clip(str(tmp_path / "out"))
    assert torch.equal(back.model.text_model.embeddings.position_embedding.weight, table)
    assert back.logit_scales == {"logit_scale_finegraind": 1.5, "logit_scale_hardneg": 1.25}
    # a plain CLIPModel reads it as an OpenAI CLIP: every weight but FG-CLIP's extras
    from transformers import CLIPModel

    _, info = CLIPModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == {RES, ORI, FILIP, "logit_scale_finegraind", "logit_scale_hardneg"}


def test_a_training_checkpoint_is_a_model_folder_in_fgclips_layout(openai_clip, tmp_path, monkeypatch):
    """What a run saves every save_every steps is what it saves at the end: FG-CLIP's layout."""
    import pipeline.train.loop as loop
    from pipeline.config import load_config
    from pipeline.datasets.synthetic_world import write_world

    monkeypatch.setattr(loop, "remove_checkpoints", lambda out_dir: None)  # kept past the finished run, to be read here
    world = write_world(tmp_path / "world", 8, seed=0)
    settings = [f"fgclip.model={openai_clip}", "fgclip.num_workers=0", "fgclip.batch_size=4", "fgclip.max_steps=2", "fgclip.save_every=1",
                "fgclip.shuffle_buffer=4", "run.progress=false"]
    loop.train("fgclip", [world["fggrn"]], tmp_path / "out", load_config(None, settings), progress=False)
    step = tmp_path / "out" / "checkpoints" / "step-00000001"
    weights = load_file(step / "model.safetensors")
    assert {RES, ORI, FILIP, *SCALES} <= set(weights) and weights[POSITIONS].shape[0] == 77
    assert json.loads((step / "config.json").read_text())["text_config"]["max_position_embeddings"] == 77
    assert set(load_clip(str(step)).logit_scales) == {"logit_scale_finegraind", "logit_scale_hardneg"}
