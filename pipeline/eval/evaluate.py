"""`fgdata eval`: what a trained CLIP has learnt, on FgGRN shards, FG-OVD jsonl and HierarCaps.

- fg-ovd: per box, the RoIAlign region feature against its positive phrase and ALL its
  negatives, as FG-CLIP's fgovd_eval.py scores the benchmark; accuracy = share of boxes whose
  positive scores highest, ties included (chance: the mean of 1/(k+1)). --hard-negatives caps k.
  On the benchmark file the headline is the reference's figure: right boxes over every line of
  the file; the share among the boxes scored and the skips stand beside it.
- EXIF: benchmark images (FG-OVD, HierarCaps) are read in their stored pixel frame, as both
  reference evaluators open them with PIL alone; `exif_rotate` turns them upright, FG-OVD boxes
  with them. FgGRN rows are upright throughout fgdata (ingest measured them so), and stay so.
- regional retrieval: each box against every distinct phrase of the set; top-1 accuracy.
- retrieval: image <-> long caption and image <-> short caption, R@1 and R@5 both ways.
- hierarcaps: d_corr, hierarchical precision and recall exactly as the HierarCaps reference
  (code/evaluation/hierarchical_retrieval.py) computes them, on its official test CSV and images
  (--image-root) or on chains whose images are upstream of their shards; images prepared by the
  model's own processor (shortest side resized, centre crop), as there.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core.box_checks import check_box, shown
from pipeline.core.images import ImageRejected, decode_rgb, orientation
from pipeline.core.shards import find_ancestor, list_shards, read_shard
from pipeline.core.sources import OutsideRoot, path_inside
from pipeline.core.storage import Location, location, resolved
from pipeline.datasets.fggrn_rows import fgclip_rows, fgclip_sources, pixels
from pipeline.datasets.hierarcaps_csv import read_chains, read_official_csv, usable_chains
from pipeline.errors import FgdataError, first_line
from pipeline.models.clip_model import box_features, encode_text, image_and_patch_features, load_clip

log = logging.getLogger(__name__)

RADIUS_LEVELS = 50


class Encoder:
    """Batched, gradient-free access to a CLIP's image, box and text embeddings."""

    def __init__(self, model: str, image_size: int | None = None, batch_size: int = 64):
        self.parts = load_clip(model)
        self.reference, self._view = model, None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = self.parts.model.to(self.device).eval()
        self.image_size = image_size or self.model.config.vision_config.image_size
        self.batch_size = batch_size

    @torch.no_grad()
    def texts(self, texts: list[str], long: bool = False) -> torch.Tensor:
        chunks = [encode_text(self.model, self.parts.tokenizer, texts[i : i + self.batch_size], long, self.device) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros((0, self.model.config.projection_dim))

    @torch.no_grad()
    def images(self, images: list[bytes], boxes: list[list[list[float]]] | None = None, upright: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image embeddings, and per image the features of its boxes (0-1 x1, y1, x2, y2 in the
        frame `upright` picks: EXIF orientation applied, or the stored pixels)."""
        embedded, regions = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = torch.stack([pixels(b, self.image_size, self.parts.mean, self.parts.std, upright) for b in chunk]).to(self.device)
            pooled, grid = image_and_patch_features(self.model, batch)
            embedded.append(pooled)
            for offset in range(len(chunk)):
                own = (boxes or [[]] * len(images))[start + offset]
                rois = torch.tensor([[float(offset), *box] for box in own], dtype=torch.float32, device=self.device).reshape(-1, 5)
                regions.append(box_features(grid, rois))
        return torch.cat(embedded), regions

    @torch.no_grad()
    def views(self, images: list[bytes | Location], upright: bool = True) -> torch.Tensor:
        """Image embeddings of pictures prepared by the model's own processor (`ProcessorView`), as
        whole-image evaluators show them; `images` squashes to a square instead, so boxes keep
        their place for the region features."""
        if self._view is None:
            self._view = processor_view(self.reference, self.image_size, self.parts.mean, self.parts.std)
        embedded = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([view_pixels(image, self._view, upright) for image in images[start : start + self.batch_size]]).to(self.device)
            embedded.append(image_and_patch_features(self.model, batch)[0])
        return torch.cat(embedded)


@dataclass(frozen=True)
class ProcessorView:
    """How the model's own image processor prepares a picture (CLIPImageProcessor: resize the
    shortest side, centre crop, rescale, normalise), which CLIP evaluators such as HierarCaps' use."""

    shortest_edge: int | None
    resize_to: tuple[int, int] | None  # (height, width), for a processor that resizes to a fixed size
    crop: tuple[int, int] | None  # (height, width)
    resample: int
    rescale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


def processor_view(model: str, image_size: int, mean, std) -> ProcessorView:
    """The view the processor saved with `model` describes; CLIP's own when it has none."""
    default = ProcessorView(image_size, None, (image_size, image_size), int(Image.BICUBIC), 1 / 255, tuple(mean), tuple(std))
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError, KeyError):
        return default

    def field(size, name):  # a dict in older transformers, a SizeDict in newer ones
        return (size.get(name) if isinstance(size, dict) else getattr(size, name, None)) if size is not None else None

    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    resize = getattr(processor, "do_resize", True)
    edge = field(size, "shortest_edge") if resize else None
    fixed = (field(size, "height"), field(size, "width")) if resize and edge is None else None
    return ProcessorView(
        shortest_edge=edge,
        resize_to=fixed if fixed and all(fixed) else None,
        crop=(field(crop, "height"), field(crop, "width")) if getattr(processor, "do_center_crop", False) and field(crop, "height") else None,
        resample=int(getattr(processor, "resample", None) or Image.BICUBIC),
        rescale=float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0,
        mean=tuple(getattr(processor, "image_mean", None) or mean) if getattr(processor, "do_normalize", True) else (0.0, 0.0, 0.0),
        std=tuple(getattr(processor, "image_std", None) or std) if getattr(processor, "do_normalize", True) else (1.0, 1.0, 1.0),
    )


