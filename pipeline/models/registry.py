"""The one file that names model backends: each loader picks a backend class by its settings name.

Adding a backend is a new file in models/ plus one branch here; stages only call these loaders.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import FgdataError
from pipeline.models.detection import PhraseDetector
from pipeline.models.generation import ImageTextGenerator
from pipeline.models.reference import check_model_reference, gguf_file

DETECTOR_BACKENDS = ("yolo_world", "owlv2")


def check_detector(settings) -> None:
    """Stops a run before it starts when the detector settings cannot work: unknown backend, a missing
    checkpoint, a model file that would run code without the opt-in; the same for the agreement
    detector when one is asked for."""
    if settings.backend not in DETECTOR_BACKENDS:
        raise FgdataError(f"ground.backend must be yolo_world or owlv2, got {settings.backend!r}")
    partner = settings.agreement_detector
    if partner is not None and (partner not in DETECTOR_BACKENDS or partner == settings.backend):
        raise FgdataError(f"ground.agreement_detector must be the other backend than ground.backend={settings.backend} (or null), got {partner!r}")
    for backend in filter(None, (settings.backend, partner)):
        if backend == "yolo_world":
            if "/" in settings.detector and not Path(settings.detector).exists():
                raise FgdataError(f"YOLO-World checkpoint {settings.detector} does not exist")
            from pipeline.models.yolo_world import vet_detector

            vet_detector(settings.detector, settings.trust_model_file, fetch=False)  # before any actor unpickles it
            check_model_reference(settings.text_encoder, revision=None, trust_remote_code=False)
        else:
            check_model_reference(settings.owl_model, revision=None, trust_remote_code=False)


def load_detector(settings, backend: str | None = None) -> PhraseDetector:
    """The detector of `backend` (default: settings.backend) built from the ground settings."""
    backend = backend or settings.backend
    if backend == "yolo_world":
        from pipeline.models.yolo_world import YoloWorldDetector

        return YoloWorldDetector(
            settings.detector, settings.text_encoder, image_size=settings.image_size, cache_size=settings.text_cache_size,
            trust_model_file=settings.trust_model_file,
        )
    if backend == "owlv2":
        from pipeline.models.owl import OwlDetector

        return OwlDetector(settings.owl_model)
    raise FgdataError(f"ground.backend must be yolo_world or owlv2, got {backend!r}")


def load_generator(backend: str, model: str, *, revision: str | None, trust_remote_code: bool, dtype: str, tensor_parallel_size: int) -> ImageTextGenerator:
    if backend == "transformers":
        from pipeline.models.transformers_vlm import TransformersVLM

        return TransformersVLM(model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype)
    if backend == "vllm":
        from pipeline.models.vllm_vlm import VllmVLM

        return VllmVLM(model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, tensor_parallel_size=tensor_parallel_size)
    raise FgdataError(f"unknown generation backend {backend!r}; choose transformers or vllm")


def load_text_generator(backend: str, model: str, *, revision: str | None, trust_remote_code: bool, dtype: str, tensor_parallel_size: int):
    if backend == "transformers":
        from pipeline.models.text_lm import TransformersLM

        return TransformersLM(model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype)
    if backend == "vllm":
        from pipeline.models.text_lm import VllmLM

        check_text_backend(backend, model)

        return VllmLM(model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, tensor_parallel_size=tensor_parallel_size)
    raise FgdataError(f"unknown text generation backend {backend!r}; choose transformers or vllm")


def load_clip_scorer(settings):
    """The CLIP `fgdata quality` scores with (see models/clip_scorer.py)."""
    from pipeline.models.clip_scorer import ClipScorer

    return ClipScorer(settings.model, revision=settings.revision, batch_size=settings.batch_size)


def load_screen_detector(settings):
    """The detector `fgdata screen` runs (NudeNet, see models/nudenet_detector.py)."""
    from pipeline.models.nudenet_detector import NudeNetDetector

    return NudeNetDetector(settings.model)


def check_text_backend(backend: str, model: str) -> None:
    """A GGUF file runs on transformers only: refused in one line before any actor starts."""
    if backend == "vllm" and gguf_file(model):
        raise FgdataError(f"model {model!r} is a GGUF file: run it with backend transformers (the vllm backend takes a hub id or a model directory)")


def note_provenance(generator) -> dict:
    """{"model_note": ...} for a manifest's provenance when the generator's output carries a note
    (a packaged demo model), else {}. Generators without the attribute (test fakes) have none."""
    note = getattr(generator, "note", None)
    return {"model_note": note} if note else {}
