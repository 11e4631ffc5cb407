"""`python bench/cpu_1k.py`: the stages at 1k+ rows on CPU, through `fgdata` (Ray) and through the raw
library in the same run, with start-up on both sides, and where fgdata's time goes.

Per stage: phrases (spaCy), ground (YOLO-World v2 s from its yaml, random, 256 px), negatives with the
rules backend, recaption (tiny random Qwen2.5-VL), hierarcaps generate (tiny T5 distilled here) and
filter (tiny random DeBERTa NLI). The fgdata side is `run_stage` on Ray, started once at the top
(`ray_start_s`, reported apart and added to the run's total). The raw side loads its model and
decodes its inputs inside its timing, as a user's script would. Raw model loops run with 1 torch
thread: a model actor reserves 1 CPU, and Ray gives its torch 1 thread. For negatives (rules) no
library does the work alone (the rules are fgdata's): its baseline is the same stage in this
process (`run.executor=local`), which isolates what Ray adds.

Where fgdata's time goes, from Ray's task timeline (absolute timestamps) and the shard stats:
`startup_s` (the stage's start to its first shard running: planning, worker or actor start, model
load, first batch), `actor_init_s` (the model actor's __init__: imports + model load), the shards'
summed `prepare_s` / `model_s` or `process_s` / `write_s` (stats "timings"), and `tail_s` (last shard
done to the manifest and data card written).

Writes bench/results/cpu_1k_<stage>.json and bench/results/cpu_1k.json (the table). Not planner
records: `fgdata plan` reads the per-stage throughput records of run.py and gpu.py.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import RESULTS, write_result  # noqa: E402
from run import SAMPLE, copy_sample_photos, distilled_tiny_t5, raw_nli  # noqa: E402
from synthetic import synthetic_captions, synthetic_chains  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.core.schemas import conform  # noqa: E402
from pipeline.core.shards import list_shards, read_stats  # noqa: E402
from pipeline.models.nli import NliScorer  # noqa: E402
from pipeline.models.spacy_nlp import load_spacy  # noqa: E402
from pipeline.models.tiny import build_tiny_clip_text, build_tiny_nli, build_tiny_vlm  # noqa: E402
from pipeline.models.yolo_world import PhraseEmbeddingCache  # noqa: E402
from pipeline.runner import run_stage  # noqa: E402
from pipeline.stages.fggrn.ground import GroundStage  # noqa: E402
from pipeline.stages.fggrn.ingest import IngestStage  # noqa: E402
from pipeline.stages.fggrn.negatives import NegativesStage  # noqa: E402
from pipeline.stages.fggrn.phrases import PhrasesStage  # noqa: E402
from pipeline.stages.fggrn.recaption import RecaptionStage, prepare_image  # noqa: E402

ROWS_PER_SHARD = 250
BASE = ["run.progress=false", "run.executor=ray", f"ingest.rows_per_shard={ROWS_PER_SHARD}"]


def clock(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def one_thread(fn):
    """`fn` with 1 torch thread, as a model actor that reserves 1 CPU gets from Ray."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return clock(fn)
    finally:
        torch.set_num_threads(threads)


def rows_of(folder: Path) -> list[dict]:
    return [r for shard in list_shards(folder) for r in pq.read_table(shard).to_pylist()]


def fgdata_run(stage, out: Path, overrides: list[str]) -> dict:
    """The stage through `run_stage` on the running Ray, and where its wall time went."""
    config = load_config(None, [*BASE, *overrides])
    begun = time.time()
    summary, wall = clock(lambda: run_stage(stage, out, config))
    ended = time.time()
    stats = list(read_stats(out).values())
    parts: dict[str, float] = {}
    for shard in stats:
        for name, value in (shard.get("timings") or {}).items():  # per-shard timings, where the stage records them
            parts[name] = parts.get(name, 0.0) + value
    events = [e for e in ray.timeline() if e.get("ph") == "X" and begun * 1e6 <= e["ts"] <= ended * 1e6]
    shard_runs = [e for e in events if e.get("cat") == f"task::fgdata-{stage.name}"]
    inits = [e for e in events if e.get("cat") == "task::ModelWorker.__init__"]
    breakdown = {
        "startup_s": round((min(e["ts"] for e in shard_runs) / 1e6 - begun) if shard_runs else float("nan"), 2),
        "actor_init_s": round(sum(e["dur"] for e in inits) / 1e6, 2) if inits else None,
        "shards": len(stats),
        "shard_busy_s": round(sum(s["seconds"] for s in stats), 2),
        **{name: round(value, 2) for name, value in sorted(parts.items())},
        "tail_s": round((ended - max(e["ts"] + e["dur"] for e in shard_runs) / 1e6) if shard_runs else float("nan"), 2),
    }
    return {"rows_in": summary.rows_in, "rows_out": summary.rows_out, "rows_rejected": summary.rows_rejected, "fgdata_s": round(wall, 2), "breakdown": breakdown}


