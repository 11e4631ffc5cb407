"""`make bench`: stage throughput against the raw library doing the same work in the same run.

- phrases: the `phrases` stage (Parquet in, Ray tasks, phrase rules, validated Parquet out) vs
  raw `nlp.pipe` over the same captions, single-process and with n_process = all cores.
- ingest: the `ingest` stage vs a raw Pillow open + full decode of the same files.
- ground (YOLO-World v2 small, random weights): the `ground` stage vs raw ultralytics
  `YOLOWorld.predict` over the same images with the same phrases as classes, and the phrase-
  embedding cache against embedding every image's phrases anew.
- negatives (tiny random Llama + tiny random DeBERTa NLI, CPU): the stage's LLM backend vs a raw
  batched `generate` over the same prompts, and its NLI scoring vs a raw sequence-classification
  forward over the same pairs.
- recaption (CPU here, tiny random Qwen2.5-VL): the `recaption` stage vs a raw batched
  `generate` loop over the same images; on CPU with a tiny model this measures the stage's
  overhead (Ray, decoding, checks, Parquet), not GPU decoding throughput.

- hierarcaps (a tiny T5 distilled here on synthetic chains + tiny random DeBERTa NLI, CPU): the
  `hierarcaps generate` stage vs raw `model.generate` doing the same beam search and candidate
  sampling over the same captions, and NLI pairs/s of `hierarcaps filter` vs a raw forward.

- train (tiny CLIP from scratch on the synthetic world, CPU): `fgdata train --objective fgclip`
  steps/s with all three losses vs a plain loop over the same batches doing only the global
  image <-> long caption loss: what the regional and hard-negative parts cost on top.

- export (a synthetic world's FgGRN, 256 px images): `fgdata export fgclip` in this process, as the
  command runs it (local, no Ray): images/s, for `fgdata plan --export fgclip`.

- startup (run first, on a fresh Ray): the fixed costs `fgdata plan` adds to per-row times: starting
  local Ray, and the ingest and phrases stages on one row each (worker processes start, spaCy loads).

Results go to bench/results/<name>.json; numbers from one run on this machine, not targets.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image
from ultralytics import YOLOWorld

from pipeline.config import load_config
from pipeline.core.prompts import load_prompt
from pipeline.core.schemas import conform
from pipeline.core.shards import list_shards, read_stats
from pipeline.datasets.fgclip_export import export_fgclip
from pipeline.datasets.synthetic_world import write_world
from pipeline.models.generation import Sampling
from pipeline.models.nli import NliScorer
from pipeline.models.spacy_nlp import load_spacy
from pipeline.models.text_lm import TransformersLM
from pipeline.models.tiny import build_tiny_clip_text, build_tiny_llm, build_tiny_nli, build_tiny_vlm
from pipeline.models.transformers_vlm import TransformersVLM
from pipeline.models.yolo_world import PhraseEmbeddingCache, YoloWorldDetector
from pipeline.recipes.run import STAGE_CLASSES
from pipeline.runner import run_stage
from pipeline.stages.fggrn.ground import GroundStage
from pipeline.stages.fggrn.ingest import IngestStage
from pipeline.stages.fggrn.negatives import NegativesStage, fill_prompt
from pipeline.stages.fggrn.phrases import PhrasesStage
from pipeline.stages.fggrn.recaption import RecaptionStage, prepare_image

sys.path.insert(0, str(Path(__file__).parent))
from records import RESULTS, write_result  # noqa: E402
from synthetic import synthetic_captions, synthetic_chains  # noqa: E402

SAMPLE = Path(__file__).parent.parent / "sample" / "images"


def copy_sample_photos(dest: Path, copies: int) -> Path:
    """`copies` renamed copies of each good sample photo, with its caption sidecar."""
    dest.mkdir()
    for copy in range(copies):
        for photo in SAMPLE.glob("*.jpg"):
            if photo.name.startswith("broken"):
                continue
            stem = f"{photo.stem}-{copy:04d}"
            shutil.copyfile(photo, dest / f"{stem}.jpg")
            for sidecar in (photo.with_suffix(".txt"), photo.with_suffix(".json")):
                if sidecar.exists():
                    shutil.copyfile(sidecar, dest / f"{stem}{sidecar.suffix}")
    return dest


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def raw_nli(nli: NliScorer, pairs: list[tuple[str, str]]) -> None:
    """The NLI baseline: the same transformers forward, in batches of 64, without our wrapper."""
    for i in range(0, len(pairs), 64):
        premises, hypotheses = zip(*pairs[i : i + 64])
        inputs = nli.tokenizer(list(premises), list(hypotheses), padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            nli.model(**inputs).logits.softmax(-1)


def bench_phrases(workdir: Path, count: int, rows_per_shard: int) -> dict:
    config = load_config(None, ["run.progress=false"])
    captions = synthetic_captions(count, seed=1)
    source = workdir / "captions"
    source.mkdir()
    for shard, start in enumerate(range(0, count, rows_per_shard)):
        chunk = captions[start : start + rows_per_shard]
        keys = [f"{start + i:08d}" for i in range(len(chunk))]
        pq.write_table(pa.table({"key": keys, "short_caption": chunk}), source / f"part-{shard:05d}.parquet")
    nlp = load_spacy(config.phrases.spacy_model)
    batch = config.phrases.batch_size
    _, raw_seconds = timed(lambda: sum(1 for _ in nlp.pipe(captions, batch_size=batch)))
    cores = os.cpu_count() or 1
    _, raw_parallel_seconds = timed(lambda: sum(1 for _ in nlp.pipe(captions, batch_size=batch, n_process=cores)))
    summary, stage_seconds = timed(lambda: run_stage(PhrasesStage(source), workdir / "phrases", config))
    assert summary.rows_in == count
    raw, raw_parallel, stage = count / raw_seconds, count / raw_parallel_seconds, count / stage_seconds
    return {
        "captions": count,
        "mean_caption_chars": round(sum(map(len, captions)) / count, 1),  # spaCy's time grows with it
        "shards": summary.shards_total,
        "raw_nlp_pipe_captions_per_s": round(raw, 1),
        f"raw_nlp_pipe_n_process_{cores}_captions_per_s": round(raw_parallel, 1),
        "stage_captions_per_s": round(stage, 1),
        "ratio_vs_raw_nlp_pipe": round(stage / raw, 3),
        f"ratio_vs_raw_nlp_pipe_n_process_{cores}": round(stage / raw_parallel, 3),
        "note": "stage time includes Parquet read/write, phrase rules and schema validation; Ray was already started",
    }


def bench_ingest(workdir: Path, copies: int) -> dict:
    source = copy_sample_photos(workdir / "images", copies)
    files = sorted(source.glob("*.jpg"))

    def raw_decode():
        for path in files:
            with Image.open(path) as image:
                image.load()

    _, raw_seconds = timed(raw_decode)
    config = load_config(None, ["run.progress=false", "ingest.rows_per_shard=250"])
    summary, stage_seconds = timed(lambda: run_stage(IngestStage(source), workdir / "shards", config))
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    return {
        "images": len(files),
        "megabytes": round(megabytes, 1),
        "raw_pillow_decode_images_per_s": round(len(files) / raw_seconds, 1),
        "stage_images_per_s": round(summary.rows_in / stage_seconds, 1),
        "stage_megabytes_per_s": round(megabytes / stage_seconds, 1),
        "ratio_vs_raw_pillow_decode": round(raw_seconds / stage_seconds, 3),
        "note": "stage = list + sidecar captions + header checks + full decode + Parquet write with image bytes",
    }


def bench_recaption(workdir: Path, copies: int, max_new_tokens: int, batch_size: int) -> dict:
    texts = [p.read_text() for p in SAMPLE.glob("*.txt")] * 10
    model_dir = build_tiny_vlm(workdir / "tiny-vlm", texts)
    source = copy_sample_photos(workdir / "photos", copies)
    images_dir = workdir / "images"
    run_stage(IngestStage(source), images_dir, load_config(None, ["run.progress=false", "ingest.rows_per_shard=64"]))
    overrides = [f"recaption.model={model_dir}", f"recaption.max_new_tokens={max_new_tokens}", f"recaption.batch_size={batch_size}"]
    config = load_config(None, ["run.progress=false", "recaption.retry_temperature=0", *overrides])
    rows = [r for shard in list_shards(images_dir) for r in pq.read_table(shard).to_pylist()]
    model = TransformersVLM(str(model_dir), revision=None, trust_remote_code=False, dtype="auto")
    prompt = load_prompt(config.recaption.prompt).text
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=0)

    def raw_loop():
        tokens = 0
        for start in range(0, len(rows), batch_size):
            images = [prepare_image(r["image"], config.recaption) for r in rows[start : start + batch_size]]
            tokens += sum(g.tokens for g in model.generate(images, prompt, sampling))
        return tokens

    raw_tokens, raw_seconds = timed(raw_loop)
    summary, stage_seconds = timed(lambda: run_stage(RecaptionStage(images_dir), workdir / "captions", config))
    stats = read_stats(workdir / "captions").values()
    stage_tokens = sum(s["counters"].get("generated_tokens", 0) for s in stats)
    busy_seconds = sum(s["seconds"] for s in stats)  # one actor: its time spent on shards
    return {
        "images": len(rows),
        "model": "tiny random Qwen2.5-VL (0.2M parameters), CPU, fp32",
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "raw_generate_images_per_s": round(len(rows) / raw_seconds, 2),
        "raw_generate_tokens_per_s": round(raw_tokens / raw_seconds, 1),
        "stage_images_per_s": round(summary.rows_in / stage_seconds, 2),
        "stage_tokens_per_s": round(stage_tokens / stage_seconds, 1),
        "ratio_vs_raw_generate": round(raw_seconds / stage_seconds, 3),
        "stage_actor_busy_images_per_s": round(summary.rows_in / busy_seconds, 2),
        "ratio_vs_raw_generate_actor_busy": round(raw_seconds / busy_seconds, 3),
        "note": "stage wall time includes starting the model actor and loading the model; raw excludes the load. "
        "The actor reserves 1 CPU, so Ray gives its torch 1 thread while the raw loop uses both cores. "
        "No GPU was available to this run: the GPU benchmark of the real 7B architecture is still to do.",
    }


def bench_ground(workdir: Path, copies: int, batch_size: int) -> dict:
    texts = [p.read_text() for p in SAMPLE.glob("*.txt")] * 10
    clip_dir = build_tiny_clip_text(workdir / "clip-text", texts)
    source = copy_sample_photos(workdir / "photos", copies)
    base = ["run.progress=false"]
    run_stage(IngestStage(source), workdir / "images", load_config(None, [*base, "ingest.rows_per_shard=34"]))
    run_stage(PhrasesStage(workdir / "images"), workdir / "phrases", load_config(None, base))
    rows = [r for shard in list_shards(workdir / "phrases") for r in pq.read_table(shard).to_pylist()]
    images = {r["key"]: r["image"] for s in list_shards(workdir / "images") for r in pq.read_table(s).to_pylist()}
    arrays = [np.asarray(Image.open(io.BytesIO(images[r["key"]])).convert("RGB"))[..., ::-1] for r in rows]  # BGR, as cv2 gives
    phrase_lists = [[p["text"] for p in r["phrases"]] for r in rows]
    vocabulary = sorted({p for phrases in phrase_lists for p in phrases})

    # raw ultralytics: one model, the union of phrases as its classes, batched predict
    cache = PhraseEmbeddingCache(str(clip_dir), "cpu", capacity=10_000)
    yolo = YOLOWorld("yolov8s-worldv2.yaml")
    yolo.model.txt_feats = cache.embed(vocabulary).unsqueeze(0)
    yolo.model.model[-1].nc = len(vocabulary)
    yolo.model.names = vocabulary
    yolo.predict(arrays[:batch_size], imgsz=640, conf=0.3, verbose=False)  # warm-up, as the stage's actor warms up on load
    def raw_predict():
        for i in range(0, len(arrays), batch_size):
            yolo.predict(arrays[i : i + batch_size], imgsz=640, conf=0.3, verbose=False)

    _, raw_seconds = timed(raw_predict)

    # the stage's detector code alone, in this process with the same threads as raw predict
    detector = YoloWorldDetector("yolov8s-worldv2.yaml", str(clip_dir), image_size=640, cache_size=10_000)
    pil_images = [Image.fromarray(a[..., ::-1]) for a in arrays]

    def detector_loop():
        for i in range(0, len(pil_images), batch_size):
            detector.detect(pil_images[i : i + batch_size], phrase_lists[i : i + batch_size], 0.3)

    detector_loop()  # warm-up
    _, detector_seconds = timed(detector_loop)

    config = load_config(None, [*base, "ground.detector=yolov8s-worldv2.yaml", f"ground.text_encoder={clip_dir}", f"ground.batch_size={batch_size}"])
    summary, stage_seconds = timed(lambda: run_stage(GroundStage(workdir / "phrases"), workdir / "regions", config))
    busy_seconds = sum(s["seconds"] for s in read_stats(workdir / "regions").values())

    fresh = PhraseEmbeddingCache(str(clip_dir), "cpu", capacity=10_000)
    _, cached_seconds = timed(lambda: [fresh.embed(p) for p in phrase_lists if p])
    uncached = PhraseEmbeddingCache(str(clip_dir), "cpu", capacity=0)  # embeds every phrase again
    _, uncached_seconds = timed(lambda: [uncached.embed(p) for p in phrase_lists if p])
    occurrences = sum(len(p) for p in phrase_lists)
    return {
        "images": len(rows),
        "phrases": occurrences,
        "distinct_phrases": len(vocabulary),
        "model": "yolov8s-worldv2 built from its .yaml (random weights) + tiny random CLIP text tower, CPU",
        "raw_ultralytics_predict_images_per_s": round(len(rows) / raw_seconds, 2),
        "stage_images_per_s": round(len(rows) / stage_seconds, 2),
        "stage_actor_busy_images_per_s": round(len(rows) / busy_seconds, 2),
        "ratio_vs_raw_predict": round(raw_seconds / stage_seconds, 3),
        "ratio_vs_raw_predict_actor_busy": round(raw_seconds / busy_seconds, 3),
        "detector_in_process_images_per_s": round(len(rows) / detector_seconds, 2),
        "ratio_detector_in_process_vs_raw_predict": round(raw_seconds / detector_seconds, 3),
        "text_embedding_seconds_with_cache": round(cached_seconds, 3),
        "text_embedding_seconds_without_cache": round(uncached_seconds, 3),
        "cache_hit_rate": round(fresh.hits / max(fresh.hits + fresh.misses, 1), 3),
        "note": "raw predict shares one class list (the union of phrases); the stage gives each image its own. "
        "Stage wall time includes the actor start and model load; the actor reserves 1 CPU, so Ray gives its torch 1 thread "
        "while raw predict and the in-process detector use both cores. With a tiny text tower the cache saves little time, "
        "with the real CLIP ViT-B/32 the saving grows with the hit rate.",
    }


def bench_negatives(workdir: Path, images: int, batch_size: int, max_new_tokens: int) -> dict:
    texts = [p.read_text() for p in SAMPLE.glob("*.txt")] * 10 + [load_prompt("hard_negatives.v1").text] * 10
    llm_dir, nli_dir = build_tiny_llm(workdir / "llm", texts), build_tiny_nli(workdir / "nli", texts)
    nlp = load_spacy("en_core_web_sm")
    captions = synthetic_captions(images, seed=3)
    rows = []
    for index, (caption, doc) in enumerate(zip(captions, nlp.pipe(captions))):
        regions = [
            {"phrase": c.text, "start": c.start_char, "end": c.end_char, "head": c.root.lemma_, "box": [0.0, 0.0, 1.0, 1.0], "box_norm": [0.0, 0.0, 0.1, 0.1], "score": 0.9}
            for c in doc.noun_chunks
        ]
        rows.append({"key": f"{index:06d}", "short_caption": caption, "long_caption": None, "phrase_source": "short_caption", "width": 10, "height": 10,
                     "regions": regions, "detector": "bench", "detector_is_random": True, "grounding": "{}"})
    (workdir / "regions").mkdir()
    pq.write_table(conform(rows, "regions"), workdir / "regions" / "part-00000.parquet")
    regions = [(row, region) for row in rows for region in row["regions"]]
    prompt = load_prompt("hard_negatives.v1").text
    prompts = [fill_prompt(prompt, 10, row["short_caption"], region["phrase"]) for row, region in regions]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=0)

    llm = TransformersLM(str(llm_dir), revision=None, trust_remote_code=False, dtype="auto")
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    _, raw_generate_seconds = timed(lambda: [llm.generate(b, sampling) for b in batches])

    nli = NliScorer(str(nli_dir))
    pairs = [(row["short_caption"], row["short_caption"].replace(region["phrase"], "a blue " + region["phrase"])) for row, region in regions]

    _, raw_nli_seconds = timed(lambda: raw_nli(nli, pairs))
    _, scorer_seconds = timed(lambda: nli.score(pairs))

    rows_per_batch = max(1, batch_size * len(rows) // max(len(regions), 1))
    config = load_config(None, ["run.progress=false", "negatives.backend=transformers", f"negatives.model={llm_dir}", f"negatives.nli_model={nli_dir}",
                                f"negatives.max_new_tokens={max_new_tokens}", f"negatives.batch_size={rows_per_batch}"])
    summary, stage_seconds = timed(lambda: run_stage(NegativesStage(workdir / "regions"), workdir / "fggrn", config))
    busy_seconds = sum(s["seconds"] for s in read_stats(workdir / "fggrn").values())
    return {
        "images": len(rows),
        "regions": len(regions),
        "model": "tiny random Llama (LlamaForCausalLM) + tiny random DeBERTa-v2 NLI, CPU",
        "max_new_tokens": max_new_tokens,
        "raw_generate_regions_per_s": round(len(regions) / raw_generate_seconds, 2),
        "stage_regions_per_s": round(len(regions) / stage_seconds, 2),
        "stage_actor_busy_regions_per_s": round(len(regions) / busy_seconds, 2),
        "ratio_vs_raw_generate": round(raw_generate_seconds / stage_seconds, 3),
        "ratio_vs_raw_generate_actor_busy": round(raw_generate_seconds / busy_seconds, 3),
        "raw_nli_pairs_per_s": round(len(pairs) / raw_nli_seconds, 1),
        "scorer_nli_pairs_per_s": round(len(pairs) / scorer_seconds, 1),
        "ratio_nli_scorer_vs_raw": round(raw_nli_seconds / scorer_seconds, 3),
        "note": "a random LLM writes no parseable negatives, so the stage's NLI step has little to do here; "
        "the actor's busy time is generation plus parsing and checks. Stage wall time includes actor start and model loads. "
        "sentence-transformers is not a dependency: the raw NLI baseline is the same transformers forward CrossEncoder.predict runs.",
    }


def distilled_tiny_t5(workdir: Path, steps: int) -> list[str]:
    """A tiny T5 distilled for `steps` on 600 synthetic chains, written to workdir/distilled (the
    hierarcaps generator both benches use); returns the distillation texts (its vocabulary)."""
    from pipeline.config import DistillConfig
    from pipeline.models.tiny import build_tiny_t5
    from pipeline.train.distill import distill, distillation_pairs

    chains = synthetic_chains(600, seed=1)
    texts = [text for tiers in chains for pair in distillation_pairs(tiers) for text in pair]
    base = build_tiny_t5(workdir / "t5", texts)
    (workdir / "chains").mkdir()
    rows = [{"key": f"c{i:05d}", "split": "train", "tiers": t, "source": "synthetic"} for i, t in enumerate(chains)]
    pq.write_table(conform(rows, "hierarcaps"), workdir / "chains" / "part-00000.parquet")
    settings = DistillConfig(base_model=str(base), max_steps=steps, learning_rate=3e-3, warmup_steps=20, eval_every=steps, save_every=10_000)
    distill([workdir / "chains"], workdir / "distilled", settings, progress=False)
    return texts


def bench_hierarcaps(workdir: Path, captions_count: int, batch_size: int) -> dict:
    from pipeline.datasets.chains import SEPARATOR, TO_GENERAL, TO_SPECIFIC
    from pipeline.stages.hierarcaps.filter import HierarcapsFilterStage
    from pipeline.stages.hierarcaps.generate import HierarcapsGenerateStage

    texts = distilled_tiny_t5(workdir, steps=400)

    captions = [tiers[-1] for tiers in synthetic_chains(captions_count, seed=7)]
    (workdir / "captions.txt").write_text("\n".join(captions) + "\n")
    config = load_config(None, ["run.progress=false", f"hierarcaps.generator={workdir / 'distilled'}", f"hierarcaps.batch_size={batch_size}",
                                "ingest.rows_per_shard=500", f"hierarcaps.nli_model={build_tiny_nli(workdir / 'nli', texts)}"])
    s = config.hierarcaps
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "distilled")
    model = AutoModelForSeq2SeqLM.from_pretrained(workdir / "distilled").eval()

    def raw_generate():
        # the same work as the stage, straight on transformers: beam search for the tiers, then
        # candidate children of every tier's parent, sampled
        for start in range(0, len(captions), batch_size):
            batch = captions[start : start + batch_size]
            inputs = tokenizer([TO_GENERAL + c for c in batch], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**inputs, num_beams=s.num_beams, max_new_tokens=s.generate_max_new_tokens)
            tiers = [t.split(SEPARATOR) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
            parents = [TO_SPECIFIC + p for t in tiers for p in ["", *t]]
            inputs = tokenizer(parents, return_tensors="pt", padding=True)
            with torch.inference_mode():
                model.generate(**inputs, do_sample=True, temperature=s.candidate_temperature, top_p=s.candidate_top_p,
                               num_return_sequences=s.negative_candidates, max_new_tokens=s.generate_max_new_tokens)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the stage's actor reserves 1 CPU, and Ray gives its torch 1 thread
    _, raw_seconds = timed(raw_generate)
    torch.set_num_threads(threads)
    summary, stage_seconds = timed(lambda: run_stage(HierarcapsGenerateStage(workdir / "captions.txt"), workdir / "generated", config))
    busy_seconds = sum(st["seconds"] for st in read_stats(workdir / "generated").values())

    chains_out = [r["tiers"] for shard in list_shards(workdir / "generated") for r in pq.read_table(shard).to_pylist()]
    pairs = [pair for tiers in chains_out for pair in zip(tiers[1:], tiers[:-1])]
    nli = NliScorer(str(config.hierarcaps.nli_model))

    torch.set_num_threads(1)
    _, raw_nli_seconds = timed(lambda: raw_nli(nli, pairs))
    torch.set_num_threads(threads)
    _, filter_seconds = timed(lambda: run_stage(HierarcapsFilterStage(workdir / "generated"), workdir / "filtered", config))
    filter_busy = sum(st["seconds"] for st in read_stats(workdir / "filtered").values())
    return {
        "captions": len(captions),
        "hierarchies_out": summary.rows_out,
        "model": "tiny T5 (T5ForConditionalGeneration, d_model 64) distilled 400 steps on synthetic chains; tiny random DeBERTa-v2 NLI; CPU",
        "num_beams": s.num_beams,
        "negative_candidates_per_tier": s.negative_candidates,
        "batch_size": batch_size,
        "raw_generate_hierarchies_per_s": round(len(captions) / raw_seconds, 2),
        "stage_hierarchies_per_s": round(summary.rows_in / stage_seconds, 2),
        "stage_actor_busy_hierarchies_per_s": round(summary.rows_in / busy_seconds, 2),
        "ratio_vs_raw_generate": round(raw_seconds / stage_seconds, 3),
        "ratio_vs_raw_generate_actor_busy": round(raw_seconds / busy_seconds, 3),
        "nli_pairs": len(pairs),
        "raw_nli_pairs_per_s": round(len(pairs) / raw_nli_seconds, 1),
        "filter_stage_nli_pairs_per_s": round(len(pairs) / filter_seconds, 1),
        "filter_actor_busy_nli_pairs_per_s": round(len(pairs) / filter_busy, 1),
        "ratio_filter_vs_raw_nli_actor_busy": round(raw_nli_seconds / filter_busy, 3),
        "note": "raw loops run with 1 torch thread, as the stage's actor gets from Ray (1 CPU reserved). Stage wall time "
        "includes starting the actor and loading the model. No GPU was available to this run: the GPU benchmark is still to do.",
    }


def bench_train(workdir: Path, steps: int, batch_size: int) -> dict:
    from pipeline.datasets.synthetic_world import write_world
    from pipeline.models.clip_model import encode_text, image_and_patch_features
    from pipeline.models.tiny import build_tiny_clip
    from pipeline.train.losses import info_nce
    from pipeline.train.objectives import FgclipObjective

    world = write_world(workdir / "world", 800, seed=0)
    rows = [r for shard in list_shards(world["fggrn"]) for r in pq.read_table(shard).to_pylist()]
    clip = build_tiny_clip(workdir / "clip", [r["long_caption"] for r in rows] * 2)
    config = load_config(None, [f"fgclip.model={clip}", f"fgclip.batch_size={batch_size}", "fgclip.num_workers=0", "fgclip.shuffle_buffer=200"])
    objective = FgclipObjective([world["fggrn"]], config.fgclip, None, "cpu")
    batches = objective.batches(0)
    fixed = [next(batches) for _ in range(steps)]  # decoded once: both loops see the same batches
    module = objective.module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def full():
        for batch in fixed:
            loss, _ = objective.loss(batch, module)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    def plain():
        for batch in fixed:
            images, _ = image_and_patch_features(module.clip, batch["pixels"])
            texts = encode_text(module.clip, objective.parts.tokenizer, batch["long"], long=True, device="cpu")
            info_nce(images, texts, module.clip.logit_scale.exp()).backward()
            optimizer.step()
            optimizer.zero_grad()

    plain()  # warm-up
    _, plain_seconds = timed(plain)
    _, full_seconds = timed(full)
    return {
        "model": "tiny random CLIPModel (64 px, 8 px patches, 2+2 layers, 64-d), CPU, fp32",
        "steps": steps,
        "batch_size": batch_size,
        "boxes_per_batch": round(sum(len(b["phrases"]) for b in fixed) / steps, 1),
        "plain_global_loss_samples_per_s": round(steps * batch_size / plain_seconds, 1),
        "fgclip_all_losses_samples_per_s": round(steps * batch_size / full_seconds, 1),
        "ratio_fgclip_vs_plain": round(plain_seconds / full_seconds, 3),
        "note": "the full objective also encodes the short captions, the region phrases and 10 negatives per box "
        "(11x more texts than images here), which a tiny model's text tower makes relatively costly. "
        "No GPU was available: the ViT-B/16 bf16 benchmark with peak memory is still to do.",
    }


def bench_export(workdir: Path, count: int) -> dict:
    paths = write_world(workdir / "world", count, side=256)
    _, seconds = timed(lambda: export_fgclip(paths["fggrn"], workdir / "fgclip", progress=False, allow_missing_long_captions=True))
    return {
        "format": "fgclip",
        "images": count,
        "stage_images_per_s": round(count / seconds, 1),
        "note": "export_fgclip in this process over a synthetic world's FgGRN (256 px JPEGs): reading shards, writing images/ and fgclip.json",
    }


# ingest then phrases on the local executor, each timed, in a fresh Python (argv: source, out)
_LOCAL_STAGES = """
import json, sys, time
from pathlib import Path
from pipeline.config import load_config
from pipeline.runner import run_stage
from pipeline.stages.fggrn.ingest import IngestStage
from pipeline.stages.fggrn.phrases import PhrasesStage
config, source, out = load_config(None, ["run.progress=false", "run.executor=local"]), Path(sys.argv[1]), Path(sys.argv[2])
started = time.perf_counter()
run_stage(IngestStage(source), out / "images", config)
ingest = time.perf_counter() - started
run_stage(PhrasesStage(out / "images"), out / "phrases", config)
print(json.dumps({"ingest": ingest, "phrases": time.perf_counter() - started - ingest}))
"""


def bench_startup(workdir: Path, ray_start_seconds: float, repeats: int = 3) -> dict:
    """One row per core through ingest then phrases on a Ray just started, one shard each: per-row
    time is nil at this size, so each stage's wall time is its fixed cost on a fresh Ray with every
    worker warming up (starting, importing, loading spaCy) as in a real run. Single start-ups vary
    a lot on a busy machine: Ray is restarted `repeats` times and the medians are kept. The same two
    stages on the local executor (what a one-shard stage command without a model runs on), and each
    command's own start: a fresh Python importing what that command imports before its work."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    source = workdir / "few"
    source.mkdir()
    for photo in sorted(SAMPLE.glob("*.jpg"))[:cpus]:
        for path in SAMPLE.glob(f"{photo.stem}.*"):
            shutil.copyfile(path, source / path.name)
    config = load_config(None, ["run.progress=false", "ingest.rows_per_shard=1"])
    starts, ingest, phrases, ingest_local, phrases_local = [ray_start_seconds], [], [], [], []
    # what each command imports: the CLI, the runner and its stage's module (fgdata run: every step's)
    modules = {stage: module for stage, (module, _, _) in STAGE_CLASSES.items() if stage in ("ingest", "recaption", "phrases", "ground", "negatives")}
    modules["export fgclip"] = "pipeline.datasets.fgclip_export"
    commands = {stage: [] for stage in modules}
    for attempt in range(repeats):
        if attempt:
            ray.shutdown()
            starts.append(timed(lambda: ray.init(address="local", include_dashboard=False, logging_level="ERROR"))[1])
        ingest.append(timed(lambda: run_stage(IngestStage(source), workdir / f"images-{attempt}", config))[1])
        phrases.append(timed(lambda: run_stage(PhrasesStage(workdir / f"images-{attempt}"), workdir / f"phrases-{attempt}", config))[1])
        # in a fresh process, as the command runs them: this one has loaded spaCy and the codecs already
        done = subprocess.run([sys.executable, "-c", _LOCAL_STAGES, str(source), str(workdir / f"local-{attempt}")], check=True, capture_output=True, text=True)
        seconds = json.loads(done.stdout.strip().splitlines()[-1])
        ingest_local.append(seconds["ingest"])
        phrases_local.append(seconds["phrases"])
        for stage, module in modules.items():
            commands[stage].append(timed(lambda: subprocess.run([sys.executable, "-c", f"import pipeline.cli, pipeline.runner, {module}"], check=True))[1])
    median = lambda values: round(float(np.median(values)), 3)  # noqa: E731
    samples = {"ray_start": starts, "ingest": ingest, "phrases": phrases, "ingest_local": ingest_local, "phrases_local": phrases_local,
               **{f"command_start {stage}": values for stage, values in commands.items()}}
    return {
        "ray_cpus": cpus,
        "repeats": repeats,
        "ray_start_seconds": median(starts),
        "command_start_seconds": {stage: median(values) for stage, values in commands.items()},
        "stage_fixed_seconds": {"ingest": median(ingest), "phrases": median(phrases)},
        "local_stage_fixed_seconds": {"ingest": median(ingest_local), "phrases": median(phrases_local)},
        "samples": {name: [round(v, 3) for v in values] for name, values in samples.items()},
        "note": "local ray.init(address='local') as the runner calls it; a stage's fixed cost is its wall time "
        "on one one-row shard per core right after that start (worker processes start; phrases loads spaCy in each), "
        "and on the local executor (this process); a command's start is a fresh Python importing pipeline.cli, pipeline.runner "
        "and the command's stage module. Medians.",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=24_000, help="captions for the phrases benchmark (>= 20k)")
    parser.add_argument("--image-copies", type=int, default=60, help="copies of the 17 sample photos for ingest")
    parser.add_argument("--only", choices=["startup", "phrases", "ingest", "ground", "negatives", "recaption", "hierarcaps", "train", "export"], help="run one benchmark")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the records (default bench/results)")
    args = parser.parse_args()
    _, ray_start_seconds = timed(lambda: ray.init(address="local", include_dashboard=False, logging_level="ERROR"))
    with tempfile.TemporaryDirectory(prefix="fgdata-bench-") as tmp:
        workdir = Path(tmp)
        benchmarks = {
            "startup": lambda d: bench_startup(d, ray_start_seconds),  # first: it needs the fresh Ray
            "phrases": lambda d: bench_phrases(d, args.captions, rows_per_shard=2000),
            "ingest": lambda d: bench_ingest(d, args.image_copies),
            "ground": lambda d: bench_ground(d, copies=4, batch_size=8),
            "negatives": lambda d: bench_negatives(d, images=60, batch_size=32, max_new_tokens=48),
            "recaption": lambda d: bench_recaption(d, copies=8, max_new_tokens=64, batch_size=8),
            "hierarcaps": lambda d: bench_hierarcaps(d, captions_count=2000, batch_size=64),
            "train": lambda d: bench_train(d, steps=40, batch_size=32),
            "export": lambda d: bench_export(d, count=1000),
        }
        for name, bench in benchmarks.items():
            if args.only in (None, name):
                (workdir / name).mkdir()
                write_result(name, bench(workdir / name), args.results)


if __name__ == "__main__":
    main()
