"""`make bench-gpu`: the real model architectures with random weights on one GPU, each measured through
fgdata's own model class and through the raw library, on the same inputs, in the same run.

- recaption: a Qwen2.5-VL-7B-shaped model (Qwen2_5_VLForConditionalGeneration, the 7B config's sizes)
  through `TransformersVLM` vs the processor + a batched `model.generate`; images/s and generated
  tokens/s, and batch-1 decode tokens/s against the memory-bandwidth bound (decoder weight bytes /
  HBM bandwidth: every new token reads every weight once).
- ground: YOLO-World v2 x (ultralytics' yolov8x-worldv2.yaml, built from the yaml) + a CLIP ViT-B/32-
  shaped text tower through `YoloWorldDetector`, each image with its own phrases, vs ultralytics'
  `YOLOWorld.predict` with the union of phrases as classes. Skipped, saying so, without ultralytics.
- negatives: a Llama-3.1-8B-shaped LlamaForCausalLM through `TransformersLM` vs a raw batched
  `generate` over the same prompts (the hard-negatives prompt filled with synthetic captions), batch-1
  decode against the bandwidth bound; DeBERTa-v3-base-shaped NLI pairs/s through `NliScorer`
  (CrossEncoder's scores, computed with transformers) vs a raw sequence-classification forward.
- hierarcaps: a Flan-T5-base-shaped T5 through `Seq2SeqGenerator` doing the generate stage's two calls
  (beam search caption -> tiers, then sampled children of every tier's parent) vs the same
  `model.generate` calls; the NLI figure above for the filter.

No weights are downloaded: every config is built here in code, tokenizers are trained on the fly
(pipeline/models/tiny.py: their vocabularies are small, the models' embedding tables have the real
sizes), each model is initialised at random in bf16, saved, and loaded back through the fgdata class
as a hub model would be; the raw side uses that same loaded network. Records go to
bench/results/gpu_<gpu>_<stage>.json in the format `fgdata plan` reads (`machine.gpu`,
`weights`, `random_weights`, `architecture`), plus gpu_<gpu>.json with every figure.

`--tiny` runs the same code with tiny sizes on CPU in about a minute (tests/test_bench_harness.py).
The machine may lack Ray, spaCy and ultralytics: nothing here imports them except the ground
benchmark, which is skipped when ultralytics is missing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from records import RESULTS, write_result  # noqa: E402
from synthetic import synthetic_captions, synthetic_chains  # noqa: E402

from pipeline.config import RecaptionConfig  # noqa: E402
from pipeline.core.prompts import fill_template, load_prompt  # noqa: E402
from pipeline.models.generation import Sampling  # noqa: E402
from pipeline.models.reference import RANDOM_WEIGHTS_MARKER  # noqa: E402
from pipeline.reports.plan import RANDOM_REAL_ARCH, TINY_RANDOM, gpu_bandwidth_tbs  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "images"
REGIONS_PER_IMAGE = 40 / 12  # FG-CLIP's FgGRN: 40M box-phrase pairs over 12M images
NLI_PAIRS_PER_CAPTION = 3  # hierarcaps filter: each of 4 tiers entailed by the next

# The published configs' sizes (Qwen/Qwen2.5-VL-7B-Instruct, meta-llama/Llama-3.1-8B-Instruct,
# microsoft/deberta-v3-base, google/flan-t5-base, openai/clip-vit-base-patch32's text tower), and tiny
# ones for --tiny. Only sizes: token ids come from the tokenizers trained here.
SIZES = {
    "vlm": {
        "full": {
            "text_config": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                num_key_value_heads=4, max_position_embeddings=128000, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=False),
            "vision_config": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        },
        "tiny": {"text_config": dict(vocab_size=2048)},  # more ids than the tokenizer has, as the full model
    },
    "llm": {
        "full": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
        "tiny": dict(vocab_size=2048),
    },
    "nli": {
        "full": dict(vocab_size=128100, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
                     share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7, max_relative_positions=-1,
                     position_biased_input=False, type_vocab_size=0),
        "tiny": dict(vocab_size=2048),
    },
    "t5": {
        "full": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128, tie_word_embeddings=False),
        "tiny": dict(vocab_size=2048),
    },
    "clip_text": {
        "full": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, projection_dim=512),
        "tiny": dict(vocab_size=2048),
    },
}

# workload sizes: full ones fit the whole run in about 5 minutes on one H100
WORK = {
    "full": dict(images=32, vlm_batch=16, vlm_new_tokens=128, decode_tokens=64, regions=64, llm_batch=32, llm_new_tokens=128,
                 nli_pairs=2048, captions=256, ground_images=64, ground_batch=16, ground_side=640, detector="yolov8x-worldv2.yaml"),
    "tiny": dict(images=4, vlm_batch=2, vlm_new_tokens=8, decode_tokens=6, regions=6, llm_batch=3, llm_new_tokens=8,
                 nli_pairs=32, captions=3, ground_images=2, ground_batch=2, ground_side=160, detector="yolov8s-worldv2.yaml"),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    started = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - started


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merged(base: dict, update: dict) -> dict:
    """`update` over `base`, nested; values the tiny config derived from its own sizes (per-layer lists,
    head width) are dropped, to be derived anew from the new ones."""
    derived = {"layer_types": "num_hidden_layers", "head_dim": "hidden_size"}
    out = {k: v for k, v in base.items() if derived.get(k) not in update}
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def scale_up(tiny_dir: Path, out_dir: Path, model_class, sizes: dict, dtype=torch.bfloat16) -> Path:
    """`model_class` with the tiny model's config (its token ids) at `sizes`, random in `dtype` (that of
    the published checkpoint: fgdata's class loads what it is given, or casts), saved with the tiny
    one's tokenizer or processor and the random-weights marker, ready for `from_pretrained`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    config = type(config).from_dict(merged(config.to_dict(), sizes))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it will run: a CPU init of 8B weights takes minutes
        model = model_class._from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    del model
    free()
    for path in Path(tiny_dir).iterdir():  # tokenizer / processor files, and the marker
        if path.suffix != ".safetensors" and path.name not in ("config.json", "generation_config.json"):
            (out_dir / path.name).write_bytes(path.read_bytes())
    marker = {"architecture": model_class.__name__, "sizes": sizes, "note": "random weights of the real architecture: output is noise"}
    (out_dir / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(marker, indent=2))
    return out_dir


def parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def decoder_bytes(model) -> int:
    """Weight bytes one decode step reads: all but the vision tower (prefill only) and the input
    embedding table (one row per token is read; the output head, when untied, is read whole)."""
    visual = getattr(model, "visual", None) or getattr(getattr(model, "model", None), "visual", None)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()
    return parameter_bytes(model) - (parameter_bytes(visual) if visual is not None else 0) - (0 if tied else parameter_bytes(embeddings))


def bandwidth_bound(model, device: str) -> dict:
    bandwidth = gpu_bandwidth_tbs(device)
    weights = decoder_bytes(model)
    bound = bandwidth * 1e12 / weights if bandwidth else None
    return {"decoder_weight_gb": round(weights / 1e9, 3), "hbm_tb_per_s": bandwidth, "bound_tokens_per_s_batch_1": bound and round(bound, 1)}


def decode_tokens_per_s(generate, tokens: int) -> float:
    """Decode rate without prefill: (N - 1) tokens in the time N new tokens take over 1 new token."""
    generate(2)  # warm-up
    _, one = timed(lambda: generate(1))
    _, many = timed(lambda: generate(tokens))
    return (tokens - 1) / max(many - one, 1e-9)


def sample_images(count: int) -> list[bytes]:
    photos = sorted(p for p in SAMPLE.glob("*.jpg") if not p.name.startswith("broken"))
    return [photos[i % len(photos)].read_bytes() for i in range(count)]