def result(stage: str, rows: int, fgdata: dict, raw_s: float, raw: str, **extra) -> dict:
    return {"stage": stage, "rows": rows, **fgdata, "raw_s": round(raw_s, 2), "raw": raw, "ratio_raw_over_fgdata": round(raw_s / fgdata["fgdata_s"], 3), **extra}


def bench_phrases(work: Path, images: Path) -> dict:
    config = load_config(None, BASE)
    captions = [r["short_caption"] for r in rows_of(images)]

    def raw():
        nlp = load_spacy.__wrapped__(config.phrases.spacy_model)  # a fresh load, not the cached one
        return sum(1 for _ in nlp.pipe(captions, batch_size=config.phrases.batch_size))

    _, raw_s = clock(raw)
    fgdata = fgdata_run(PhrasesStage(images), work / "phrases", [])
    return result("phrases", len(captions), fgdata, raw_s, "spaCy load + nlp.pipe over the same captions, one process")


def bench_ground(work: Path, phrases: Path, images: Path, side: int, batch: int) -> dict:
    texts = [p.read_text() for p in SAMPLE.glob("*.txt")] * 10
    clip_dir = build_tiny_clip_text(work / "clip-text", texts)
    rows = rows_of(phrases)
    phrase_lists = [[p["text"] for p in r["phrases"]] for r in rows]
    image_bytes = {r["key"]: r["image"] for r in rows_of(images)}

    def raw():
        from ultralytics import YOLOWorld

        vocabulary = sorted({p for lst in phrase_lists for p in lst})
        cache = PhraseEmbeddingCache(str(clip_dir), "cpu", capacity=len(vocabulary) + 1)
        yolo = YOLOWorld("yolov8s-worldv2.yaml")
        yolo.model.txt_feats = cache.embed(vocabulary).unsqueeze(0)
        yolo.model.model[-1].nc = len(vocabulary)
        yolo.model.names = vocabulary
        for i in range(0, len(rows), batch):
            arrays = [np.asarray(Image.open(io.BytesIO(image_bytes[r["key"]])).convert("RGB"))[..., ::-1] for r in rows[i : i + batch]]
            yolo.predict(arrays, imgsz=side, conf=0.3, verbose=False)

    _, raw_s = one_thread(raw)
    overrides = ["ground.detector=yolov8s-worldv2.yaml", f"ground.text_encoder={clip_dir}", f"ground.image_size={side}", f"ground.batch_size={batch}"]
    fgdata = fgdata_run(GroundStage(phrases), work / "regions", overrides)
    return result("ground", len(rows), fgdata, raw_s, f"ultralytics YOLOWorld(yaml) + predict, union of phrases as classes, {side} px, batch {batch}, 1 thread, incl. build",
                  model="yolov8s-worldv2 from its yaml (random) + tiny random CLIP text tower")


def synthetic_regions(work: Path, count: int) -> Path:
    """Regions rows from synthetic captions: every noun chunk a region (no detector needed for negatives)."""
    nlp = load_spacy("en_core_web_sm")
    captions = synthetic_captions(count, seed=3)
    rows = []
    for index, (caption, doc) in enumerate(zip(captions, nlp.pipe(captions))):
        regions = [{"phrase": c.text, "start": c.start_char, "end": c.end_char, "head": c.root.lemma_, "box": [0.0, 0.0, 1.0, 1.0],
                    "box_norm": [0.0, 0.0, 0.1, 0.1], "score": 0.9} for c in doc.noun_chunks]
        rows.append({"key": f"{index:06d}", "short_caption": caption, "long_caption": None, "phrase_source": "short_caption", "width": 10,
                     "height": 10, "regions": regions, "detector": "bench", "detector_is_random": True, "grounding": "{}"})
    folder = work / "regions-in"
    folder.mkdir()
    for shard, start in enumerate(range(0, count, ROWS_PER_SHARD)):
        pq.write_table(conform(rows[start : start + ROWS_PER_SHARD], "regions"), folder / f"part-{shard:05d}.parquet")
    return folder


