"""`fgdata train --objective fgclip` against FG-CLIP 1's reference code (360CVGroup/FG-CLIP at
0fcea59, Long-CLIP's longclip.py): every reference computation here is written out again in the
test, from the reference's own definitions, and compared with what the trainer computes."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import FgclipTrainConfig
from pipeline.errors import FgdataError
from pipeline.datasets.fggrn_rows import collate_fgclip, fgclip_rows, pixels, region_long_text, region_texts
from pipeline.models.clip_model import (
    LONG_PROJECTION,
    box_features,
    encode_text,
    extend_text_positions,
    image_and_patch_features,
    load_clip,
    short_positions,
    text_tokens,
)
from pipeline.train.objectives import FgclipModule, FgclipObjective

OPENAI_LOGIT_SCALE = 4.6052  # what openai/clip-vit-base-patch16 stores: above ln 100 = 4.60517 in fp32
WORDS = ["a", "red", "blue", "green", "small", "large", "circle", "square", "striped", "dotted", "photo", "of", "on", "the", "left", "right", "table"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from pipeline.models.tiny import build_tiny_clip

    vocabulary = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(200)]
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", vocabulary)


def objective_for(clip_dir, **settings) -> FgclipObjective:
    """An FgclipObjective on the tiny CLIP, without shards: the loss is what is under test."""
    objective = FgclipObjective.__new__(FgclipObjective)
    objective.settings = FgclipTrainConfig(model=str(clip_dir), **settings)
    objective.device, objective.rank, objective.world = "cpu", 0, 1
    objective.parts = load_clip(str(clip_dir))
    extend_text_positions(objective.parts.model)
    with torch.no_grad():
        objective.parts.model.logit_scale.fill_(OPENAI_LOGIT_SCALE)
    objective.module = FgclipModule(objective.parts.model)
    return objective


def phrase(rng: random.Random, words: int = 3) -> str:
    return " ".join(rng.choices(WORDS, k=words))


def make_batch(seed: int = 0, images: int = 5, negatives: int = 10) -> dict:
    """A collated batch: 1-4 boxes per image, some with `negatives` negatives, some with fewer."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    samples = []
    for index in range(images):
        boxes, longs = [], []
        for _ in range(1 + index % 4):
            x, y = rng.uniform(0, 0.5), rng.uniform(0, 0.5)
            box = [x, y, x + rng.uniform(0.1, 0.5), y + rng.uniform(0.1, 0.5)]
            count = negatives if rng.random() < 0.6 else rng.randrange(0, negatives)
            boxes.append((box, phrase(rng), [phrase(rng) for _ in range(count)]))
            longs.append(phrase(rng, 8))
        row = {"key": f"k{index}", "boxes": boxes, "long_exprs": longs, "flagged": [True] * len(boxes)}
        samples.append({**row, "region_texts": region_texts(row, seed, 0), "pixels": torch.randn(3, 64, 64),
                        "long": phrase(rng, 40), "short": phrase(rng, 4)})
    return collate_fgclip(samples)


# ---------------------------------------------------------------- region features (fgclip.py:183-190, 247-261, 379-394)

