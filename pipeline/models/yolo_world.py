"""YOLO-World (ultralytics) with each image's own phrases as its vocabulary.

ultralytics would embed class names with its GitHub-only `clip` package; instead the phrases
are embedded once each by the same CLIP ViT-B/32 text tower loaded through transformers (hub
id or local path), cached, and handed to `WorldModel.predict(x, txt_feats=...)`, which takes
per-image text features. Letterboxing, NMS and the mapping back to pixels are ultralytics' own.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import parse_yaml
from pipeline.core.images import to_rgb
from pipeline.core.scoped import environment, torch_seed
from pipeline.errors import FgdataError, first_line
from pipeline.models.detection import Detection
from pipeline.models.reference import is_random_model

# sha256 digests of ultralytics' official YOLO-World weights (github.com/ultralytics/assets
# releases): the only .pt files loaded without ground.trust_model_file, because loading a .pt
# unpickles it and a pickle can run any code. ultralytics publishes no digests next to these
# assets; the only ones we found are third-party mirrors' git-lfs oids, and copies differ
# (yolov8x-worldv2.pt: 146,353,272 bytes at huggingface.co/Bingsu/yolo-world-mirror, 146,355,704
# elsewhere), so none is verified and none is listed: an empty entry means that file needs the
# opt-in too. Add a digest only after checking it yourself (`sha256sum` of the file downloaded
# from the ultralytics release).
OFFICIAL_WEIGHTS_SHA256: dict[str, tuple[str, ...]] = {
    "yolov8s-worldv2.pt": (),
    "yolov8m-worldv2.pt": (),
    "yolov8l-worldv2.pt": (),
    "yolov8x-worldv2.pt": (),
    "yolov8s-world.pt": (),
    "yolov8m-world.pt": (),
    "yolov8l-world.pt": (),
    "yolov8x-world.pt": (),
}

# ultralytics' parse_model looks each layer's module name up in its own module globals and calls it
# with the layer's args (a function there that unpickles a file would run), and eval()s
# `activation`. A user's architecture may name only these layer classes (those of the bundled
# YOLOv3-v12, RT-DETR and YOLO-World architectures; not TorchVision, which fetches other weights)
# and plain literals.
LAYER_MODULES = frozenset(
    "A2C2f AConv ADown AIFI Bottleneck C2 C2PSA C2f C2fAttn C2fCIB C3 C3Ghost C3k2 CBFuse CBLinear Classify "
    "Concat Conv DWConv Detect ELAN1 GhostConv HGBlock HGStem ImagePoolingAttn OBB Pose PSA RTDETRDecoder RepC3 "
    "RepNCSPELAN4 ResNetLayer SCDown SPP SPPELAN SPPF Segment WorldDetect v10Detect "
    "nn.ConvTranspose2d nn.Identity nn.MaxPool2d nn.Upsample nn.ZeroPad2d".split()
)
ARCHITECTURE_NUMBERS = frozenset({"nc", "depth_multiple", "width_multiple", "kpt_shape", "end2end", "reg_max", "scales", "ch", "channels"})
ACTIVATION = re.compile(r"(torch\.)?nn\.(ReLU|ReLU6|SiLU|GELU|Mish|Hardswish|LeakyReLU|ELU|SELU|CELU|Sigmoid|Tanh)\(\s*([0-9.eE+-]+\s*)?\)")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a name ultralytics may look up, never a call
MAX_ARCHITECTURE_NODES = 100_000  # yaml anchors can make a small file a huge tree
TRUST_HINT = "if you trust this file, pass --trust-model-file (ground.trust_model_file=true)"


def ultralytics_without_installs() -> None:
    """Imports ultralytics with its pip auto-install off; call before any other ultralytics import.

    ultralytics pip-installs a package a model file asks for unless YOLO_AUTOINSTALL was false when
    it was first imported. A data pipeline must not install packages while it runs, nor change the
    environment of the process it runs in, so the variable holds for that import only. An
    ultralytics the caller imported earlier (installs on) is told through the flag its checks read
    at call time."""
    with environment(YOLO_AUTOINSTALL="false"):
        from ultralytics.utils import checks
    checks.AUTOINSTALL = False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_architecture(detector: str) -> Path | None:
    """An architecture file shipped inside ultralytics, named as ultralytics names it:
    `yolov8s-worldv2.yaml` is cfg/models/v8/yolov8-worldv2.yaml at scale s. A path is never one."""
    if Path(detector).name != detector or Path(detector).suffix not in (".yaml", ".yml"):
        return None
    ultralytics_without_installs()
    from ultralytics.utils import ROOT

    models = ROOT / "cfg" / "models"
    for name in (detector, re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", detector)):  # ultralytics' scale rule
        found = sorted(models.rglob(name))
        if found:
            return found[0]
    return None


def _plain(value, allow_identifiers: bool, budget: list[int]) -> bool:
    """Numbers, booleans, None, and lists or mappings of them (identifier strings where allowed)."""
    budget[0] -= 1
    if budget[0] < 0:
        return False
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return allow_identifiers and IDENTIFIER.fullmatch(value) is not None
    if isinstance(value, list):
        return all(_plain(v, allow_identifiers, budget) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v, allow_identifiers, budget) for k, v in value.items())
    return False


def architecture_problem(cfg) -> str | None:
    """Why an architecture mapping is more than the plain data the model builder needs, or None."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("backbone"), list) or not isinstance(cfg.get("head"), list):
        return "it is not a mapping with backbone and head lists"
    budget = [MAX_ARCHITECTURE_NODES]
    for key, value in cfg.items():
        if key in ("backbone", "head"):
            continue
        if key == "activation":
            if not (isinstance(value, str) and ACTIVATION.fullmatch(value.strip())):
                return f"activation {str(value)[:80]!r} is not a plain torch.nn activation"
        elif key == "scale":
            if not (isinstance(value, str) and IDENTIFIER.fullmatch(value)):
                return f"scale {str(value)[:80]!r} is not a scale name"
        elif key not in ARCHITECTURE_NUMBERS:
            return f"unknown field {str(key)[:80]!r}"
        elif not _plain(value, False, budget):
            return f"field {key!r} is not plain numbers"
    for index, layer in enumerate(cfg["backbone"] + cfg["head"]):
        if not (isinstance(layer, list) and len(layer) == 4):
            return f"layer {index} is not [from, repeats, module, args]"
        source, repeats, module, args = layer
        if not (_plain(source, False, budget) and isinstance(repeats, int) and isinstance(args, list)):
            return f"layer {index} has a from, repeats or args that is not plain numbers"
        if module not in LAYER_MODULES:
            return f"layer {index} names module {str(module)[:80]!r}, not a known layer class"
        if not _plain(args, True, budget):
            return f"layer {index} args hold something other than literals and names"
    return None


