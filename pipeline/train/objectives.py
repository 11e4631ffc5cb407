"""The two objectives `fgdata train` runs: what they train, what they read, and their loss."""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.core.storage import Location, location
from pipeline.datasets.fggrn_rows import FgclipStream, collate_fgclip, count_fgclip_rows, fgclip_sources
from pipeline.datasets.hierarcaps_csv import TIERS, read_chains, usable_chains
from pipeline.errors import FgdataError
from pipeline.models.clip_model import (
    HARD_NEGATIVE_SCALE,
    REGION_SCALE,
    box_features,
    encode_text,
    extend_text_positions,
    image_and_patch_features,
    load_clip,
    save_clip,
)
from pipeline.train.losses import gather, hard_negative_loss, info_nce, radial_embedding_loss

log = logging.getLogger(__name__)


class FgclipModule(torch.nn.Module):
    """CLIP plus the learnable temperatures of the regional and hard-negative logits, both started
    at CLIP's own (train_fgclip.py:386-387, on every start, an FG-CLIP checkpoint's too) unless
    `scales` gives theirs ({REGION_SCALE: value, HARD_NEGATIVE_SCALE: value}). No scale is clamped:
    the reference has no clamp (fgclip.py:497-502, 526, 538), and a clamp at ln 100 under OpenAI's
    4.6052 start froze all three."""

    def __init__(self, clip, scales: dict | None = None):
        super().__init__()
        self.clip = clip
        start, scales = float(clip.logit_scale.detach()), scales or {}
        self.region_logit_scale = torch.nn.Parameter(torch.tensor(scales.get(REGION_SCALE, start)))
        self.hard_negative_logit_scale = torch.nn.Parameter(torch.tensor(scales.get(HARD_NEGATIVE_SCALE, start)))