def reference_region_features(model, pixel_values, box_info):
    """fgclip.py `get_image_box_roi_features` / the forward's box path, written out again."""
    from torchvision.ops import roi_align

    vision = model.vision_model(pixel_values=pixel_values, output_hidden_states=True)
    bs, length = pixel_values.shape[0], vision.last_hidden_state.shape[1] - 1
    h = w = int(math.sqrt(length))
    x = vision.hidden_states[-2]  # fgclip.py:183
    layer = model.vision_model.encoder.layers[-1]  # forward_without_attn, fgclip.py:247-261
    residual = x
    x = F.layer_norm(x, (x.shape[-1],), layer.layer_norm1.weight, layer.layer_norm1.bias, layer.layer_norm1.eps)
    x = F.linear(x, layer.self_attn.v_proj.weight, layer.self_attn.v_proj.bias)
    x = F.linear(x, layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias)
    x = residual + x
    residual = x
    x = F.layer_norm(x, (x.shape[-1],), layer.layer_norm2.weight, layer.layer_norm2.bias, layer.layer_norm2.eps)
    x = F.linear(layer.mlp.activation_fn(F.linear(x, layer.mlp.fc1.weight, layer.mlp.fc1.bias)), layer.mlp.fc2.weight, layer.mlp.fc2.bias)
    x = (residual + x)[:, 1:]
    x = model.visual_projection(model.vision_model.post_layernorm(x))  # fgclip.py:186-187
    feature_map = x.view(bs, h, w, -1).permute(0, 3, 1, 2)  # fgclip.py:189
    denormed = []  # _denormalize_boxes, fgclip.py:235-245
    for boxes in box_info:
        boxes = boxes.clone()
        boxes[:, [0, 2]] *= w
        boxes[:, [1, 3]] *= h
        denormed.append(boxes.float())
    rois = roi_align(feature_map.type(torch.float32), denormed, (1, 1), 1.0, -1, True)[..., 0, 0]  # fgclip.py:394
    return rois / rois.norm(p=2, dim=-1, keepdim=True)  # fgclip.py:411


def test_region_features_take_fgclip_path_last_block_without_attention_one_bin_roi_align(clip_dir):
    model = load_clip(str(clip_dir)).model.eval()
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    per_image = [torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0], [0.37, 0.41, 0.52, 0.58]]),
                 torch.tensor([[0.5, 0.05, 0.95, 0.45], [0.2, 0.3, 0.3, 0.4], [0.0, 0.6, 0.35, 1.0]])]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(per_image)])
    with torch.no_grad():
        expected = reference_region_features(model, images, per_image)
        pooled, grid = image_and_patch_features(model, images)
        ours = box_features(grid, rois)
        # the former path (the last layer with attention, 2 x 2 bins) is far from the reference's
        vision = model.vision_model(pixel_values=images)
        old_grid = model.visual_projection(model.vision_model.post_layernorm(vision.last_hidden_state[:, 1:])).transpose(1, 2).reshape(2, -1, 8, 8)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert (box_features(old_grid, rois) - expected).abs().max() > 1e-2
    assert torch.allclose(pooled, F.normalize(model.visual_projection(vision.pooler_output), dim=-1), atol=1e-6)


# ---------------------------------------------------------------- position table (longclip.py:233-251, fgclip.py:84-120)

def long_clip_table(p: torch.Tensor) -> torch.Tensor:
    """Long-CLIP's loop, written out again."""
    length, keep = p.shape[0], 20
    new = torch.zeros(4 * length - 3 * keep, p.shape[1], dtype=p.dtype)
    new[:keep] = p[:keep]
    for i in range(length - 1 - keep):
        for j in range(4):
            new[4 * i + j + keep] = (4 - j) * p[i + keep] / 4 + j * p[i + 1 + keep] / 4
    for j in range(4):
        new[4 * length - 3 * keep - 4 + j] = p[length - 1] + j * (p[length - 1] - p[length - 2]) / 4
    return new


def test_position_table_matches_long_clip_row_by_row_and_both_tables_train(clip_dir):
    parts = load_clip(str(clip_dir))
    model = parts.model
    original = model.text_model.embeddings.position_embedding.weight.detach().clone()
    assert original.shape[0] == 77
    extend_text_positions(model, long_tokens=248, keep=20)
    table = model.text_model.embeddings.position_embedding.weight
    assert table.shape[0] == 77 + 248 and short_positions(model) == 77
    assert torch.equal(table[:77].detach(), original)  # short texts keep the original rows
    expected = long_clip_table(original)
    long_rows = table[77:].detach()
    for row in range(248):
        assert torch.allclose(long_rows[row], expected[row], atol=1e-6), f"row {row}"
    # spot checks of the rule itself: row 244 is position 76, 247 extrapolates 3/4 of a step on
    assert torch.allclose(long_rows[244], original[76], atol=1e-6)
    assert torch.allclose(long_rows[247], original[76] + 0.75 * (original[76] - original[75]), atol=1e-6)
    assert torch.allclose(long_rows[22], (original[20] + original[21]) / 2, atol=1e-6)
    # both tables receive gradients (FG-CLIP trains both; Long-CLIP froze one)
    long_text, short_text = " ".join(["red"] * 200), "a red circle"
    loss = encode_text(model, parts.tokenizer, [long_text], long=True, device="cpu").sum() + encode_text(model, parts.tokenizer, [short_text], long=False, device="cpu").sum()
    loss.backward()
    used = table.grad.abs().sum(dim=1) > 0
    assert table.requires_grad and used[:3].all() and used[77 + 200] and used[77 + 3]


