"""`fgdata eval`: what a trained CLIP has learnt, on FgGRN shards, FG-OVD jsonl and HierarCaps.

- fg-ovd: per box, the RoIAlign region feature against its positive phrase and its hard
  negatives; accuracy = share of boxes whose positive ranks first (chance 1/(k+1)).
- regional retrieval: each box against every distinct phrase of the set; top-1 accuracy.
- retrieval: image <-> long caption and image <-> short caption, R@1 and R@5 both ways.
- hierarcaps: d_corr (Kendall tau between each chain's distances to the root — the embedding of
  the empty text — and its tier order, averaged), and hierarchical retrieval precision and recall
  over 50 radius levels, for chains whose images are at hand.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.box_checks import check_box, shown
from pipeline.errors import FgdataError, first_line
from pipeline.hierarcaps_io import read_chains
from pipeline.shards import find_ancestor, list_shards, read_shard
from pipeline.train.clip_model import box_features, encode_text, image_and_patch_features, load_clip
from pipeline.train.data import fgclip_rows, fgclip_sources, pixels, usable_chains

log = logging.getLogger(__name__)

RADIUS_LEVELS = 50


class Encoder:
    """Batched, gradient-free access to a CLIP's image, box and text embeddings."""

    def __init__(self, model: str, image_size: int | None = None, batch_size: int = 64):
        self.parts = load_clip(model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = self.parts.model.to(self.device).eval()
        self.image_size = image_size or self.model.config.vision_config.image_size
        self.batch_size = batch_size

    @torch.no_grad()
    def texts(self, texts: list[str], long: bool = False) -> torch.Tensor:
        chunks = [encode_text(self.model, self.parts.tokenizer, texts[i : i + self.batch_size], long, self.device) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros((0, self.model.config.projection_dim))

    @torch.no_grad()
    def images(self, images: list[bytes], boxes: list[list[list[float]]] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image embeddings, and per image the features of its boxes (0-1 x1, y1, x2, y2)."""
        embedded, regions = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = torch.stack([pixels(b, self.image_size, self.parts.mean, self.parts.std) for b in chunk]).to(self.device)
            pooled, grid = image_and_patch_features(self.model, batch)
            embedded.append(pooled)
            for offset in range(len(chunk)):
                own = (boxes or [[]] * len(images))[start + offset]
                rois = torch.tensor([[float(offset), *box] for box in own], dtype=torch.float32, device=self.device).reshape(-1, 5)
                regions.append(box_features(grid, rois))
        return torch.cat(embedded), regions


def encode_items(encoder: Encoder, items: list[dict]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image embeddings and per-image box features of `items`, computed once for every metric."""
    return encoder.images([i["image"] for i in items], [[b for b, _, _ in i["boxes"]] for i in items])


def fgovd_accuracy(encoder: Encoder, items: list[dict], hard_negatives: int, regions: list[torch.Tensor] | None = None) -> dict:
    """items: {image (bytes), boxes: [[box, positive, [negatives]]]}; boxes with fewer than
    `hard_negatives` negatives are left out. `regions`: the items' box features, if already encoded."""
    regions = regions if regions is not None else encode_items(encoder, items)[1]
    features, texts, left_out = [], [], 0
    for item, boxes in zip(items, regions):
        for feature, (_, positive, negatives) in zip(boxes, item["boxes"]):
            if len(negatives) >= hard_negatives:
                features.append(feature)
                texts += [positive, *negatives[:hard_negatives]]
            else:
                left_out += 1
    if not features:
        return {"boxes": 0, "accuracy": None, "chance": 1 / (hard_negatives + 1), "left_out_too_few_negatives": left_out}
    candidates = encoder.texts(texts).reshape(len(features), hard_negatives + 1, -1)
    scores = torch.einsum("bd,bkd->bk", torch.stack(features), candidates)
    accuracy = (scores.argmax(dim=1) == 0).float().mean().item()
    return {"boxes": len(features), "accuracy": accuracy, "chance": 1 / (hard_negatives + 1), "left_out_too_few_negatives": left_out}


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
    """Kendall's tau-a between `values` and their positions 0, 1, 2, ..."""
    n = len(values)
    concordant = sum(np.sign(values[j] - values[i]) for i in range(n) for j in range(i + 1, n))
    return float(concordant) / (n * (n - 1) / 2)


def hierarchy_metrics(encoder: Encoder, chains: list[list[str]], images: list[bytes] | None = None) -> dict:
    root = encoder.texts([""])[0]
    distances = [(encoder.texts(tiers) - root).norm(dim=-1).tolist() for tiers in chains]
    taus = [kendall_tau(d) for d in distances]
    result = {
        "chains": len(chains),
        "d_corr": float(np.mean(taus)),
        "ordered_chains": float(np.mean([all(a < b for a, b in zip(d, d[1:])) for d in distances])),
    }
    if images:
        result.update(_hierarchical_retrieval(encoder, chains, images, root))
    return result


def _hierarchical_retrieval(encoder: Encoder, chains: list[list[str]], images: list[bytes], root: torch.Tensor) -> dict:
    """Sweep a radius over RADIUS_LEVELS levels between the smallest and largest text distance to the
    root; at each, the image retrieves its best-matching text among those inside the radius. The
    distinct texts retrieved are scored against the image's own tiers."""
    texts = sorted({t for tiers in chains for t in tiers})
    text_features = encoder.texts(texts)
    radius = (text_features - root).norm(dim=-1)
    levels = torch.linspace(radius.min().item(), radius.max().item(), RADIUS_LEVELS)
    image_features, _ = encoder.images(images)
    similarity = image_features @ text_features.T
    precision, recall = [], []
    for row, tiers in zip(similarity, chains):
        retrieved = set()
        for level in levels:
            inside = radius <= level + 1e-6
            if inside.any():
                retrieved.add(texts[int(torch.where(inside, row, torch.tensor(-1e9)).argmax())])
        truth = set(tiers)
        precision.append(len(retrieved & truth) / len(retrieved))
        recall.append(float(np.mean([t in retrieved for t in tiers])))
    return {"hierarchical_precision": float(np.mean(precision)), "hierarchical_recall": float(np.mean(recall))}


def fggrn_items(fggrn_dirs: list[Path], images: Path | None, limit: int, skipped: Counter | None = None) -> list[dict]:
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
    phrases; pos_expression a phrase or a list whose first item is the phrase."""
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
    if isinstance(positive, list) and positive:
        positive = positive[0]
    if not isinstance(positive, str) or not positive.strip():
        return None, ("bad_positive", f"pos_expression {shown(record['pos_expression'])}")
    if isinstance(negatives, dict):
        negatives = list(negatives.values())
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        return None, ("bad_negatives", f"neg_expression {shown(record['neg_expression'])} is not a list of phrases")
    try:
        bbox = tuple(float(v) for v in bbox)
    except OverflowError:  # an integer too large for a float; NaN and inf are left to check_box
        return None, ("box_not_finite", f"bbox {shown(bbox)} holds a number beyond float range")
    return FgovdRecord(path, bbox, positive, tuple(negatives)), None


def image_in_root(root: Path, img_path: str) -> tuple[Path | None, tuple[str, str] | None]:
    """(the regular file `img_path` names inside `root`, None) or (None, (reason, detail)): a
    benchmark file must not read what lies outside its image root (absolute paths, `..`, links)."""
    try:
        path = (root / img_path).resolve()
        if not path.is_relative_to(root):
            return None, ("image_outside_root", f"img_path {shown(img_path)} leads outside {root}")
        if not path.exists():
            return None, ("image_not_found", f"{shown(str(path))} not found (pass --image-root)")
        if not path.is_file():
            return None, ("image_not_a_file", f"{shown(str(path))} is not a regular file")
    except (OSError, ValueError, RuntimeError) as exc:  # a name too long, a NUL, a link loop
        return None, ("bad_img_path", f"img_path {shown(img_path)} ({shown(first_line(exc))})")
    return path, None


def _read_image(path: Path) -> tuple[tuple[bytes, int, int] | None, tuple[str, str] | None]:
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decoded in full once: a truncated file fails here, not mid-batch
            return (data, *image.size), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, ("image_undecodable", f"{path}: {first_line(exc)}")


def fgovd_items(jsonl: Path, image_root: Path | None, skipped: Counter | None = None) -> list[dict]:
    """FG-OVD's published layout: one box per line with img_path, bbox (COCO x, y, w, h in pixels),
    pos_expression and neg_expression; grouped by image. A line that fails `parse_fgovd_record`,
    names no readable image inside the root or has a bad box is counted by reason in `skipped`;
    with no usable line at all, a one-line error says why."""
    jsonl = Path(jsonl)
    root = Path(image_root or jsonl.parent).resolve()
    try:
        lines = jsonl.read_bytes().splitlines()
    except OSError as exc:
        raise FgdataError(f"cannot read the FG-OVD file {jsonl}: {first_line(exc)}") from None
    counts: Counter = Counter()
    first_skip = None
    grouped: dict[Path, dict] = {}
    bad_images: dict[Path, tuple[str, str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item, problem = _fgovd_box(line, root, grouped, bad_images)
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


def _fgovd_box(line: bytes, root: Path, grouped: dict, bad_images: dict):
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
            grouped[path] = {"image": image[0], "size": image[1:], "boxes": []}
    if path in bad_images:
        return None, bad_images[path]
    width, height = grouped[path]["size"]
    x, y, w, h = record.bbox
    box, problem = check_box([x, y, x + w, y + h], width, height)
    if problem:
        return None, problem
    normalised = [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
    return (path, (normalised, record.positive, list(record.negatives))), None


def hierarcaps_items(sources: list[Path], limit: int, skipped: Counter | None = None) -> tuple[list[list[str]], list[bytes] | None]:
    """The usable chains, and their images when every chain's key is found in an images dataset
    upstream; chains of another shape are counted by reason in `skipped`."""
    if limit < 1:
        raise FgdataError(f"--limit must be at least 1, got {limit}")
    counts: Counter = Counter()
    chains = usable_chains(read_chains(sources), need_negatives=False, counts=counts)[:limit]
    if skipped is not None:
        skipped.update(counts)
    if not chains:
        raise FgdataError(f"no usable chain in {', '.join(map(str, sources))} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    images_by_key: dict[str, bytes] = {}
    for source in sources:
        images_dir = find_ancestor(Path(source), "images") if Path(source).is_dir() else None
        for shard in list_shards(images_dir) if images_dir else []:
            images_by_key.update(zip(*read_shard(shard, columns=["key", "image"]).to_pydict().values()))
    images = [images_by_key.get(key) for key, _, _ in chains]
    return [tiers for _, tiers, _ in chains], images if all(images) else None


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