def vet_detector(detector: str, trust: bool, *, fetch: bool) -> tuple[str, object]:
    """What to build and from what, decided before anything is unpickled or evaluated:
    ("architecture", mapping) for a bundled or plain-data .yaml; ("weights", path) for official
    weights whose sha256 matches; ("trusted", detector) under ground.trust_model_file. Without
    `fetch` (on the driver) a bare official name not yet downloaded passes here and is checked
    after the download, in the actor. Anything else is a one-line FgdataError."""
    import yaml

    bundled = bundled_architecture(detector)
    path = bundled or Path(detector)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FgdataError(f"YOLO-World architecture {detector!r} is neither a file nor one bundled with ultralytics")
        try:
            cfg = parse_yaml(path.read_text(encoding="utf-8"))  # as settings: no aliases that expand
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:  # ValueError: an int of 4,300+ digits
            raise FgdataError(f"cannot read YOLO-World architecture {path}: {first_line(exc)}") from None
        if not bundled and not trust:
            problem = architecture_problem(cfg)
            if problem:
                raise FgdataError(f"refusing to build YOLO-World from {path}: {problem}, and ultralytics runs some architecture fields as code; {TRUST_HINT}")
        if not isinstance(cfg, dict):
            raise FgdataError(f"YOLO-World architecture {path} is not a mapping")
        ultralytics_without_installs()
        from ultralytics.nn.tasks import guess_model_scale

        # as ultralytics' yaml_model_load: the scale letter comes from the name asked for
        return "architecture", {**cfg, "scale": guess_model_scale(detector), "yaml_file": detector}
    if trust:
        return "trusted", detector
    if path.suffix != ".pt":
        raise FgdataError(f"refusing to load YOLO-World detector {detector!r}: only a .yaml architecture or official .pt weights load without the opt-in; {TRUST_HINT}")
    official = {digest for digests in OFFICIAL_WEIGHTS_SHA256.values() for digest in digests}
    if not path.is_file():
        if detector not in OFFICIAL_WEIGHTS_SHA256:
            raise FgdataError(f"YOLO-World weights {detector} do not exist (give a path, or one of {', '.join(OFFICIAL_WEIGHTS_SHA256)})")
        if not OFFICIAL_WEIGHTS_SHA256[detector]:
            raise FgdataError(f"refusing to load {detector}: fgdata has no verified sha256 for it yet, and a .pt file is a pickle that can run code when loaded; {TRUST_HINT}")
        if not fetch:
            return "weights", detector
        ultralytics_without_installs()
        from ultralytics.utils.downloads import attempt_download_asset

        path = Path(attempt_download_asset(detector))  # downloads only; loading comes after the check
    digest = file_sha256(path)
    if digest not in official:
        raise FgdataError(
            f"refusing to load {path}: a .pt file is a pickle that can run code when loaded, and its sha256 {digest[:16]}… "
            f"is not one of ultralytics' official YOLO-World weights known to fgdata; {TRUST_HINT}"
        )
    return "weights", path