def test_tokens_cut_at_248_for_long_and_77_for_short_texts(clip_dir):
    parts = load_clip(str(clip_dir))
    extend_text_positions(parts.model)
    text = " ".join(["red circle"] * 300)
    assert text_tokens(parts.model, parts.tokenizer, [text], long=True, device="cpu").input_ids.shape[1] == 248
    assert text_tokens(parts.model, parts.tokenizer, [text], long=False, device="cpu").input_ids.shape[1] == 77


# ---------------------------------------------------------------- long-caption projection (fgclip.py:69, 124-126, 227-230, 358-360)

def test_long_captions_have_their_own_projection_copied_from_text_projection_and_kept_on_save(clip_dir, tmp_path):
    from pipeline.eval.evaluate import Encoder

    parts = load_clip(str(clip_dir))
    model, tokenizer = parts.model.eval(), parts.tokenizer
    assert not hasattr(model, LONG_PROJECTION)  # an OpenAI-style start has none until extended
    extend_text_positions(model)
    projection = getattr(model, LONG_PROJECTION)
    assert torch.equal(projection.weight, model.text_projection.weight) and projection.weight.data_ptr() != model.text_projection.weight.data_ptr()
    texts = ["a red circle on the left", "a blue square"]
    with torch.no_grad():
        short_before, long_before = encode_text(model, tokenizer, texts, False, "cpu"), encode_text(model, tokenizer, texts, True, "cpu")
        projection.weight.mul_(-1)  # only long texts go through it
        assert torch.allclose(encode_text(model, tokenizer, texts, False, "cpu"), short_before)
        assert torch.allclose(encode_text(model, tokenizer, texts, True, "cpu"), -long_before, atol=1e-6)
    model.save_pretrained(tmp_path / "trained")
    tokenizer.save_pretrained(tmp_path / "trained")
    encoder = Encoder(str(tmp_path / "trained"))  # what `fgdata eval` uses for long-caption retrieval
    assert torch.equal(getattr(encoder.model, LONG_PROJECTION).weight, projection.weight)
    assert torch.allclose(encoder.texts(texts, long=True), -long_before, atol=1e-6)


# ---------------------------------------------------------------- the losses (fgclip.py:476-539)

def reference_total(objective, batch) -> torch.Tensor:
    """FG-CLIP's forward on one GPU (rank 0), from embeddings computed here: clip_loss, then
    pairwise_contrastive_loss on the boxes, hard_contrastive_loss on the boxes with negatives."""
    model, tokenizer = objective.module.clip, objective.parts.tokenizer
    image, grid = image_and_patch_features(model, batch["pixels"])
    text_long = encode_text(model, tokenizer, batch["long"], True, "cpu")
    text_short = encode_text(model, tokenizer, ["a photo of " + t for t in batch["short"]], False, "cpu")  # train_fgclip.py:203
    scale = model.logit_scale.exp()
    targets = torch.arange(image.shape[0])
    loss_itcl = (F.cross_entropy(scale * image @ text_long.T, targets) + F.cross_entropy((scale * image @ text_long.T).T, targets)) / 2
    loss_itcs = (F.cross_entropy(scale * image @ text_short.T, targets) + F.cross_entropy((scale * image @ text_short.T).T, targets)) / 2
    loss = loss_itcl + loss_itcs
    regions = box_features(grid, batch["boxes"])
    box_text = encode_text(model, tokenizer, batch["region_texts"], False, "cpu")
    labels = torch.eye(len(regions))
    region_scale = objective.module.region_logit_scale.exp()
    loss = loss + 0.1 * (F.cross_entropy(region_scale * box_text @ regions.T, labels) + F.cross_entropy(region_scale * regions @ box_text.T, labels)) / 2
    hard = [i for i, (negs, flag) in enumerate(zip(batch["negatives"], batch["flagged"])) if flag and len(negs) == 10]  # flag_short_neg
    hard_texts = encode_text(model, tokenizer, [t for i in hard for t in [batch["phrases"][i], *batch["negatives"][i]]], False, "cpu")
    predict = objective.module.hard_negative_logit_scale.exp() * torch.einsum("bp,bdp->bd", regions[hard], hard_texts.reshape(len(hard), 11, -1))
    return loss + 0.5 * F.cross_entropy(predict, torch.zeros(len(hard), dtype=torch.long))