def vocabulary_texts() -> list[str]:
    return synthetic_captions(300, seed=5) + [t for chain in synthetic_chains(200, seed=5) for t in chain] + [load_prompt("hard_negatives.v1").text] * 5


def random_weights(tiny: bool) -> str:
    return TINY_RANDOM if tiny else RANDOM_REAL_ARCH


def bench_recaption(workdir: Path, size: str, work: dict, device: str) -> tuple[dict, dict]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.models.tiny import build_tiny_vlm
    from pipeline.models.transformers_vlm import TransformersVLM
    from pipeline.stages.fggrn.recaption import prepare_image

    model_dir = scale_up(build_tiny_vlm(workdir / "vlm-tiny", vocabulary_texts()), workdir / "vlm", Qwen2_5_VLForConditionalGeneration, SIZES["vlm"][size])
    vlm, load_seconds = timed(lambda: TransformersVLM(str(model_dir), revision=None, trust_remote_code=False, dtype="bfloat16"))
    settings = RecaptionConfig()
    images = [prepare_image(data, settings) for data in sample_images(work["images"])]  # the stage's own decode + resize
    prompt = load_prompt(settings.prompt).text
    batch, new_tokens = work["vlm_batch"], work["vlm_new_tokens"]
    sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, seed=0)
    processor, model = vlm.processor, vlm.model

    def raw(chunk, tokens=new_tokens):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text] * len(chunk), images=chunk, return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        return out[:, inputs["input_ids"].shape[1] :].numel()

    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    raw(batches[0][:1], 2), vlm.generate(batches[0][:1], prompt, Sampling(2, 0.0, 1.0, 0))  # warm-up both paths
    raw_tokens, raw_seconds = timed(lambda: sum(raw(b) for b in batches))
    ours, ours_seconds = timed(lambda: [g for b in batches for g in vlm.generate(b, prompt, sampling)])
    ours_tokens = sum(g.tokens for g in ours)
    decode = decode_tokens_per_s(lambda n: vlm.generate(images[:1], prompt, Sampling(n, 0.0, 1.0, 0)), work["decode_tokens"])
    bound = bandwidth_bound(model, device)
    parameters = sum(p.numel() for p in model.parameters())
    del vlm, model, processor
    free()
    figures = {
        "images": len(images),
        "architecture": f"Qwen2_5_VLForConditionalGeneration, Qwen2.5-VL-7B config sizes ({parameters / 1e9:.2f}B parameters)" if size == "full"
        else f"Qwen2_5_VLForConditionalGeneration, tiny ({parameters / 1e6:.2f}M parameters)",
        "model": f"Qwen2.5-VL-7B-shaped, random weights, transformers, bf16 ({parameters / 1e9:.2f}B)" if size == "full" else "tiny random Qwen2.5-VL, bf16",
        "dtype": "bfloat16",
        "batch_size": batch,
        "max_new_tokens": new_tokens,
        "max_image_side": settings.max_image_side,
        "load_seconds": round(load_seconds, 2),
        "raw_generate_images_per_s": round(len(images) / raw_seconds, 3),
        "raw_generate_tokens_per_s": round(raw_tokens / raw_seconds, 1),
        "fgdata_images_per_s": round(len(images) / ours_seconds, 3),
        "fgdata_tokens_per_s": round(ours_tokens / ours_seconds, 1),
        "ratio_fgdata_vs_raw": round(raw_seconds / ours_seconds, 3),
        "mean_generated_tokens": round(ours_tokens / len(images), 1),
        "decode_tokens_per_s_batch_1": round(decode, 1),
        **bound,
        "decode_fraction_of_bound": bound["bound_tokens_per_s_batch_1"] and round(decode / bound["bound_tokens_per_s_batch_1"], 3),
    }
    # the planner's fields: the model actor's busy rate, and its wall rate with the model load as start-up
    record = {**figures, "stage_actor_busy_images_per_s": figures["fgdata_images_per_s"],
              "stage_images_per_s": round(len(images) / (load_seconds + ours_seconds), 4)}
    return record, figures