class FgclipObjective:
    """FG-CLIP stage 2 on FgGRN shards (+ their images).

    Per batch: image <-> long caption and image <-> "a photo of " + short caption InfoNCE, gathered
    across processes (fgclip.py:479-518); box <-> region text InfoNCE on this process's boxes only
    (fgclip.py:452, 523-532); per box with hard negatives an (1 + K)-way cross-entropy, region to
    text only, positive = the short phrase (fgclip.py:534-539, train_fgclip.py:264-277).
    With a GradCache chunk (`grad_cache_chunk`, or set by `global_batch_size`) the batch's loss is the
    same but its backward runs chunk by chunk (`cached_step`), so a large contrastive batch fits a
    small device: one GPU trains on the reference's 512 x 8 images per step."""

    name = "fgclip"

    def __init__(self, sources: list[Location], settings, images: Location | None, device: str, rank: int = 0, world: int = 1):
        self.settings, self.device, self.rank, self.world = settings, device, rank, world
        contrastive_batch(settings, world)  # a global batch the processes cannot share stops here, before any work
        self.pairs = fgclip_sources(sources, images)
        # before the model loads: a set with no usable row would otherwise stream nothing forever
        self.data = count_fgclip_rows(self.pairs, settings.max_boxes, settings.hard_negatives if settings.hard_negative_weight else 0)
        self.rows = self.data["rows_usable"]
        if not self.rows:
            raise FgdataError(f"no usable FgGRN row in {', '.join(map(str, sources))} ({_summary(self.data)}); check that the image shards hold these keys")
        parts = load_clip(settings.model, settings.revision)
        extend_text_positions(parts.model, settings.long_text_tokens, settings.keep_positions)
        own_size = parts.model.config.vision_config.image_size
        if settings.image_size not in (0, own_size):
            raise FgdataError(f"fgclip.image_size={settings.image_size}, but {settings.model} takes {own_size} px images; set 0 to use its own")
        settings.image_size = own_size
        self.parts = parts
        if parts.logit_scales:
            log.info("%s holds FG-CLIP's regional and hard-negative temperatures: %s", settings.model, "kept" if settings.keep_logit_scales else "restarted at logit_scale, as FG-CLIP's trainer does (fgclip.keep_logit_scales=true keeps them)")
        self.module = FgclipModule(parts.model, parts.logit_scales if settings.keep_logit_scales else None).to(device)

    @property
    def batch_size(self) -> int:
        """Samples this process contrasts per step."""
        return contrastive_batch(self.settings, self.world)[0]

    @property
    def chunk(self) -> int:
        """GradCache's chunk; 0: one plain forward and backward."""
        return contrastive_batch(self.settings, self.world)[1]

    @property
    def grad_cache(self) -> bool:
        """Whether the loop calls `cached_step` instead of `loss` + backward."""
        return self.chunk > 0

    def steps_per_epoch(self) -> int:
        return max(1, self.rows // (self.batch_size * self.world * self.settings.gradient_accumulation))

    def batches(self, skip_batches: int):
        settings = dataclasses.replace(self.settings, batch_size=self.batch_size)
        stream = FgclipStream(self.pairs, settings, self.parts.mean, self.parts.std, skip_batches, self.rank, self.world)
        return iter(torch.utils.data.DataLoader(
            stream, batch_size=self.batch_size, num_workers=self.settings.num_workers, collate_fn=collate_fgclip,
            persistent_workers=self.settings.num_workers > 0, worker_init_fn=_own_store_clients,
        ))

    def _hard_boxes(self, batch: dict) -> list[int]:
        """The boxes in the hard-negative loss: flagged (FG-CLIP's flag_short_neg, train_fgclip.py:271)
        and with K negatives. The reference has no rule for a flagged box with fewer: its loss
        reshapes every box's texts to 1 + 10 (fgclip.py:536), which fails on such a batch, so they
        are left out here, counted and logged (count_fgclip_rows)."""
        k = self.settings.hard_negatives
        if not (k and self.settings.hard_negative_weight):
            return []
        return [i for i, (negatives, flagged) in enumerate(zip(batch["negatives"], batch["flagged"])) if flagged and len(negatives) >= k]

    def _pieces(self, batch: dict, chunk: int) -> list:
        """The batch's forwards, each a function of the CLIP returning {name: embeddings}: the images
        (with their boxes' features) and every text group, cut into pieces of `chunk` items (0: whole).
        Concatenated in order, the pieces give the embeddings the loss reads."""
        s = self.settings
        hard = self._hard_boxes(batch)
        with_boxes = bool(batch["phrases"]) and bool(s.regional_weight or hard)
        pixels, boxes = batch["pixels"], batch["boxes"]
        size = chunk or max(1, pixels.shape[0])
        pieces = []
        for start in range(0, pixels.shape[0], size):
            own = (boxes[:, 0] >= start) & (boxes[:, 0] < start + size) if with_boxes else torch.zeros(boxes.shape[0], dtype=torch.bool)
            local = boxes[own].clone()
            local[:, 0] -= start
            pieces.append(partial(self._embed_images, pixels=pixels[start : start + size], boxes=local if with_boxes else None))
        texts = {"long": (batch["long"], True), "short": ([s.short_prompt.format(t) for t in batch["short"]], False)}
        if batch["phrases"] and s.regional_weight:
            texts["region_texts"] = (batch["region_texts"], False)
        if hard:
            # FG-CLIP encodes each hard box's texts together: its short phrase, then its K negatives
            texts["hard_texts"] = ([t for i in hard for t in (batch["phrases"][i], *batch["negatives"][i][: s.hard_negatives])], False)
        for name, (group, long) in texts.items():
            size = chunk or max(1, len(group))
            for start in range(0, len(group), size):
                pieces.append(partial(self._embed_texts, name=name, texts=group[start : start + size], long=long))
        return pieces

    def _embed_images(self, clip, pixels: torch.Tensor, boxes: torch.Tensor | None) -> dict:
        images, grid = image_and_patch_features(clip, pixels.to(self.device))
        return {"images": images} if boxes is None else {"images": images, "regions": box_features(grid, boxes.to(self.device))}

    def _embed_texts(self, clip, name: str, texts: list[str], long: bool) -> dict:
        return {name: encode_text(clip, self.parts.tokenizer, texts, long=long, device=self.device)}

    def _loss_from(self, embedded: dict, batch: dict, module) -> tuple[torch.Tensor, dict]:
        s = self.settings
        scale = module.clip.logit_scale.exp()
        all_images = gather(embedded["images"])
        parts = {"long": info_nce(all_images, gather(embedded["long"]), scale), "short": info_nce(all_images, gather(embedded["short"]), scale)}
        total = s.long_weight * parts["long"] + s.short_weight * parts["short"]
        if "region_texts" in embedded:
            # this process's boxes only, as the reference: no gather (fgclip.py:452)
            parts["regional"] = info_nce(embedded["regions"], embedded["region_texts"], module.region_logit_scale.exp())
            total = total + s.regional_weight * parts["regional"]
        if "hard_texts" in embedded:
            hard = self._hard_boxes(batch)
            texts = embedded["hard_texts"].reshape(len(hard), 1 + s.hard_negatives, -1)
            regions = embedded["regions"][torch.tensor(hard, device=embedded["regions"].device)]
            parts["hard_negative"] = hard_negative_loss(regions, texts[:, 0], texts[:, 1:], module.hard_negative_logit_scale.exp())
            total = total + s.hard_negative_weight * parts["hard_negative"]
        return total, {name: value.item() for name, value in parts.items()}

    def loss(self, batch: dict, module) -> tuple[torch.Tensor, dict]:
        return self._loss_from(_joined([piece(module.clip) for piece in self._pieces(batch, 0)]), batch, module)

    def cached_step(self, batch: dict, module, factor: float, autocast: bool) -> tuple[torch.Tensor, dict]:
        """GradCache (Gao et al. 2021): embeds the whole batch without gradients, computes the loss
        and its gradient with respect to every embedding, then re-embeds chunk by chunk with
        gradients and back-propagates those cached gradients. The parameters' gradients are the
        unchunked loss's (times `factor`); activations are held for one chunk at a time. CLIP has no
        dropout, so the re-forward reproduces the first one exactly. Returns the detached loss."""
        pieces = self._pieces(batch, self.chunk)
        context = partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16, enabled=autocast)
        with torch.no_grad(), context():
            outputs = [piece(module.clip) for piece in pieces]
        leaves = {name: value.detach().requires_grad_() for name, value in _joined(outputs).items()}
        with context():
            total, parts = self._loss_from(leaves, batch, module)
        (total * factor).backward()  # gradients of the logit scales land directly, the embeddings' on the leaves
        offsets = dict.fromkeys(leaves, 0)
        for piece, output in zip(pieces, outputs):
            grads = {}
            for name, value in output.items():
                grad = leaves[name].grad
                if grad is not None:
                    grads[name] = grad[offsets[name] : offsets[name] + value.shape[0]]
                offsets[name] += value.shape[0]
            if grads:
                with context():
                    again = piece(module.clip)
                torch.autograd.backward([again[name] for name in grads], list(grads.values()))
        return total.detach(), parts

    def save(self, out_dir: Path, module) -> None:
        """In FG-CLIP's layout, temperatures included: FG-CLIP's own code continues from it."""
        save_clip(module.clip, self.parts.tokenizer, out_dir, {REGION_SCALE: module.region_logit_scale, HARD_NEGATIVE_SCALE: module.hard_negative_logit_scale})

    def load_weights(self, folder: Path, module) -> None:
        """What `save` wrote into `folder`, back into the module being trained (a resumed run)."""
        parts = load_clip(str(folder))
        module.clip.load_state_dict(parts.model.state_dict())
        with torch.no_grad():
            module.region_logit_scale.fill_(parts.logit_scales[REGION_SCALE])
            module.hard_negative_logit_scale.fill_(parts.logit_scales[HARD_NEGATIVE_SCALE])