def test_the_loss_is_fgclips_weights_prompt_boxes_and_11_way_hard_negatives(clip_dir):
    objective = objective_for(clip_dir)
    batch = make_batch(seed=1)
    assert 0 < sum(len(n) == 10 for n in batch["negatives"]) < len(batch["negatives"]), "some boxes lack negatives"
    assert batch["region_texts"] != batch["phrases"], "some boxes train on their long_expr"
    with torch.no_grad():
        total, parts = objective.loss(batch, objective.module)
        expected = reference_total(objective, batch)
    assert set(parts) == {"long", "short", "regional", "hard_negative"}
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_defaults_are_fgclips_recipe():
    s = FgclipTrainConfig()
    assert (s.long_weight, s.short_weight, s.regional_weight, s.hard_negative_weight) == (1.0, 1.0, 0.1, 0.5)  # fgclip.py:440, 456
    assert s.max_boxes == 4 and s.hard_negatives == 10  # train_fgclip.py:184; fgclip.py:536
    assert s.long_text_tokens == 248 and s.keep_positions == 20
    assert s.short_prompt.format("two dogs") == "a photo of two dogs"  # train_fgclip.py:203
    assert s.batch_size == 512 and s.grad_cache_chunk == 0  # train.sh: 512 per device
    assert s.image_size == 0  # the model's own: 224 for ViT-B/16


def test_images_are_squashed_not_cropped():
    """train_fgclip.py:211 resizes to 224 x 224 whatever the aspect, so 0-1 boxes keep their place."""
    from PIL import Image

    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))  # right half blue
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    tensor = pixels(buffer.getvalue(), 224, (0, 0, 0), (1, 1, 1))
    assert tensor.shape == (3, 224, 224)
    assert tensor[0, :, :100].mean() > 0.95 and tensor[2, :, 124:].mean() > 0.95  # halves stay halves


def test_hard_negative_loss_is_region_to_text_only_and_skips_boxes_without_all_negatives(clip_dir):
    objective = objective_for(clip_dir, long_weight=0.0, short_weight=0.0, regional_weight=0.0)
    batch = make_batch(seed=2)
    with torch.no_grad():
        _, parts = objective.loss(batch, objective.module)
        hard = [i for i, negs in enumerate(batch["negatives"]) if len(negs) >= 10]
        _, grid = image_and_patch_features(objective.module.clip, batch["pixels"])
        regions = box_features(grid, batch["boxes"])[hard]
        texts = encode_text(objective.module.clip, objective.parts.tokenizer, [t for i in hard for t in [batch["phrases"][i], *batch["negatives"][i]]], False, "cpu").reshape(len(hard), 11, -1)
        logits = objective.module.hard_negative_logit_scale.exp() * (regions.unsqueeze(1) * texts).sum(-1)
    assert logits.shape == (len(hard), 11)
    assert parts["hard_negative"] == pytest.approx(F.cross_entropy(logits, torch.zeros(len(hard), dtype=torch.long)).item(), rel=1e-5)


def test_hard_negatives_follow_the_flag(clip_dir):
    """train_fgclip.py:271: a box is in the hard-negative loss when flag_short_neg is 1, whatever
    negatives it lists; fgdata's flag is negatives_flag "ok" (import sets it from flag_short_neg)."""
    batch = make_batch(seed=1)
    complete = [i for i, negatives in enumerate(batch["negatives"]) if len(negatives) == 10]
    batch["flagged"][complete[0]] = False  # ten negatives listed, flag 0
    objective = objective_for(clip_dir)
    assert objective._hard_boxes(batch) == complete[1:]
    with torch.no_grad():
        assert objective.loss(batch, objective.module)[0].item() == pytest.approx(reference_total(objective, batch).item(), rel=1e-5)