def phrase_lists(count: int, seed: int = 0) -> list[list[str]]:
    """Per-image vocabularies of 2-6 phrases from a shared pool, as grounding sees them."""
    from synthetic import COLOURS, OBJECTS, SIZES as WORD_SIZES

    rng = random.Random(seed)
    pool = [f"{s} {c} {o}" for s in WORD_SIZES for c in COLOURS for o in OBJECTS]
    return [rng.sample(pool, rng.randint(2, 6)) for _ in range(count)]


def bench_ground(workdir: Path, size: str, work: dict, device: str) -> tuple[dict, dict]:
    import numpy as np
    from transformers import CLIPTextModelWithProjection
    from ultralytics import YOLOWorld

    from pipeline.core.images import decode_rgb
    from pipeline.models.tiny import build_tiny_clip_text
    from pipeline.models.yolo_world import PhraseEmbeddingCache, YoloWorldDetector

    clip_dir = scale_up(build_tiny_clip_text(workdir / "clip-tiny", vocabulary_texts()), workdir / "clip", CLIPTextModelWithProjection, SIZES["clip_text"][size], torch.float32)
    images = [decode_rgb(data) for data in sample_images(work["ground_images"])]
    phrases = phrase_lists(len(images))
    side, batch, detector_name = work["ground_side"], work["ground_batch"], work["detector"]
    detector, load_seconds = timed(lambda: YoloWorldDetector(detector_name, str(clip_dir), image_size=side, cache_size=100_000))

    def ours():
        for i in range(0, len(images), batch):
            detector.detect(images[i : i + batch], phrases[i : i + batch], 0.3)

    # raw ultralytics: one class list for all (the union of phrases), embedded by the same text tower
    vocabulary = sorted({p for image_phrases in phrases for p in image_phrases})
    yolo = YOLOWorld(detector_name)
    yolo.model.txt_feats = PhraseEmbeddingCache(str(clip_dir), "cpu", capacity=len(vocabulary)).embed(vocabulary).unsqueeze(0).float()
    yolo.model.model[-1].nc = len(vocabulary)
    yolo.model.names = vocabulary
    arrays = [np.asarray(image)[..., ::-1] for image in images]  # BGR, as cv2 gives ultralytics
    where = 0 if device != "cpu" else "cpu"

    def raw():
        for i in range(0, len(arrays), batch):
            yolo.predict(arrays[i : i + batch], imgsz=side, conf=0.3, verbose=False, device=where)

    raw(), ours()  # warm-up: fusing, cuDNN autotuning
    _, raw_seconds = timed(raw)
    _, ours_seconds = timed(ours)
    del detector, yolo
    free()
    figures = {
        "images": len(images),
        "phrases": sum(map(len, phrases)),
        "distinct_phrases": len(vocabulary),
        "architecture": f"YOLO-World v2 from ultralytics' {detector_name} + CLIPTextModelWithProjection (ViT-B/32 text tower sizes)",
        "model": f"{detector_name} built from its yaml (random weights) + CLIP-B/32-shaped text tower (random), fp32 as fgdata runs it",
        "dtype": "float32",
        "batch_size": batch,
        "image_size": side,
        "load_seconds": round(load_seconds, 2),
        "raw_ultralytics_predict_images_per_s": round(len(images) / raw_seconds, 2),
        "fgdata_images_per_s": round(len(images) / ours_seconds, 2),
        "ratio_fgdata_vs_raw": round(raw_seconds / ours_seconds, 3),
        "note": "raw predict shares one class list (the union); fgdata gives each image its own, embedded through its cache",
    }
    record = {**figures, "stage_actor_busy_images_per_s": figures["fgdata_images_per_s"],
              "stage_images_per_s": round(len(images) / (load_seconds + ours_seconds), 4)}
    return record, figures