def contrastive_batch(settings, world: int) -> tuple[int, int]:
    """(samples per process per step, GradCache chunk or 0): batch_size and grad_cache_chunk; with
    global_batch_size, each process's share of it, cut into chunks of batch_size where the share
    is larger (the size a device holds at once) unless grad_cache_chunk names another."""
    if not settings.global_batch_size:
        return settings.batch_size, settings.grad_cache_chunk
    share, left = divmod(settings.global_batch_size, world)
    if left or not share:
        raise FgdataError(f"fgclip.global_batch_size={settings.global_batch_size} must be a multiple of the {world} training processes")
    return share, settings.grad_cache_chunk or (settings.batch_size if share > settings.batch_size else 0)


def _own_store_clients(_worker: int) -> None:
    """A data-loader worker is a fork of the trainer, and an object store's client made before the fork
    (s3fs, gcsfs: an event loop on a thread of the parent) refuses to run in it: the worker's copy of
    the stream reaches its shards through locations, and so clients, of its own."""
    stream = torch.utils.data.get_worker_info().dataset
    stream.pairs = [(location(str(rows)), location(str(images))) for rows, images in stream.pairs]


def _joined(outputs: list[dict]) -> dict:
    """The pieces' embeddings concatenated name by name, in piece order."""
    names = dict.fromkeys(name for output in outputs for name in output)
    return {name: torch.cat([output[name] for output in outputs if name in output]) for name in names}