def test_boxes_left_out_of_the_hard_negative_loss_are_counted_and_logged(tmp_path, caplog):
    """A flagged box with 1-9 negatives has no place in FG-CLIP's 11-way loss (fgclip.py:536 reshapes
    every box's texts to 1 + 10; such a batch fails there): left out, counted, and said."""
    import pyarrow.parquet as pq

    from pipeline.core.shards import list_shards, read_shard
    from pipeline.datasets.fggrn_rows import count_fgclip_rows, fgclip_sources
    from pipeline.datasets.synthetic_world import write_world

    world = write_world(tmp_path / "world", 6, seed=0)
    (shard,) = list_shards(world["fggrn"])
    table = read_shard(shard)
    rows = table.to_pylist()
    first, second = rows[0]["regions"][0], rows[1]["regions"][0]
    first["negatives"] = first["negatives"][:4]  # flagged ok, 4 negatives
    second["negatives_flag"] = "too_few_valid"  # not flagged
    pq.write_table(table.from_pylist(rows, schema=table.schema), shard)
    boxes = sum(len(r["regions"]) for r in rows)
    with caplog.at_level("INFO", logger="pipeline.datasets.fggrn_rows"):
        counts = count_fgclip_rows(fgclip_sources([world["fggrn"]], None), 4, hard_negatives=10)
    assert (counts["hard_negative_boxes"], counts["hard_negative_boxes_too_few"], counts["hard_negative_boxes_not_flagged"]) == (boxes - 2, 1, 1)
    assert "1 flagged but with fewer than 10 negatives left out, 1 not flagged left out" in caplog.text
    assert any(r.levelname == "WARNING" and "hard negatives" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- logit scales (fgclip.py:497-502, 526, 538)

def test_each_logit_scale_receives_gradient_from_openais_start(clip_dir):
    objective = objective_for(clip_dir)
    module = objective.module
    assert module.clip.logit_scale.item() > math.log(100)  # where the former clamp gave zero gradient
    assert module.region_logit_scale.item() == pytest.approx(OPENAI_LOGIT_SCALE) == module.hard_negative_logit_scale.item()
    total, _ = objective.loss(make_batch(seed=3), module)
    total.backward()
    for scale in (module.clip.logit_scale, module.region_logit_scale, module.hard_negative_logit_scale):
        assert scale.grad is not None and scale.grad.abs().item() > 1e-6


# ---------------------------------------------------------------- contrastive batch (fgclip.py:452, 479-532)

def test_regional_loss_uses_this_devices_boxes_only(clip_dir, monkeypatch):
    """Under torchrun the global losses gather other processes' features; the regional loss must
    not: simulate other processes by a gather that adds rows, and the regional part stays local."""
    import pipeline.train.objectives as objectives

    objective = objective_for(clip_dir)
    batch = make_batch(seed=4)
    with torch.no_grad():
        _, alone = objective.loss(batch, objective.module)
        monkeypatch.setattr(objectives, "gather", lambda x: torch.cat([x, F.normalize(torch.randn(7, x.shape[1]), dim=-1)]))
        _, gathered = objective.loss(batch, objective.module)
    assert gathered["long"] != pytest.approx(alone["long"])  # the fake gather is in effect
    assert gathered["regional"] == pytest.approx(alone["regional"], rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_grad_cache_gives_the_unchunked_losss_gradients(clip_dir, chunk):
    batch = make_batch(seed=5, images=5)
    plain = objective_for(clip_dir)
    total, parts = plain.loss(batch, plain.module)
    (total * 0.5).backward()
    cached = objective_for(clip_dir, grad_cache_chunk=chunk)
    assert cached.grad_cache
    cached_total, cached_parts = cached.cached_step(batch, cached.module, 0.5, autocast=False)
    assert cached_total.item() == pytest.approx(total.item(), rel=1e-6) and cached_parts == pytest.approx(parts, rel=1e-6)
    compared = 0
    for (name, a), (_, b) in zip(plain.module.named_parameters(), cached.module.named_parameters()):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), name
            continue
        # equal up to fp32 summation order (each chunk pads its texts to its own longest); the key
        # biases, whose true gradient is 0 (softmax ignores them), differ by noise of 1e-7
        assert (a.grad - b.grad).norm() <= 1e-5 * a.grad.norm() + 1e-6, f"{name}: {(a.grad - b.grad).norm() / a.grad.norm()}"
        compared += 1
    assert compared > 40


def test_a_global_batch_on_one_process_is_reached_by_chunks_with_the_full_batchs_loss_and_gradients(clip_dir):
    """train.sh: per_device_train_batch_size 512 on 8 GPUs contrasts 4096 images per step. With
    global_batch_size one process takes the whole batch and embeds it batch_size at a time."""
    batch = make_batch(seed=6, images=6)
    full = objective_for(clip_dir, batch_size=6)
    total, parts = full.loss(batch, full.module)
    total.backward()
    global_batch = objective_for(clip_dir, batch_size=2, global_batch_size=6)
    assert (global_batch.batch_size, global_batch.chunk, global_batch.grad_cache) == (6, 2, True)
    chunked_total, chunked_parts = global_batch.cached_step(batch, global_batch.module, 1.0, autocast=False)
    assert chunked_total.item() == pytest.approx(total.item(), rel=1e-6) and chunked_parts == pytest.approx(parts, rel=1e-6)
    for (name, a), (_, b) in zip(full.module.named_parameters(), global_batch.module.named_parameters()):
        if a.grad is not None:
            assert (a.grad - b.grad).norm() <= 1e-5 * a.grad.norm() + 1e-6, name


def test_the_reference_batch_is_shared_by_any_number_of_processes():
    from pipeline.train.objectives import contrastive_batch

    reference = FgclipTrainConfig(global_batch_size=4096)  # 512 x 8 (train.sh)
    assert contrastive_batch(reference, 8) == (512, 0)  # the reference's own layout: no chunks
    assert contrastive_batch(reference, 2) == (2048, 512)
    assert contrastive_batch(reference, 1) == (4096, 512)
    assert contrastive_batch(FgclipTrainConfig(global_batch_size=4096, grad_cache_chunk=128), 1) == (4096, 128)
    assert contrastive_batch(FgclipTrainConfig(), 4) == (512, 0)  # unset: batch_size per process, as before
    with pytest.raises(FgdataError, match="multiple of the 3 training processes"):
        contrastive_batch(reference, 3)


def test_a_global_batch_streams_whole_batches_and_counts_steps_by_it(tmp_path):
    """The data loader gives the process its whole share, and an epoch has rows // global steps,
    the reference's step count."""
    from pipeline.datasets.synthetic_world import write_world
    from pipeline.models.tiny import build_tiny_clip

    world = write_world(tmp_path / "world", 13, seed=0)
    clip = build_tiny_clip(tmp_path / "clip", [" ".join(WORDS)] * 20)
    settings = FgclipTrainConfig(model=str(clip), batch_size=2, global_batch_size=6, num_workers=0, shuffle_buffer=4)
    objective = FgclipObjective([world["fggrn"]], settings, None, "cpu")
    assert objective.steps_per_epoch() == 13 // 6 and objective.grad_cache
    assert next(objective.batches(skip_batches=0))["pixels"].shape[0] == 6


def test_grad_cache_in_the_loop_trains_like_the_plain_loop(tmp_path):
    """`fgdata train` with fgclip.grad_cache_chunk: the loop calls cached_step, and two steps give the
    weights the plain loop gives."""
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.datasets.synthetic_world import write_world
    from pipeline.models.tiny import build_tiny_clip
    from pipeline.train.loop import train

    world = write_world(tmp_path / "world", 12, seed=0)
    clip = build_tiny_clip(tmp_path / "clip", [" ".join(WORDS)] * 20)
    fast = [f"fgclip.model={clip}", "fgclip.num_workers=0", "fgclip.batch_size=6", "fgclip.max_steps=2", "fgclip.warmup_steps=1",
            "fgclip.learning_rate=1e-3", "fgclip.shuffle_buffer=4", "fgclip.log_every=1", "run.progress=false"]
    histories = [train("fgclip", [world["fggrn"]], tmp_path / name, load_config(None, fast + extra), progress=False)["history"]
                 for name, extra in (("plain", []), ("cached", ["fgclip.grad_cache_chunk=2"]))]
    assert [sorted(e) for e in histories[0]] == [sorted(e) for e in histories[1]] and len(histories[0]) == 2
    for a, b in zip(*histories):
        assert a == pytest.approx(b, rel=1e-5)
    plain, cached = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "cached" / "model.safetensors")
    original = load_file(clip / "model.safetensors")
    assert any(not torch.equal(plain[k], original[k]) for k in original)
    # attention key biases have a true gradient of 0 (softmax ignores them); Adam turns their 1e-8
    # fp32 noise into steps of up to lr, and they change no output
    assert all(torch.allclose(plain[k], cached[k], atol=1e-5) for k in plain if not k.endswith("k_proj.bias"))