def view_pixels(image: bytes | Location, view: ProcessorView, upright: bool = True) -> torch.Tensor:
    """(3, H, W) pixels of `image` as `view` prepares them, with PIL as the reference's
    transformers 4.x processor does: the shorter side to shortest_edge, the longer one scaled and
    truncated to an integer, then the centre crop (offsets rounded down). EXIF orientation is
    applied when `upright`."""
    picture = decode_rgb(image if isinstance(image, bytes) else image.read_bytes(), upright)  # bytes, or a file (local or in a store)
    width, height = picture.size
    if view.shortest_edge:
        short, long = min(width, height), max(width, height)
        scaled = int(view.shortest_edge * long / short)
        size = (view.shortest_edge, scaled) if width <= height else (scaled, view.shortest_edge)
        picture = picture.resize(size, view.resample, reducing_gap=None)
    elif view.resize_to:
        picture = picture.resize(view.resize_to[::-1], view.resample, reducing_gap=None)
    if view.crop:
        (crop_height, crop_width), (width, height) = view.crop, picture.size
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
        picture = picture.crop((left, top, left + crop_width, top + crop_height))
    array = (np.asarray(picture, dtype=np.float64) * view.rescale).astype(np.float32)
    array = (array - np.array(view.mean, dtype=np.float32)) / np.array(view.std, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


def encode_items(encoder: Encoder, items: list[dict], upright: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image embeddings and per-image box features of `items`, computed once for every metric."""
    return encoder.images([i["image"] for i in items], [[b for b, _, _ in i["boxes"]] for i in items], upright)


def fgovd_accuracy(encoder: Encoder, items: list[dict], hard_negatives: int | None = None, regions: list[torch.Tensor] | None = None, upright: bool = True) -> dict:
    """items: {image (bytes), boxes: [[box, positive, [negatives]]]}. As FG-CLIP's own
    `fgovd_eval.py` scores it, each box is ranked against its positive and ALL its negatives
    (however many it has) and is right when the positive scores highest, ties included;
    `hard_negatives` caps the negatives at the first k (None: all). A box without any negative
    tests nothing and is left out, counted. `regions`: the items' box features, if already encoded;
    else the images are read upright or in their stored frame (`upright`)."""
    if hard_negatives is not None and hard_negatives < 1:
        raise FgdataError(f"--hard-negatives must be at least 1 (or left out for all), got {hard_negatives}")
    regions = regions if regions is not None else encode_items(encoder, items, upright)[1]
    features, candidates, left_out = [], [], 0
    for item, boxes in zip(items, regions):
        for feature, (_, positive, negatives) in zip(boxes, item["boxes"]):
            kept = list(negatives if hard_negatives is None else negatives[:hard_negatives])
            if kept:
                features.append(feature)
                candidates.append([positive, *kept])
            else:
                left_out += 1
    counts = [len(c) - 1 for c in candidates]
    result = {
        "boxes": len(features), "right": 0, "accuracy": None, "chance": None, "negatives_cap": hard_negatives,
        "negatives_per_box": {"min": min(counts), "max": max(counts), "mean": float(np.mean(counts))} if counts else None,
        "left_out_no_negatives": left_out,
    }
    if not features:
        return result
    texts = encoder.texts([t for c in candidates for t in c])
    right, start = 0, 0
    for feature, group in zip(features, candidates):
        scores = texts[start : start + len(group)] @ feature
        start += len(group)
        right += int(scores[0] >= scores.max())  # the reference's torch.equal(max, score[0]): a tie counts
    # chance: a random ranking is right 1/(k+1) of the time for a box with k negatives
    return {**result, "right": right, "accuracy": right / len(features), "chance": float(np.mean([1 / (k + 1) for k in counts]))}


def fgovd_benchmark(encoder: Encoder, jsonl: Location | str, image_root: Location | str | None, hard_negatives: int | None = None, exif_rotate: bool = False) -> dict:
    """An FG-OVD file scored, its headline `accuracy` as FG-CLIP's fgovd_eval.py reports it: boxes
    right over every line of the file (itemnum = len(readlines()), fgovd_eval.py:65-66, 129), where
    a line skipped here counts as wrong and a box without negatives as right (alone in its softmax,
    it is the maximum). Beside it: `accuracy_scored` over the boxes ranked here, and the skips.
    Blank lines are not counted: the reference cannot read one (json.loads fails)."""
    skipped: Counter = Counter()
    items = fgovd_items(jsonl, image_root, skipped, exif_rotate)
    scored = fgovd_accuracy(encoder, items, hard_negatives, upright=exif_rotate)
    lines = sum(len(item["boxes"]) for item in items) + sum(skipped.values())  # every record line is one or the other
    right = scored["right"] + scored["left_out_no_negatives"]
    return {
        "file": str(location(jsonl)), "accuracy": right / lines, "lines": lines, "lines_right": right,
        "accuracy_scored": scored.pop("accuracy"), **scored,  # boxes, right: of the boxes scored
        "lines_skipped": sum(skipped.values()), "skipped": dict(skipped), "exif_rotate": exif_rotate,
    }


def regional_retrieval(encoder: Encoder, items: list[dict], regions: list[torch.Tensor] | None = None) -> dict:
    regions = regions if regions is not None else encode_items(encoder, items)[1]
    phrases = sorted({p for i in items for _, p, _ in i["boxes"]})
    if not phrases:
        return {"boxes": 0, "top1": None, "chance": None}
    texts = encoder.texts(phrases)
    index = {p: n for n, p in enumerate(phrases)}
    hits = total = 0
    for item, features in zip(items, regions):
        for feature, (_, phrase, _) in zip(features, item["boxes"]):
            hits += int((texts @ feature).argmax().item() == index[phrase])
            total += 1
    return {"boxes": total, "phrases": len(phrases), "top1": hits / total, "chance": 1 / len(phrases)}


def _recall_at(similarity: torch.Tensor, k: int) -> float:
    """Row i's match is column i: share of rows with it among their top k."""
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
    return (top == torch.arange(similarity.shape[0], device=similarity.device).unsqueeze(1)).any(1).float().mean().item()


def retrieval(encoder: Encoder, images: list[bytes], captions: list[str], long: bool, image_features: torch.Tensor | None = None) -> dict:
    image_features = image_features if image_features is not None else encoder.images(images)[0]
    similarity = image_features @ encoder.texts(captions, long=long).T
    return {
        "image_to_text_r1": _recall_at(similarity, 1), "image_to_text_r5": _recall_at(similarity, 5),
        "text_to_image_r1": _recall_at(similarity.T, 1), "text_to_image_r5": _recall_at(similarity.T, 5),
    }


def kendall_tau(values: list[float]) -> float:
    """Kendall's tau-a between `values` and their positions 0, 1, 2, ... (tau-b when no value repeats)."""
    n = len(values)
    concordant = sum(np.sign(values[j] - values[i]) for i in range(n) for j in range(i + 1, n))
    return float(concordant) / (n * (n - 1) / 2)


def hierarchy_metrics(encoder: Encoder, chains: list[list[str]], images: list[bytes | Location] | None = None, exif_rotate: bool = False) -> dict:
    """d_corr, and with `images` (one per chain) hierarchical precision and recall, computed as the
    HierarCaps reference evaluator (code/evaluation/hierarchical_retrieval.py) computes them; its
    images in their stored frame as there (Image.open, no EXIF turn) unless `exif_rotate`.

    The root is the normalised embedding of the empty text; a tier's radius is the distance from it
    to the tier's normalised embedding. d_corr: per chain, Kendall's tau between the tier order the
    radii give (argsort, ties kept in tier order) and 1..4, averaged over the chains."""
    root = encoder.texts([""])[0]
    tiers = encoder.texts([t for c in chains for t in c]).reshape(len(chains), -1, root.shape[0])
    radii = (tiers - root).norm(dim=-1)  # (chains, tiers)
    # Kendall's tau of the argsort against 1..4 equals that of the radii (a permutation and its
    # inverse have the same inversions); argsort settles ties the way the reference's does
    taus = [kendall_tau(order) for order in radii.argsort(dim=-1, stable=True).tolist()]
    result = {
        "chains": len(chains),
        "d_corr": float(np.mean(taus)),
        "ordered_chains": float((radii[:, 1:] > radii[:, :-1]).all(dim=1).float().mean()),
    }
    if images:
        result.update(_hierarchical_retrieval(encoder, chains, images, tiers, radii, exif_rotate))
    return result


def _hierarchical_retrieval(encoder: Encoder, chains: list[list[str]], images: list[bytes | Location], tiers: torch.Tensor, radii: torch.Tensor, exif_rotate: bool) -> dict:
    """Per distinct image (its chains are its references): a radius sweeps RADIUS_LEVELS levels from
    the smallest to the largest radius of all the chains' tiers; at each level the image retrieves
    its most similar tier text among those inside the radius (every tier of every chain is a
    candidate, the first of equal scores wins). precision = share of the distinct texts retrieved
    that are tiers of the image's chains; recall = share of the tier levels 1..4 at which some chain
    of the image had its tier retrieved. Both averaged over the images."""
    texts = [t for c in chains for t in c]
    flat, flat_radii = tiers.reshape(len(texts), -1), radii.reshape(-1)
    levels = np.linspace(flat_radii.min().item(), flat_radii.max().item(), RADIUS_LEVELS)
    # never empty: the smallest radius is inside every level (compared in float32, as the reference does)
    inside = [torch.nonzero(flat_radii <= float(level)).flatten() for level in levels]
    groups: dict[tuple, tuple[bytes | Location, list[int]]] = {}  # distinct images, first seen first
    for number, image in enumerate(images):
        groups.setdefault(_image_identity(image), (image, []))[1].append(number)
    similarity = encoder.views([image for image, _ in groups.values()], exif_rotate) @ flat.T  # (images, texts)
    picks = torch.stack([candidates[similarity[:, candidates].argmax(dim=1)] for candidates in inside], dim=1)
    precision, recall = [], []
    for (_, members), row in zip(groups.values(), picks.tolist()):
        retrieved = {texts[k] for k in row}  # a set: dropping repeated neighbours changes nothing
        references = [chains[j] for j in members]
        truth = {t for chain in references for t in chain}
        precision.append(len(retrieved & truth) / max(1, len(retrieved)))
        levels_hit = [any(chain[level] in retrieved for chain in references) for level in range(len(references[0]))]
        recall.append(sum(levels_hit) / len(levels_hit))
    return {
        "images": len(groups), "radius_levels": RADIUS_LEVELS,
        "hierarchical_precision": float(np.mean(precision)), "hierarchical_recall": float(np.mean(recall)),
    }


def _image_identity(image: bytes | Location) -> tuple:
    return ("bytes", hashlib.sha1(image).hexdigest()) if isinstance(image, bytes) else ("file", str(resolved(image)))


def fggrn_items(fggrn_dirs: list[Location | str], images: Location | str | None, limit: int, skipped: Counter | None = None) -> list[dict]:
    """The first `limit` FgGRN rows with their image bytes and every usable box (the trainer's join);
    rows without an image and bad regions are counted by reason in `skipped`."""
    if limit < 1:
        raise FgdataError(f"--limit must be at least 1, got {limit}")
    counts: Counter = Counter()
    items = list(islice(fgclip_rows(fgclip_sources(fggrn_dirs, images), max_boxes=None, counts=counts), limit))
    skips = {k: v for k, v in sorted(counts.items()) if k.startswith(("skipped_", "dropped_"))}
    if not items:
        raise FgdataError(f"no usable FgGRN row in {', '.join(map(str, fggrn_dirs))} (rows {counts['rows']}{''.join(f', {k} {v}' for k, v in skips.items())})")
    if skipped is not None:
        skipped.update(skips)
    return items


@dataclass(frozen=True)
class FgovdRecord:
    """One FG-OVD line, checked: a box (COCO x, y, w, h in pixels) of an image, its positive phrase
    and its negatives."""

    img_path: str
    bbox: tuple[float, float, float, float]
    positive: str
    negatives: tuple[str, ...]


def parse_fgovd_record(line: bytes | str) -> tuple[FgovdRecord | None, tuple[str, str] | None]:
    """(record, None) or (None, (reason, detail)) for one line of an FG-OVD jsonl; never raises.

    neg_expression is a list of phrases, or FG-CLIP's `short_expr_negs` dict whose values are the
    phrases; pos_expression a phrase or a list whose first item is the phrase (the others become
    negatives, as in FG-CLIP's evaluator)."""
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        record = json.loads(text)
    except UnicodeDecodeError:
        return None, ("not_utf8", "the line is not UTF-8 text")
    except (ValueError, RecursionError) as exc:
        return None, ("not_json", f"not a JSON object ({first_line(exc)})")
    if not isinstance(record, dict):
        return None, ("not_json", f"a JSON {type(record).__name__}, not an object")
    missing = [k for k in ("img_path", "bbox", "pos_expression", "neg_expression") if k not in record]
    if missing:
        return None, ("missing_field", f"not an FG-OVD record: no {', '.join(missing)}")
    path, bbox, positive, negatives = record["img_path"], record["bbox"], record["pos_expression"], record["neg_expression"]
    if not isinstance(path, str) or not path.strip() or "\0" in path:
        return None, ("bad_img_path", f"img_path {shown(path)}")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return None, ("bad_bbox", f"bbox {shown(bbox)} is not [x, y, w, h]")
    # FG-CLIP's evaluator ranks pos_expression + neg_expression and wants index 0 on top: any
    # further item of a pos_expression list competes with it like a negative
    rivals = []
    if isinstance(positive, list) and positive:
        positive, rivals = positive[0], positive[1:]
    if not isinstance(positive, str) or not positive.strip():
        return None, ("bad_positive", f"pos_expression {shown(record['pos_expression'])}")
    if isinstance(negatives, dict):
        negatives = list(negatives.values())
    if isinstance(negatives, list):
        negatives = [*rivals, *negatives]
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        return None, ("bad_negatives", f"neg_expression {shown(record['neg_expression'])} is not a list of phrases")
    try:
        bbox = tuple(float(v) for v in bbox)
    except OverflowError:  # an integer too large for a float; NaN and inf are left to check_box
        return None, ("box_not_finite", f"bbox {shown(bbox)} holds a number beyond float range")
    return FgovdRecord(path, bbox, positive, tuple(negatives)), None


def image_in_root(root: Location, img_path: str) -> tuple[Location | None, tuple[str, str] | None]:
    """(the regular file `img_path` names inside `root`, None) or (None, (reason, detail)): a
    benchmark file must not read what lies outside its image root (absolute paths, `..`, links).
    `root` may be a folder in an object store."""
    try:
        path = path_inside(root, img_path)  # a local path or a key under a store root
        if not path.exists():
            return None, ("image_not_found", f"{shown(str(path))} not found (pass --image-root)")
        if not path.is_file():
            return None, ("image_not_a_file", f"{shown(str(path))} is not a regular file")
    except OutsideRoot:
        return None, ("image_outside_root", f"img_path {shown(img_path)} leads outside {root}")
    except (OSError, ValueError, RuntimeError) as exc:  # a name too long, a NUL, a link loop
        return None, ("bad_img_path", f"img_path {shown(img_path)} ({shown(first_line(exc))})")
    return path, None


def _read_image(path: Location) -> tuple[tuple[bytes, int, int, int] | None, tuple[str, str] | None]:
    """(bytes, stored width, stored height, EXIF orientation), or the problem."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decoded in full once: a truncated file fails here, not mid-batch
            return (data, *image.size, orientation(image)), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, ("image_undecodable", f"{path}: {first_line(exc)}")


def fgovd_items(jsonl: Location | str, image_root: Location | str | None, skipped: Counter | None = None, exif_rotate: bool = False) -> list[dict]:
    """FG-OVD's published layout: one box per line with img_path, bbox (COCO x, y, w, h in pixels),
    pos_expression and neg_expression; grouped by image. A line that fails `parse_fgovd_record`,
    names no readable image inside the root or has a bad box is counted by reason in `skipped`;
    with no usable line at all, a one-line error says why. The file and the root may be URIs.
    Boxes are made relative to the stored image size, as fgovd_eval.py:86-93 does; with
    `exif_rotate` they are turned with the image's EXIF orientation, as its pixels will be."""
    jsonl = location(jsonl)
    root = resolved(image_root or jsonl.parent)
    try:
        lines = jsonl.read_bytes().splitlines()
    except OSError as exc:
        raise FgdataError(f"cannot read the FG-OVD file {jsonl}: {first_line(exc)}") from None
    counts: Counter = Counter()
    first_skip = None
    grouped: dict[Location, dict] = {}
    bad_images: dict[Location, tuple[str, str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item, problem = _fgovd_box(line, root, grouped, bad_images, exif_rotate)
        if problem:
            counts[problem[0]] += 1
            first_skip = first_skip or f"line {number}: {problem[1]}"
            continue
        grouped[item[0]]["boxes"].append(item[1])
    if skipped is not None:
        skipped.update(counts)
    items = [item for item in grouped.values() if item["boxes"]]
    if not items:
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no lines"
        raise FgdataError(f"{jsonl}: no usable FG-OVD record ({summary}; first: {first_skip})")
    if counts:
        log.warning("%s: %d lines skipped (%s)", jsonl, sum(counts.values()), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return items


def _fgovd_box(line: bytes, root: Location, grouped: dict, bad_images: dict, exif_rotate: bool):
    """((image path, (normalised box, positive, negatives)), None) for one line, or (None, problem);
    each image is read once and kept in `grouped` (or its problem in `bad_images`)."""
    record, problem = parse_fgovd_record(line)
    if problem:
        return None, problem
    path, problem = image_in_root(root, record.img_path)
    if problem:
        return None, problem
    if path not in grouped and path not in bad_images:
        image, problem = _read_image(path)
        if problem:
            bad_images[path] = problem
        else:
            grouped[path] = {"image": image[0], "size": image[1:3], "orientation": image[3], "boxes": []}
    if path in bad_images:
        return None, bad_images[path]
    width, height = grouped[path]["size"]
    x, y, w, h = record.bbox
    box, problem = check_box([x, y, x + w, y + h], width, height)
    if problem:
        return None, problem
    normalised = [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
    if exif_rotate:
        normalised = oriented_box(normalised, grouped[path]["orientation"])
    return (path, (normalised, record.positive, list(record.negatives))), None


# Where a point (x, y) of the stored image, in 0-1 units, lands once PIL's exif_transpose has applied
# EXIF orientation 1-8 (mirrors, turns by 180, transposes, quarter turns clockwise and back)
_ORIENTED_POINT = {
    1: lambda x, y: (x, y), 2: lambda x, y: (1 - x, y), 3: lambda x, y: (1 - x, 1 - y), 4: lambda x, y: (x, 1 - y),
    5: lambda x, y: (y, x), 6: lambda x, y: (1 - y, x), 7: lambda x, y: (1 - y, 1 - x), 8: lambda x, y: (y, 1 - x),
}


def oriented_box(box: list[float], orientation_tag: int) -> list[float]:
    """A 0-1 x1, y1, x2, y2 box of the stored image, in the frame EXIF orientation turns it to."""
    (ax, ay), (bx, by) = (_ORIENTED_POINT[orientation_tag](x, y) for x, y in ((box[0], box[1]), (box[2], box[3])))
    return [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]


def hierarcaps_items(sources: list[Location | str], limit: int, skipped: Counter | None = None, image_root: Location | str | None = None) -> tuple[list[list[str]], list[bytes | Location] | None]:
    """The first `limit` usable chains, and one image per chain (bytes or a file), or None.

    With `image_root` (the official test set: hierarcaps_test.csv and assets/test_imgs), a chain's
    image is the file in that folder whose name ends in `_<COCO id>` of its image_url, as the
    reference evaluator pairs them; a chain without a readable one is skipped. Without, images come
    from an images dataset upstream of hierarcaps shards, used only when every chain has one.
    Chains of another shape and skipped chains are counted by reason in `skipped`."""
    if limit < 1:
        raise FgdataError(f"--limit must be at least 1, got {limit}")
    counts: Counter = Counter()
    chains = usable_chains(read_chains(sources, counts=counts), need_negatives=False, counts=counts)[:limit]
    if image_root is not None and chains:
        chains = _with_image_files(chains, sources, location(image_root), counts)
    if skipped is not None:
        skipped.update(counts)
    if not chains:
        raise FgdataError(f"no usable chain in {', '.join(map(str, sources))} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    if image_root is not None:
        return [tiers for _, tiers, _, _ in chains], [image for _, _, _, image in chains]
    images_by_key: dict[str, bytes] = {}
    for source in map(location, sources):  # a Path, or a UPath for a URI
        images_dir = find_ancestor(source, "images") if source.is_dir() else None
        for shard in list_shards(images_dir) if images_dir else []:
            images_by_key.update(zip(*read_shard(shard, columns=["key", "image"]).to_pydict().values()))
    images = [images_by_key.get(key) for key, _, _ in chains]
    return [tiers for _, tiers, _ in chains], images if all(images) else None


_COCO_ID_IN_URL = re.compile(r"_(\d+)")  # the reference: image_url.str.extract('_(\d+)'), the first match


def coco_id_in_url(url) -> int | None:
    match = _COCO_ID_IN_URL.search(url) if isinstance(url, str) else None
    return int(match.group(1)) if match else None


def coco_id_of_file(name: str) -> int | None:
    """The reference's fn2id: the number after the last `_` of the name without its extension."""
    last = Path(name).stem.rsplit("_", 1)[-1]
    return int(last) if re.fullmatch(r"[0-9]+", last) else None


def _with_image_files(chains: list[tuple], sources: list[Location], root: Location, counts: Counter) -> list[tuple]:
    """(key, tiers, negatives, image file) for the chains whose image_url's COCO id names a readable
    image in `root`; the others are counted as skipped_<reason>."""
    if not root.is_dir():
        raise FgdataError(f"--image-root {root} is not a folder (for HierarCaps: the test images, assets/test_imgs)")
    root = resolved(root)
    files: dict[int, str] = {}
    for entry in sorted(root.iterdir()):  # the reference lists glob('DIR/*'): no subfolders, no dot files
        number = coco_id_of_file(entry.name) if not entry.name.startswith(".") else None
        if number is not None:
            files.setdefault(number, entry.name)
    urls = _image_urls(sources)
    checked: dict[str, tuple] = {}
    kept = []
    for key, tiers, negatives in chains:
        number = coco_id_in_url(urls.get(key))
        if number is None:
            counts["skipped_no_coco_id_in_image_url"] += 1
            continue
        if number not in files:
            counts["skipped_image_not_found"] += 1
            continue
        name = files[number]
        if name not in checked:  # each file checked (inside the root, decodes whole) once
            path, problem = image_in_root(root, name)
            checked[name] = (path, problem) if problem else (path, _view_problem(path))
        path, problem = checked[name]
        if problem:
            counts[f"skipped_{problem[0]}"] += 1
            continue
        kept.append((key, tiers, negatives, path))
    return kept


def _view_problem(path: Location) -> tuple[str, str] | None:
    """Why the eval cannot show `path` to the model (it decodes whole, as `Encoder.views` will)."""
    try:
        decode_rgb(path.read_bytes())
    except ImageRejected as exc:
        return f"image_{exc.reason}", f"{path}: {exc.detail}"
    except OSError as exc:
        return "image_unreadable", f"{path}: {first_line(exc)}"
    return None


def _image_urls(sources: list[Location]) -> dict[str, str]:
    """key -> image_url of every chain in `sources` (official CSVs or hierarcaps shards)."""
    urls: dict[str, str] = {}
    for source in map(location, sources):
        if source.is_file():
            urls.update((row["key"], row["image_url"]) for row in read_official_csv(source)[1])
            continue
        for shard in list_shards(source):
            columns = read_shard(shard).column_names
            if "image_url" in columns:
                urls.update(zip(*read_shard(shard, columns=["key", "image_url"]).to_pydict().values()))
    return urls


def format_table(results: dict) -> str:
    """The results as `set  metric  value` lines."""
    lines = [f"model: {results['model']}"]

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif prefix != "model":
            shown = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
            lines.append(f"  {prefix:<48} {shown:>10}")

    walk("", results)
    return "\n".join(lines)