def bench_negatives_rules(work: Path, count: int, nli_dir: Path) -> dict:
    regions = synthetic_regions(work, count)
    overrides = ["negatives.backend=rules", f"negatives.nli_model={nli_dir}"]
    local = load_config(None, [*BASE, *overrides, "run.executor=local"])
    _, local_s = clock(lambda: run_stage(NegativesStage(regions), work / "fggrn-local", local))
    fgdata = fgdata_run(NegativesStage(regions), work / "fggrn", overrides)
    return result("negatives (rules)", count, fgdata, local_s, "the same stage in this process (run.executor=local): spaCy + rules + NLI + embedding check",
                  regions=sum(len(r["regions"]) for r in rows_of(regions)), model="rules + tiny random DeBERTa NLI + all-MiniLM-L6-v2",
                  backend="rules")  # `fgdata plan` prices negatives.backend=rules from this record only


def bench_recaption(work: Path, images: Path, max_new_tokens: int, batch: int) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    texts = [p.read_text() for p in SAMPLE.glob("*.txt")] * 10
    model_dir = build_tiny_vlm(work / "tiny-vlm", texts)
    config = load_config(None, [*BASE, f"recaption.model={model_dir}"])
    prompt = config.recaption.prompt
    from pipeline.core.prompts import load_prompt

    text_prompt = load_prompt(prompt).text
    rows = rows_of(images)

    def raw():
        processor = AutoProcessor.from_pretrained(model_dir)
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text_prompt}]}]
        chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for i in range(0, len(rows), batch):
            chunk = [prepare_image(r["image"], config.recaption) for r in rows[i : i + batch]]
            inputs = processor(text=[chat] * len(chunk), images=chunk, return_tensors="pt", padding=True)
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)

    _, raw_s = one_thread(raw)
    overrides = [f"recaption.model={model_dir}", f"recaption.max_new_tokens={max_new_tokens}", f"recaption.batch_size={batch}", "recaption.retry_temperature=0"]
    fgdata = fgdata_run(RecaptionStage(images), work / "captions", overrides)
    return result("recaption", len(rows), fgdata, raw_s, f"AutoProcessor + AutoModelForImageTextToText load, decode + resize, batched generate ({batch}, {max_new_tokens} new tokens), 1 thread",
                  model="tiny random Qwen2.5-VL")


