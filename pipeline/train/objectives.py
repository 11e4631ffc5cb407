"""The two objectives `fgdata train` runs: what they train, what they read, and their loss."""

from __future__ import annotations

import copy
import logging
import math
import random
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.errors import FgdataError
from pipeline.hierarcaps_io import read_chains
from pipeline.train.clip_model import box_features, encode_text, extend_text_positions, image_and_patch_features, load_clip
from pipeline.train.data import TIERS, FgclipStream, collate_fgclip, count_fgclip_rows, fgclip_sources, usable_chains
from pipeline.train.losses import gather, hard_negative_loss, info_nce, radial_embedding_loss

log = logging.getLogger(__name__)

_MAX_LOGIT_SCALE = math.log(100.0)


class FgclipModule(torch.nn.Module):
    """CLIP plus the learnable temperatures of the regional and hard-negative logits."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        start = float(clip.logit_scale.detach())
        self.region_logit_scale = torch.nn.Parameter(torch.tensor(start))
        self.hard_negative_logit_scale = torch.nn.Parameter(torch.tensor(start))


class FgclipObjective:
    """FG-CLIP stage 2 on FgGRN shards (+ their images)."""

    name = "fgclip"

    def __init__(self, sources: list[Path], settings, images: Path | None, device: str, rank: int = 0, world: int = 1):
        self.settings, self.device, self.rank, self.world = settings, device, rank, world
        self.pairs = fgclip_sources(sources, images)
        # before the model loads: a set with no usable row would otherwise stream nothing forever
        self.data = count_fgclip_rows(self.pairs, settings.max_boxes)
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
        self.module = FgclipModule(parts.model).to(device)

    def steps_per_epoch(self) -> int:
        return max(1, self.rows // (self.settings.batch_size * self.world * self.settings.gradient_accumulation))

    def batches(self, skip_batches: int):
        stream = FgclipStream(self.pairs, self.settings, self.parts.mean, self.parts.std, skip_batches, self.rank, self.world)
        return iter(torch.utils.data.DataLoader(
            stream, batch_size=self.settings.batch_size, num_workers=self.settings.num_workers, collate_fn=collate_fgclip,
            persistent_workers=self.settings.num_workers > 0,
        ))

    def loss(self, batch: dict, module) -> tuple[torch.Tensor, dict]:
        s, device = self.settings, self.device
        clip, heads = module.clip, module
        tokenizer = self.parts.tokenizer
        images, grid = image_and_patch_features(clip, batch["pixels"].to(device))
        long = encode_text(clip, tokenizer, batch["long"], long=True, device=device)
        short = encode_text(clip, tokenizer, [s.short_prompt.format(t) for t in batch["short"]], long=False, device=device)
        scale = clip.logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp()
        all_images = gather(images)
        parts = {"long": info_nce(all_images, gather(long), scale), "short": info_nce(all_images, gather(short), scale)}
        total = s.long_weight * parts["long"] + s.short_weight * parts["short"]
        if batch["phrases"]:
            regions = box_features(grid, batch["boxes"].to(device))
            phrases = encode_text(clip, tokenizer, batch["phrases"], long=False, device=device)
            if s.regional_weight:
                parts["regional"] = info_nce(gather(regions), gather(phrases), heads.region_logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp())
                total = total + s.regional_weight * parts["regional"]
            with_negatives = [i for i, negs in enumerate(batch["negatives"]) if len(negs) >= s.hard_negatives]
            if s.hard_negative_weight and with_negatives and s.hard_negatives:
                texts = [text for i in with_negatives for text in batch["negatives"][i][: s.hard_negatives]]
                negatives = encode_text(clip, tokenizer, texts, long=False, device=device).reshape(len(with_negatives), s.hard_negatives, -1)
                index = torch.tensor(with_negatives, device=device)
                parts["hard_negative"] = hard_negative_loss(regions[index], phrases[index], negatives, heads.hard_negative_logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp())
                total = total + s.hard_negative_weight * parts["hard_negative"]
        return total, {name: value.item() for name, value in parts.items()}

    def save(self, out_dir: Path, module) -> None:
        from safetensors.torch import save_file

        module.clip.save_pretrained(out_dir)
        self.parts.tokenizer.save_pretrained(out_dir)
        save_file({"region_logit_scale": module.region_logit_scale.detach().cpu().reshape(1), "hard_negative_logit_scale": module.hard_negative_logit_scale.detach().cpu().reshape(1)}, str(Path(out_dir) / "fgclip_heads.safetensors"))


class RadialObjective:
    """Radial Embedding on HierarCaps chains: only the text tower and text projection learn."""

    name = "re"

    def __init__(self, sources: list[Path], settings, images: Path | None, device: str, rank: int = 0, world: int = 1):
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
        return radial_embedding_loss(positives, negatives, root, current, self._frozen_text(texts), s.lambda_e, s.lambda_m, s.lambda_p)

    def save(self, out_dir: Path, module) -> None:
        module.save_pretrained(out_dir)
        self.parts.tokenizer.save_pretrained(out_dir)


def _summary(counts: Counter) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


OBJECTIVES = {"fgclip": (FgclipObjective, "fgclip"), "re": (RadialObjective, "radial")}