# ---------------------------------------------------------------- region text (train_fgclip.py:230, 264)

def test_each_box_trains_on_its_short_or_long_expression_and_hard_negatives_on_the_short():
    row = {"key": "k", "boxes": [([0, 0, 1, 1], f"phrase {i}", ["n"] * 10) for i in range(4)], "long_exprs": [f"long {i}" for i in range(4)], "flagged": [True] * 4}
    draws = [region_texts(row, seed=0, epoch=e) for e in range(40)]
    for i in range(4):
        seen = {d[i] for d in draws}
        assert seen == {f"phrase {i}", f"long {i}"}
    assert region_texts(row, 0, 3) == region_texts(row, 0, 3)  # a resumed run draws the same
    batch = collate_fgclip([{**row, "region_texts": draws[0], "pixels": torch.zeros(3, 8, 8), "long": "", "short": ""}])
    assert batch["region_texts"] == draws[0] and batch["phrases"] == [f"phrase {i}" for i in range(4)]


def test_long_expression_comes_from_the_export_rule_or_falls_back_to_the_phrase():
    row = {"long_caption": "A man holds a red cup on a wooden table, smiling.", "short_caption": "a man", "phrase_source": "long_caption"}
    region = {"phrase": "a red cup", "start": 12, "end": 21}
    assert region_long_text(row, region) == "a red cup on a wooden table"
    assert region_long_text({"long_caption": None}, {"phrase": "a red cup", "start": None}) == "a red cup"