def bench_hierarcaps(work: Path, count: int, nli_dir: Path, batch: int) -> list[dict]:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from pipeline.datasets.chains import SEPARATOR, TO_GENERAL, TO_SPECIFIC
    from pipeline.stages.hierarcaps.filter import HierarcapsFilterStage
    from pipeline.stages.hierarcaps.generate import HierarcapsGenerateStage

    distilled_tiny_t5(work, steps=300)
    captions = [tiers[-1] for tiers in synthetic_chains(count, seed=7)]
    (work / "captions.txt").write_text("\n".join(captions) + "\n")
    overrides = [f"hierarcaps.generator={work / 'distilled'}", f"hierarcaps.batch_size={batch}", f"hierarcaps.nli_model={nli_dir}"]
    s = load_config(None, [*BASE, *overrides]).hierarcaps

    def raw_generate():
        tokenizer = AutoTokenizer.from_pretrained(work / "distilled")
        model = AutoModelForSeq2SeqLM.from_pretrained(work / "distilled").eval()
        for start in range(0, len(captions), batch):
            inputs = tokenizer([TO_GENERAL + c for c in captions[start : start + batch]], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**inputs, num_beams=s.num_beams, max_new_tokens=s.generate_max_new_tokens)
            tiers = [t.split(SEPARATOR) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
            inputs = tokenizer([TO_SPECIFIC + p for t in tiers for p in ["", *t]], return_tensors="pt", padding=True)
            with torch.inference_mode():
                model.generate(**inputs, do_sample=True, temperature=s.candidate_temperature, top_p=s.candidate_top_p,
                               num_return_sequences=s.negative_candidates, max_new_tokens=s.generate_max_new_tokens)

    _, raw_s = one_thread(raw_generate)
    generated = fgdata_run(HierarcapsGenerateStage(work / "captions.txt"), work / "generated", overrides)
    out = [result("hierarcaps generate", count, generated, raw_s, f"AutoModelForSeq2SeqLM load + the same beam search and candidate sampling, batch {batch}, 1 thread",
                  model="tiny T5 distilled 300 steps on synthetic chains")]
    pairs = [pair for r in rows_of(work / "generated") for pair in zip(r["tiers"][1:], r["tiers"][:-1])]
    _, raw_nli_s = one_thread(lambda: raw_nli(NliScorer(str(nli_dir)), pairs))
    filtered = fgdata_run(HierarcapsFilterStage(work / "generated"), work / "filtered", overrides)
    out.append(result("hierarcaps filter", generated["rows_out"], filtered, raw_nli_s, f"NLI model load + transformers forward over the same {len(pairs)} tier pairs, batches of 64, 1 thread",
                      nli_pairs=len(pairs), model="tiny random DeBERTa-v2 NLI"))
    return out


def markdown(table: list[dict], ray_start_s: float, load: dict) -> str:
    lines = [
        f"# CPU, 1k+ rows: fgdata (Ray) vs the raw library, same run ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python bench/cpu_1k.py`; {os.cpu_count()} cores; load average {load['start']} at the start, {load['end']} at the end "
        "(a shared machine: the figures are noisy). Ray's start "
        f"({ray_start_s:.1f} s) is paid once per run and is not in the stage rows.",
        "",
        "| stage | rows | fgdata s | raw s | raw/fgdata | startup (actor init) | prepare / model or process / write (summed over shards) | tail |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in table:
        b = row["breakdown"]
        work = " / ".join(f"{b[k]:.1f}" for k in ("prepare_s", "model_s", "process_s", "write_s") if k in b) or f"busy {b['shard_busy_s']:.1f}"
        init = f" ({b['actor_init_s']:.1f})" if b.get("actor_init_s") is not None else ""
        lines.append(f"| {row['stage']} | {row['rows']} | {row['fgdata_s']:.1f} | {row['raw_s']:.1f} | {row['ratio_raw_over_fgdata']:.2f} | "
                     f"{b['startup_s']:.1f}{init} | {work} | {b['tail_s']:.1f} |")
    total_f = sum(r["fgdata_s"] for r in table) + ray_start_s
    total_r = sum(r["raw_s"] for r in table)
    lines += ["", f"All stages: fgdata {total_f:.1f} s with Ray's start, raw {total_r:.1f} s: ratio {total_r / total_f:.2f}.", ""]
    lines += [f"- {row['stage']}: raw = {row['raw']}" for row in table]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=59, help="copies of the 17 sample photos (59: 1,003 images)")
    parser.add_argument("--rows", type=int, default=1000, help="captions for hierarcaps and rows for negatives")
    parser.add_argument("--only", nargs="+", choices=["phrases", "ground", "negatives", "recaption", "hierarcaps"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    wanted = set(args.only or ["phrases", "ground", "negatives", "recaption", "hierarcaps"])
    load = {"start": [round(v, 2) for v in os.getloadavg()]}
    _, ray_start_s = clock(lambda: ray.init(address="local", include_dashboard=False, logging_level="ERROR"))
    table = []
    with tempfile.TemporaryDirectory(prefix="fgdata-cpu-1k-") as tmp:
        work = Path(tmp)
        source = copy_sample_photos(work / "photos", args.copies)
        run_stage(IngestStage(source), work / "images", load_config(None, BASE))
        texts = [p.read_text() for p in SAMPLE.glob("*.txt")] * 10 + synthetic_captions(200, seed=2)
        nli_dir = build_tiny_nli(work / "nli", texts)
        started = time.perf_counter()
        if "phrases" in wanted or "ground" in wanted:
            table.append(bench_phrases(work, work / "images"))
        if "ground" in wanted:
            table.append(bench_ground(work, work / "phrases", work / "images", side=256, batch=16))
        if "negatives" in wanted:
            table.append(bench_negatives_rules(work, args.rows, nli_dir))
        if "recaption" in wanted:
            table.append(bench_recaption(work, work / "images", max_new_tokens=32, batch=16))
        if "hierarcaps" in wanted:
            table.extend(bench_hierarcaps(work, args.rows, nli_dir, batch=64))
        seconds = time.perf_counter() - started
    load["end"] = [round(v, 2) for v in os.getloadavg()]
    for row in table:
        name = row["stage"].split(" (")[0].replace(" ", "_")
        write_result(f"cpu_1k_{name}", {**row, "ray_start_s": round(ray_start_s, 2), "load_average": load}, args.results, quiet=True)
    write_result("cpu_1k", {"ray_start_s": round(ray_start_s, 2), "load_average": load, "bench_seconds": round(seconds, 1), "stages": table}, args.results, quiet=True)
    summary = markdown(table, ray_start_s, load)
    (args.results / "README.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