class PhraseEmbeddingCache:
    """CLIP text embeddings (L2-normalised, as YOLO-World expects) computed once per phrase."""

    def __init__(self, text_encoder: str, device: str, capacity: int):
        import torch
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(text_encoder, trust_remote_code=False)
            self.model = CLIPTextModelWithProjection.from_pretrained(text_encoder, use_safetensors=True).to(device).eval()
        except (OSError, ValueError) as exc:
            raise FgdataError(f"cannot load CLIP text encoder {text_encoder!r}: {first_line(exc)}") from None
        self._torch, self.device, self.capacity = torch, device, capacity
        self._cache: OrderedDict[str, object] = OrderedDict()
        self.hits = self.misses = 0

    def embed(self, phrases: list[str]):
        missing = list(dict.fromkeys(p for p in phrases if p not in self._cache))
        self.hits += len(phrases) - len(missing)
        self.misses += len(missing)
        if missing:
            torch = self._torch
            tokens = self.tokenizer(missing, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                embeddings = torch.nn.functional.normalize(self.model(**tokens).text_embeds, dim=-1)
            for phrase, embedding in zip(missing, embeddings):
                self._cache[phrase] = embedding
        result = self._torch.stack([self._cache[p] for p in phrases])
        for phrase in phrases:
            self._cache.move_to_end(phrase)
        while len(self._cache) > self.capacity:  # least recently used first
            self._cache.popitem(last=False)
        return result


def letterbox_batch(arrays: list[np.ndarray], size: int) -> np.ndarray:
    """HWC RGB images → one NCHW uint8 batch, resized and padded as ultralytics' own predictor
    does: to the smallest stride-multiple rectangle when all images share a shape, else square."""
    ultralytics_without_installs()
    from ultralytics.data.augment import LetterBox

    same_shape = len({a.shape for a in arrays}) == 1
    letterbox = LetterBox((size, size), auto=same_shape, stride=32)
    return np.stack([letterbox(image=a) for a in arrays]).transpose(0, 3, 1, 2).copy()


def boxes_to_pixels(boxes, letterboxed: tuple[int, int], shape: tuple[int, int]):
    """xyxy boxes in a letterboxed (height, width) frame back to the pixels of an image of `shape`."""
    ultralytics_without_installs()
    from ultralytics.utils import ops

    return ops.scale_boxes(letterboxed, boxes.clone(), shape)


class YoloWorldDetector:
    def __init__(self, detector: str, text_encoder: str, *, image_size: int, cache_size: int, trust_model_file: bool = False):
        import torch

        ultralytics_without_installs()
        from ultralytics import YOLOWorld
        from ultralytics.nn.tasks import WorldModel

        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        kind, source = vet_detector(detector, trust_model_file, fetch=True)
        self.is_random = kind == "architecture" or is_random_model(text_encoder)
        try:
            # built from the mapping checked above, so the file read is the file built; a model
            # built from a .yaml architecture has random weights, drawn from a fixed seed so that a
            # restarted actor or a rerun builds the same one and resumed shards match
            with torch_seed(0):
                net = WorldModel(source, verbose=False) if kind == "architecture" else YOLOWorld(str(source)).model
            # fused conv+batchnorm, as ultralytics' own predictor runs it
            self.net = net.fuse(verbose=False).to(self.device).eval()
        except (FileNotFoundError, OSError, RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise FgdataError(f"cannot load YOLO-World detector {detector!r}: {first_line(exc)}") from None
        self.texts = PhraseEmbeddingCache(text_encoder, self.device, cache_size)
        self.image_size = image_size
        self.name = f"{detector} + {text_encoder}"

    def detect(self, images: list[Image.Image], phrases: list[list[str]], score_threshold: float) -> list[list[Detection]]:
        ultralytics_without_installs()
        from ultralytics.utils import nms

        torch = self._torch
        width = max(len(p) for p in phrases)
        # Each image gets its own phrases as classes; shorter lists are padded with zero
        # features, and any detection of a padding class is dropped below.
        features = torch.zeros(len(images), width, self.net.txt_feats.shape[-1], device=self.device)
        for i, image_phrases in enumerate(phrases):
            if image_phrases:
                features[i, : len(image_phrases)] = self.texts.embed(image_phrases)
        arrays = [np.asarray(to_rgb(image)) for image in images]
        x = torch.from_numpy(letterbox_batch(arrays, self.image_size)).to(self.device).float() / 255
        self.net.model[-1].nc = width
        with torch.inference_mode():
            output = self.net.predict(x, txt_feats=features)
        prediction = output[0] if isinstance(output, (list, tuple)) else output
        per_image = nms.non_max_suppression(prediction, conf_thres=score_threshold, iou_thres=0.7, max_det=300)
        results = []
        for array, image_phrases, found in zip(arrays, phrases, per_image):
            boxes = boxes_to_pixels(found[:, :4], tuple(x.shape[2:]), array.shape[:2])
            results.append(
                [
                    Detection(int(cls), tuple(float(v) for v in box), float(score))
                    for box, score, cls in zip(boxes.tolist(), found[:, 4].tolist(), found[:, 5].tolist())
                    if int(cls) < len(image_phrases)
                ]
            )
        return results