class RadialObjective:
    """Radial Embedding on HierarCaps chains: only the text tower and text projection learn."""

    name = "re"

    def __init__(self, sources: list[Location], settings, images: Location | None, device: str, rank: int = 0, world: int = 1):
        self.settings, self.device, self.rank, self.world = settings, device, rank, world
        # checked before the model loads: one chain of another shape fails a whole batch
        self.data = Counter()
        chains = read_chains(sources, need_negatives=True, counts=self.data)  # rows a CSV read leaves out, by reason
        left_by_reader = sum(self.data.values())
        self.chains = usable_chains(chains, need_negatives=True, counts=self.data)
        self.data.update(rows=len(chains) + left_by_reader, rows_usable=len(self.chains))
        if not self.chains:
            raise FgdataError(f"no usable chain in {', '.join(map(str, sources))} ({_summary(self.data)}); each needs {TIERS} non-empty tiers and a negative chain of {TIERS}")
        dropped = Counter({name: n for name, n in self.data.items() if name.startswith("skipped_")})
        # said on every run, not only when some are left out: a fifth of a file lost must not go unseen
        log.log(logging.WARNING if dropped else logging.INFO, "re data: %d chains used, %d left out%s", len(self.chains), sum(dropped.values()), f" ({_summary(dropped)})" if dropped else "")
        self.parts = load_clip(settings.model, settings.revision)
        clip = self.parts.model.to(device)
        for parameter in clip.parameters():
            parameter.requires_grad = False
        for parameter in [*clip.text_model.parameters(), *clip.text_projection.parameters()]:
            parameter.requires_grad = True
        self.module = clip
        # the pullback target: the original text tower, frozen
        self.frozen_text = copy.deepcopy(torch.nn.ModuleDict({"text_model": clip.text_model, "text_projection": clip.text_projection})).eval()
        for parameter in self.frozen_text.parameters():
            parameter.requires_grad = False

    def steps_per_epoch(self) -> int:
        return max(1, len(self.chains) // (self.settings.batch_size * self.world * self.settings.gradient_accumulation))

    def batches(self, skip_batches: int):
        s = self.settings
        batch_index, epoch = 0, 0
        per_epoch = len(self.chains) // (s.batch_size * self.world) or 1
        while True:
            order = list(range(len(self.chains)))
            random.Random(s.seed * 1_000_003 + epoch).shuffle(order)
            for b in range(per_epoch):
                if batch_index >= skip_batches:
                    start = (b * self.world + self.rank) * s.batch_size
                    yield [self.chains[i] for i in order[start : start + s.batch_size]] or [self.chains[order[0]]]
                batch_index += 1
            epoch += 1

    def _frozen_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.parts.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        with torch.no_grad():
            pooled = self.frozen_text["text_model"](input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
            return F.normalize(self.frozen_text["text_projection"](pooled), dim=-1)

    def loss(self, batch: list, module) -> tuple[torch.Tensor, dict]:
        s, tiers = self.settings, len(batch[0][1])
        clip = module
        texts = [t for _, positive, _ in batch for t in positive] + [t for _, _, negative in batch for t in negative]
        embedded = encode_text(clip, self.parts.tokenizer, texts + [""], long=False, device=self.device)
        current, root = embedded[:-1], embedded[-1]
        positives = current[: len(batch) * tiers].reshape(len(batch), tiers, -1)
        negatives = current[len(batch) * tiers :].reshape(len(batch), tiers, -1)
        return radial_embedding_loss(positives, negatives, root, current, self._frozen_text(texts), s.lambda_e, s.lambda_m, s.lambda_p, s.cosine_clip)

    def save(self, out_dir: Path, module) -> None:
        save_clip(module, self.parts.tokenizer, out_dir)

    def load_weights(self, folder: Path, module) -> None:
        """What `save` wrote into `folder`, back into the model being trained (a resumed run)."""
        module.load_state_dict(load_clip(str(folder)).model.state_dict())


def _summary(counts: Counter) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


OBJECTIVES = {"fgclip": (FgclipObjective, "fgclip"), "re": (RadialObjective, "radial")}