def test_rows_keep_the_first_max_boxes_and_their_long_expressions(tmp_path):
    """FG-CLIP's loader keeps an item's first 4 boxes (train_fgclip.py:184, 223; the default is
    pinned above); the synthetic world has 2 at most, so the cut is shown at 1."""
    from pipeline.datasets.fggrn_rows import fgclip_sources
    from pipeline.datasets.synthetic_world import write_world

    world = write_world(tmp_path / "world", 30, seed=0)
    rows = list(fgclip_rows(fgclip_sources([world["fggrn"]], None), max_boxes=1, with_images=False))
    unlimited = list(fgclip_rows(fgclip_sources([world["fggrn"]], None), max_boxes=None, with_images=False))
    assert max(len(r["boxes"]) for r in unlimited) == 2 and max(len(r["boxes"]) for r in rows) == 1
    assert [r["boxes"][:1] for r in unlimited] == [r["boxes"] for r in rows]
    assert all(len(r["long_exprs"]) == len(r["boxes"]) for r in unlimited)
    # the phrase with its modifiers from the long caption, e.g. "... triangle at the bottom right"
    pairs = [(box[1], long) for r in unlimited for box, long in zip(r["boxes"], r["long_exprs"])]
    assert all(long.lower().startswith(phrase.lower()) for phrase, long in pairs)
    assert sum(long != phrase for phrase, long in pairs) > len(pairs) / 2