def bench_nli(workdir: Path, size: str, work: dict) -> dict:
    """NLI pairs/s through NliScorer vs a raw forward, fp32 as
    NliScorer loads it, and the raw forward in bf16 beside it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DebertaV2ForSequenceClassification

    from pipeline.models.tiny import build_tiny_nli

    model_dir = scale_up(build_tiny_nli(workdir / "nli-tiny", vocabulary_texts()), workdir / "nli", DebertaV2ForSequenceClassification, SIZES["nli"][size], torch.float32)
    captions = synthetic_captions(work["nli_pairs"], seed=9)
    pairs = [(c, c.replace(" a ", " a blue ", 1)) for c in captions]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures: dict = {"nli_pairs": len(pairs), "nli_architecture": "DebertaV2ForSequenceClassification, DeBERTa-v3-base sizes" if size == "full" else "tiny DeBERTa-v2"}
    from pipeline.models.nli import NliScorer

    scorer, load_seconds = timed(lambda: NliScorer(str(model_dir)))
    scorer.score(pairs[:64])  # warm-up
    _, ours_seconds = timed(lambda: scorer.score(pairs))
    figures.update(nli_load_seconds=round(load_seconds, 2), fgdata_nli_pairs_per_s=round(len(pairs) / ours_seconds, 1))
    del scorer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for dtype in (torch.float32, torch.bfloat16):
        model, load_seconds = timed(lambda: AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).to(device).eval())

        def forward():
            for i in range(0, len(pairs), 64):
                premises, hypotheses = zip(*pairs[i : i + 64])
                inputs = tokenizer(list(premises), list(hypotheses), padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
                with torch.inference_mode():
                    model(**inputs).logits.float().softmax(-1).cpu()

        forward()  # warm-up
        _, seconds = timed(forward)
        name = "fp32" if dtype == torch.float32 else "bf16"
        figures[f"raw_nli_{name}_pairs_per_s"] = round(len(pairs) / seconds, 1)
        figures.setdefault("nli_load_seconds", round(load_seconds, 2))
        del model
        free()
    if "fgdata_nli_pairs_per_s" in figures:
        figures["ratio_fgdata_vs_raw_nli_fp32"] = round(figures["fgdata_nli_pairs_per_s"] / figures["raw_nli_fp32_pairs_per_s"], 3)
    return figures


def bench_negatives(workdir: Path, size: str, work: dict, device: str, nli: dict) -> tuple[dict, dict]:
    from transformers import LlamaForCausalLM

    from pipeline.config import NegativesConfig
    from pipeline.models.text_lm import TransformersLM
    from pipeline.models.tiny import build_tiny_llm

    model_dir = scale_up(build_tiny_llm(workdir / "llm-tiny", vocabulary_texts()), workdir / "llm", LlamaForCausalLM, SIZES["llm"][size])
    llm, load_seconds = timed(lambda: TransformersLM(str(model_dir), revision=None, trust_remote_code=False, dtype="bfloat16"))
    settings = NegativesConfig()
    template = load_prompt(settings.prompt).text
    captions = synthetic_captions(work["regions"], seed=3)
    # the stage's prompt, one per region (the phrase: the caption's first three words after "a")
    fill = {"count": str(settings.per_region)}
    prompts = [fill_template(template, {**fill, "caption": c, "phrase": " ".join(c.split()[1:4])}) for c in captions]
    batch, new_tokens = work["llm_batch"], work["llm_new_tokens"]
    sampling = Sampling(max_new_tokens=new_tokens, temperature=settings.temperature, top_p=settings.top_p, seed=0)
    tokenizer, model = llm.tokenizer, llm.model

    def raw(chunk, tokens=new_tokens):
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in chunk]
        inputs = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=tokens, do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                                 pad_token_id=tokenizer.pad_token_id)
        return out[:, inputs["input_ids"].shape[1] :].numel()

    batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    raw(batches[0][:1], 2), llm.generate(batches[0][:1], Sampling(2, 0.0, 1.0, 0))  # warm-up
    raw_tokens, raw_seconds = timed(lambda: sum(raw(b) for b in batches))
    ours, ours_seconds = timed(lambda: [g for b in batches for g in llm.generate(b, sampling)])
    decode = decode_tokens_per_s(lambda n: llm.generate(prompts[:1], Sampling(n, 0.0, 1.0, 0)), work["decode_tokens"])
    bound = bandwidth_bound(model, device)
    parameters = sum(p.numel() for p in model.parameters())
    del llm, model, tokenizer
    free()
    regions = len(prompts)
    llm_rate = regions / ours_seconds
    nli_rate = nli.get("fgdata_nli_pairs_per_s") or nli["raw_nli_fp32_pairs_per_s"]
    # one region: one LLM answer, then NLI over its per_region candidates, on the same actor
    busy = 1 / (1 / llm_rate + settings.per_region / nli_rate)
    figures = {
        "regions": regions,
        "architecture": f"LlamaForCausalLM, Llama-3.1-8B config sizes ({parameters / 1e9:.2f}B parameters)" if size == "full"
        else f"LlamaForCausalLM, tiny ({parameters / 1e6:.2f}M parameters)",
        "model": f"Llama-3.1-8B-shaped, random weights, transformers, bf16 + DeBERTa-v3-base-shaped NLI ({parameters / 1e9:.2f}B)" if size == "full"
        else "tiny random Llama + tiny random DeBERTa NLI",
        "dtype": "bfloat16",
        "batch_size": batch,
        "max_new_tokens": new_tokens,
        "load_seconds": round(load_seconds, 2),
        "raw_generate_regions_per_s": round(regions / raw_seconds, 3),
        "raw_generate_tokens_per_s": round(raw_tokens / raw_seconds, 1),
        "fgdata_regions_per_s": round(llm_rate, 3),
        "fgdata_tokens_per_s": round(sum(g.tokens for g in ours) / ours_seconds, 1),
        "ratio_fgdata_vs_raw": round(raw_seconds / ours_seconds, 3),
        "decode_tokens_per_s_batch_1": round(decode, 1),
        **bound,
        "decode_fraction_of_bound": bound["bound_tokens_per_s_batch_1"] and round(decode / bound["bound_tokens_per_s_batch_1"], 3),
        "nli_pairs_per_region": settings.per_region,
    }
    load = load_seconds + nli.get("nli_load_seconds", 0.0)
    record = {
        **figures,
        "images": round(regions / REGIONS_PER_IMAGE, 3),
        "regions_per_image_assumed": round(REGIONS_PER_IMAGE, 3),
        "stage_actor_busy_regions_per_s": round(busy, 4),
        "stage_regions_per_s": round(regions / (load + regions / busy), 4),
        "note": f"regions/s of one actor = 1 / (1 / LLM regions/s + {settings.per_region} NLI pairs / NLI pairs/s); random weights never "
        f"stop early, so every answer is max_new_tokens ({new_tokens}) long; images = regions / {REGIONS_PER_IMAGE:.2f} (FG-CLIP's 40M pairs / 12M images)",
    }
    return record, figures


def bench_hierarcaps(workdir: Path, size: str, work: dict, nli: dict) -> tuple[dict, dict]:
    from transformers import T5ForConditionalGeneration

    from pipeline.config import HierarcapsConfig
    from pipeline.datasets.chains import SEPARATOR, TO_GENERAL, TO_SPECIFIC
    from pipeline.models.seq2seq import Seq2SeqGenerator
    from pipeline.models.tiny import build_tiny_t5

    model_dir = scale_up(build_tiny_t5(workdir / "t5-tiny", vocabulary_texts()), workdir / "t5", T5ForConditionalGeneration, SIZES["t5"][size], torch.float32)
    generator, load_seconds = timed(lambda: Seq2SeqGenerator(str(model_dir)))
    s = HierarcapsConfig()
    captions = [chain[-1] for chain in synthetic_chains(work["captions"], seed=7)]
    tokenizer, model = generator.tokenizer, generator.model

    def ours(batch):
        # the generate stage's two calls: tiers by beam search, then sampled children of each tier's parent
        answers = generator.generate([TO_GENERAL + c for c in batch], max_new_tokens=s.generate_max_new_tokens, num_beams=s.num_beams)
        tiers = [(a[0].split(SEPARATOR) + ["x"] * 3)[:3] for a in answers]  # random weights: pad to the 3 generated tiers
        parents = [TO_SPECIFIC + p for t in tiers for p in ["", *t]]
        generator.generate(parents, max_new_tokens=s.generate_max_new_tokens, num_return_sequences=s.negative_candidates,
                           temperature=s.candidate_temperature, top_p=s.candidate_top_p)

    def raw(batch):
        inputs = tokenizer([TO_GENERAL + c for c in batch], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            out = model.generate(**inputs, num_beams=s.num_beams, max_new_tokens=s.generate_max_new_tokens)
        tiers = [(t.split(SEPARATOR) + ["x"] * 3)[:3] for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
        inputs = tokenizer([TO_SPECIFIC + p for t in tiers for p in ["", *t]], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            model.generate(**inputs, do_sample=True, temperature=s.candidate_temperature, top_p=s.candidate_top_p,
                           num_return_sequences=s.negative_candidates, max_new_tokens=s.generate_max_new_tokens)

    batch = min(s.batch_size, len(captions))
    batches = [captions[i : i + batch] for i in range(0, len(captions), batch)]
    ours(captions[:1]), raw(captions[:1])  # warm-up
    _, raw_seconds = timed(lambda: [raw(b) for b in batches])
    _, ours_seconds = timed(lambda: [ours(b) for b in batches])
    parameters = sum(p.numel() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # Seq2SeqGenerator's choice: bf16 on a GPU
    del generator, model, tokenizer
    free()
    count = len(captions)
    nli_rate = nli.get("fgdata_nli_pairs_per_s") or nli["raw_nli_fp32_pairs_per_s"]
    pairs = count * NLI_PAIRS_PER_CAPTION
    figures = {
        "captions": count,
        "architecture": f"T5ForConditionalGeneration, Flan-T5-base config sizes ({parameters / 1e6:.0f}M parameters)" if size == "full"
        else "T5ForConditionalGeneration, tiny",
        "model": f"Flan-T5-base-shaped T5, random weights, {dtype} + DeBERTa-v3-base-shaped NLI" if size == "full" else "tiny random T5 + tiny random DeBERTa NLI",
        "dtype": dtype,
        "batch_size": batch,
        "num_beams": s.num_beams,
        "negative_candidates_per_tier": s.negative_candidates,
        "max_new_tokens": s.generate_max_new_tokens,
        "load_seconds": round(load_seconds, 2),
        "raw_generate_hierarchies_per_s": round(count / raw_seconds, 2),
        "fgdata_hierarchies_per_s": round(count / ours_seconds, 2),
        "ratio_fgdata_vs_raw": round(raw_seconds / ours_seconds, 3),
    }
    record = {
        **figures,
        "stage_actor_busy_hierarchies_per_s": figures["fgdata_hierarchies_per_s"],
        "stage_hierarchies_per_s": round(count / (load_seconds + ours_seconds), 4),
        "nli_pairs": pairs,
        "filter_actor_busy_nli_pairs_per_s": nli_rate,
        "filter_stage_nli_pairs_per_s": round(pairs / (nli.get("nli_load_seconds", 0.0) + pairs / nli_rate), 4),
        "note": f"random weights generate to max_new_tokens every time; the filter's figure is NLI over {NLI_PAIRS_PER_CAPTION} tier pairs per caption",
    }
    return record, figures


def slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the GPU's short name for record file names."""
    known = re.search(r"\b([a-z]\d{2,3}[a-z]*)\b", device.lower())
    return known.group(1) if known else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on whatever device there is: proves the harness, measures nothing")
    parser.add_argument("--only", nargs="+", choices=["recaption", "ground", "negatives", "hierarcaps"], help="run only these")
    parser.add_argument("--results", type=Path, help="folder for the records (default bench/results; with --tiny, a new temporary folder)")
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else "full"
    if not args.tiny and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here; run it on a GPU machine, or with --tiny to check the harness on CPU", file=sys.stderr)
        return 2
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the device run's output is read from its last lines
    results = args.results or (Path(tempfile.mkdtemp(prefix="fgdata-gpu-tiny-")) if args.tiny else RESULTS)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    work, name = WORK[size], slug(device)
    wanted = set(args.only or ["recaption", "ground", "negatives", "hierarcaps"])
    # machine.gpu (records.py) says where it ran; the planner reads that
    common = {"harness": "bench/gpu.py" + (" --tiny" if args.tiny else ""), "random_weights": True, "weights": random_weights(args.tiny)}
    summary: dict = {"device": device, "size": size, "benchmarks": {}, "skipped": {}, "failed": {}}
    written = []
    with tempfile.TemporaryDirectory(prefix="fgdata-gpu-") as tmp:
        workdir = Path(tmp)

        def attempt(stage: str, fn):
            if stage not in wanted:
                return None
            started = time.perf_counter()
            try:
                (workdir / stage).mkdir()
                record, figures = fn(workdir / stage)
            except Exception as exc:  # noqa: BLE001 - one failing model must not lose the others' figures
                summary["failed"][stage] = f"{type(exc).__name__}: {exc}"[:500]
                traceback.print_exc()
                return None
            finally:
                shutil.rmtree(workdir / stage, ignore_errors=True)  # 16 GB of saved weights per model: free the disk for the next
            summary["benchmarks"][stage] = {**figures, "benchmark_seconds": round(time.perf_counter() - started, 1)}
            written.append(write_result(stage, {**common, **record}, results, file_name=f"gpu_{name}_{stage}", quiet=True))
            print(f"{stage}: {json.dumps(figures)}", flush=True)
            return record

        attempt("recaption", lambda d: bench_recaption(d, size, work, device))
        if "ground" in wanted and not importlib.util.find_spec("ultralytics"):
            summary["skipped"]["ground"] = "ultralytics is not installed here: YOLO-World not measured (pip install ultralytics)"
            print("ground: skipped, ultralytics is not installed here", flush=True)
        else:
            attempt("ground", lambda d: bench_ground(d, size, work, device))
        nli: dict = {}
        if wanted & {"negatives", "hierarcaps"}:
            (workdir / "nli-bench").mkdir()
            try:
                nli = bench_nli(workdir / "nli-bench", size, work)
                summary["benchmarks"]["nli"] = nli
                print(f"nli: {json.dumps(nli)}", flush=True)
            except Exception as exc:  # noqa: BLE001
                summary["failed"]["nli"] = f"{type(exc).__name__}: {exc}"[:500]
                traceback.print_exc()
            shutil.rmtree(workdir / "nli-bench", ignore_errors=True)
        if nli:
            attempt("negatives", lambda d: bench_negatives(d, size, work, device, nli))
            attempt("hierarcaps", lambda d: bench_hierarcaps(d, size, work, nli))
    summary["records"] = [str(p) for p in written]
    write_result("gpu-harness", {**common, **summary}, results, file_name=f"gpu_{name}", quiet=True)
    print(f"records in {results}: {', '.join(p.name for p in written)}")
    for stage, why in {**summary["skipped"], **summary["failed"]}.items():
        print(f"not measured: {stage}: {why}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
