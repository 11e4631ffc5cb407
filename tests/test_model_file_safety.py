"""Model and checkpoint files never run code: a hostile file is refused before it is unpickled or
evaluated, with a one-line error; the marker its payload would write never appears.

Each hostile fixture is first shown to be live (ultralytics, torch or pickle, left to themselves,
do run it and write the marker), so a refusal here is a refusal of real code execution."""

from __future__ import annotations

import json
import pickle
import shutil
import time

import pytest
import torch
import yaml
from conftest import SAMPLE_IMAGES
from typer.testing import CliRunner

from pipeline.errors import FgdataError
from pipeline.models.yolo_world import YoloWorldDetector, architecture_problem, bundled_architecture, vet_detector
from pipeline.train.checkpoints import latest_checkpoint, load_state, save_checkpoint


class WritesMarker:
    """Unpickling this opens (creates) the marker file: a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "MARKER"


def poisoned_pt(path, marker):
    torch.save({"model": WritesMarker(marker), "epoch": 1}, path)
    return path


def assert_live(load, marker):
    """The fixture really runs code when loaded naively; the marker is removed again."""
    try:
        load()
    except Exception:
        pass
    assert marker.exists(), "the hostile fixture did not run its payload; the test would prove nothing"
    marker.unlink()


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- YOLO-World detector files --------------------------------------------------------------------


def test_a_pickle_named_pt_is_refused_before_it_is_unpickled(tmp_path, marker):
    evil = poisoned_pt(tmp_path / "evil.pt", marker)
    assert_live(lambda: torch.load(evil, weights_only=False), marker)
    # an official file name grants nothing: only the content's sha256 does
    official_name = poisoned_pt(tmp_path / "yolov8x-worldv2.pt", marker)
    for path in (evil, official_name):
        with pytest.raises(FgdataError) as refused:
            vet_detector(str(path), False, fetch=True)
        assert "sha256" in one_line(refused.value) and "--trust-model-file" in str(refused.value)
        with pytest.raises(FgdataError, match="--trust-model-file"):
            YoloWorldDetector(str(path), "unused-text-encoder", image_size=64, cache_size=1)
    assert not marker.exists()
    # the opt-in lets the file through vetting (and vetting itself still unpickles nothing)
    assert vet_detector(str(evil), True, fetch=True) == ("trusted", str(evil))
    assert not marker.exists()


def test_an_official_name_without_a_verified_digest_needs_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such file here: ultralytics would download it and unpickle it
    with pytest.raises(FgdataError, match="no verified sha256.*--trust-model-file"):
        vet_detector("yolov8x-worldv2.pt", False, fetch=True)


def test_a_file_whose_digest_is_in_the_table_loads_without_the_opt_in(tmp_path, monkeypatch):
    import hashlib

    from pipeline.models import yolo_world

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"stand-in for official weights")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setitem(yolo_world.OFFICIAL_WEIGHTS_SHA256, "yolov8x-worldv2.pt", (digest,))
    assert vet_detector(str(weights), False, fetch=True) == ("weights", weights)
    weights.write_bytes(b"one byte changed: stand-in for official weightz")
    with pytest.raises(FgdataError, match="sha256"):
        vet_detector(str(weights), False, fetch=True)


def hostile_architectures(tmp_path, marker) -> dict[str, str]:
    """Architecture files that build a real YOLO-World v2 but also carry code."""
    base = yaml.safe_load(bundled_architecture("yolov8s-worldv2.yaml").read_text())
    evil_pt = poisoned_pt(tmp_path / "payload.pt", marker)
    activation = {**base, "activation": f"open({str(marker)!r}, 'w') and __import__('torch').nn.SiLU()"}
    # parse_model calls whatever its module globals hold under the layer's module name
    unpickler = {**base, "backbone": [[-1, 1, "torch_safe_load", [repr(str(evil_pt))]], *base["backbone"]]}
    files = {}
    for name, cfg in {"activation": activation, "module": unpickler}.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(cfg))
    files["python_tag"] = tmp_path / "tag.yaml"
    files["python_tag"].write_text(f"nc: !!python/object/apply:builtins.open [{str(marker)!r}, w]\nbackbone: []\nhead: []\n")
    return files


def test_an_architecture_yaml_carrying_code_is_refused(tmp_path, marker):
    from ultralytics.nn.tasks import WorldModel

    files = hostile_architectures(tmp_path, marker)
    assert_live(lambda: WorldModel(str(files["activation"]), verbose=False), marker)
    assert_live(lambda: WorldModel(str(files["module"]), verbose=False), marker)
    assert_live(lambda: yaml.unsafe_load(files["python_tag"].read_text()), marker)
    for name, path in files.items():
        with pytest.raises(FgdataError) as refused:
            vet_detector(str(path), False, fetch=True)
        message = one_line(refused.value)
        assert ("--trust-model-file" in message) if name != "python_tag" else ("cannot read" in message), message
        with pytest.raises(FgdataError):
            YoloWorldDetector(str(path), "unused-text-encoder", image_size=64, cache_size=1)
    assert not marker.exists()


def test_architecture_check_allows_plain_data_only():
    base = yaml.safe_load(bundled_architecture("yolov8s-worldv2.yaml").read_text())
    assert architecture_problem(base) is None
    assert architecture_problem({**base, "activation": "nn.SiLU()"}) is None
    bad = {
        "unknown string field": {**base, "text_model": "mobileclip:blt"},
        "string in a number field": {**base, "nc": "__import__('os')"},
        "call in args": {**base, "head": [[-1, 1, "Conv", ["print(1)"]]]},
        "non-layer module": {**base, "head": [[-1, 1, "attempt_load_weights", ["x"]]]},
        "not a mapping": ["backbone", "head"],
    }
    for why, cfg in bad.items():
        assert architecture_problem(cfg), why


def test_yaml_anchor_bomb_is_refused_in_bounded_time(tmp_path):
    levels = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"nc: [{', '.join(levels)}]\nbackbone: []\nhead: []\n")  # a 1 kB file, 10^9 numbers when walked
    started = time.perf_counter()
    with pytest.raises(FgdataError, match=r"an alias \(\*name\) repeats the value"):
        vet_detector(str(bomb), False, fetch=True)
    assert time.perf_counter() - started < 5


def test_bundled_and_plain_user_architectures_still_build(tmp_path):
    from pipeline.models.tiny import build_tiny_clip_text

    kind, cfg = vet_detector("yolov8s-worldv2.yaml", False, fetch=True)
    assert kind == "architecture" and cfg["scale"] == "s"
    copy = tmp_path / "yolov8s-worldv2.yaml"  # the user's own file of plain data, checked and built
    shutil.copy(bundled_architecture("yolov8s-worldv2.yaml"), copy)
    clip = build_tiny_clip_text(tmp_path / "clip", [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")])
    detector = YoloWorldDetector(str(copy), str(clip), image_size=64, cache_size=4)
    assert detector.is_random and detector.net.txt_feats.shape[-1] == 512


def test_ground_cli_refuses_before_any_work_and_the_flag_opts_in(tmp_path, marker):
    from pipeline.cli import app

    evil = poisoned_pt(tmp_path / "evil.pt", marker)
    out = tmp_path / "regions"
    runner = CliRunner()
    refused = runner.invoke(app, ["ground", str(tmp_path / "phrases"), str(out), "--detector", str(evil)])
    assert refused.exit_code == 2
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--trust-model-file" in errors[0] and "sha256" in errors[0], refused.output
    trusted = runner.invoke(
        app, ["ground", str(tmp_path / "phrases"), str(out), "--detector", str(evil), "--trust-model-file", "--set", f"ground.text_encoder={tmp_path / 'no-encoder'}"]
    )
    assert trusted.exit_code == 2 and "--trust-model-file" not in trusted.output and "no-encoder" in trusted.output, trusted.output
    assert not marker.exists() and not out.exists()


# --- Hugging Face model folders -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_hf_folders(tmp_path_factory):
    """A tiny NLI model three ways: as saved; with custom code its config points to; with its
    weights only as a pickle (pytorch_model.bin) that writes the marker when unpickled."""
    from safetensors.torch import load_file

    from pipeline.models.tiny import build_tiny_nli

    root = tmp_path_factory.mktemp("hf")
    marker = root / "MARKER"
    texts = [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")]
    good = build_tiny_nli(root / "good", texts)
    remote = shutil.copytree(good, root / "remote")
    (remote / "evil_code.py").write_text(f"open({str(marker)!r}, 'w')\n")
    config = json.loads((remote / "config.json").read_text())
    config["model_type"] = "evil-model"  # no local class: only the custom code could build it
    config["auto_map"] = {key: "evil_code.Evil" for key in ("AutoConfig", "AutoModel", "AutoModelForSequenceClassification", "AutoModelForSeq2SeqLM")}
    (remote / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((remote / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil_code.EvilTokenizer", None]}
    (remote / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    pickled = shutil.copytree(good, root / "pickled")
    weights = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save({**weights, "payload": WritesMarker(marker)}, pickled / "pytorch_model.bin")
    return {"good": good, "remote": remote, "pickled": pickled, "marker": marker}


def hf_loaders():
    from pipeline.models.clip_model import load_clip
    from pipeline.models.nli import NliScorer
    from pipeline.models.reference import check_model_reference
    from pipeline.models.seq2seq import load_seq2seq

    return {
        "check_model_reference": lambda p: check_model_reference(p, revision=None, trust_remote_code=False),
        "NliScorer": NliScorer,
        "load_seq2seq": load_seq2seq,
        "load_clip": load_clip,
    }


def load_without_running_code(load, folder, marker) -> FgdataError | None:
    """Loads through one of our loaders: it may refuse (one line) but never run the folder's code."""
    try:
        load(str(folder))
    except FgdataError as exc:
        one_line(exc)
        return exc
    finally:
        assert not marker.exists(), f"loading {folder.name} ran its code"
    return None


@pytest.mark.parametrize("loader", list(hf_loaders()))
def test_hugging_face_folders_never_run_custom_code_or_pickles(hostile_hf_folders, loader):
    load, marker = hf_loaders()[loader], hostile_hf_folders["marker"]
    # custom code: refused, or (a fixed model class) built without it
    load_without_running_code(load, hostile_hf_folders["remote"], marker)
    if loader != "check_model_reference":  # that one reads config.json only
        assert load_without_running_code(load, hostile_hf_folders["pickled"], marker), "pickled weights were accepted"


def test_the_hostile_hf_folders_are_live(hostile_hf_folders):
    from transformers import AutoConfig

    marker = hostile_hf_folders["marker"]
    assert_live(lambda: torch.load(hostile_hf_folders["pickled"] / "pytorch_model.bin", weights_only=False), marker)
    assert_live(lambda: AutoConfig.from_pretrained(str(hostile_hf_folders["remote"]), trust_remote_code=True), marker)
    from pipeline.models.nli import NliScorer

    assert NliScorer(str(hostile_hf_folders["good"])).model is not None  # the same folder, untouched, loads


def test_phrase_encoder_and_owl_refuse_pickled_weights(hostile_hf_folders, tmp_path):
    from pipeline.models.owl import OwlDetector
    from pipeline.models.yolo_world import PhraseEmbeddingCache

    marker = hostile_hf_folders["marker"]
    for load in (lambda p: PhraseEmbeddingCache(p, "cpu", 4), OwlDetector):
        load_without_running_code(load, hostile_hf_folders["remote"], marker)
        assert load_without_running_code(load, hostile_hf_folders["pickled"], marker), "pickled weights were accepted"


# --- training checkpoints -------------------------------------------------------------------------


def test_a_poisoned_checkpoint_state_is_refused_without_unpickling(tmp_path, marker):
    step = tmp_path / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    poisoned = step / "trainer_state.pt"
    torch.save({"step": 10, "history": [], "rng": WritesMarker(marker)}, poisoned)
    assert_live(lambda: torch.load(poisoned, weights_only=False), marker)
    assert latest_checkpoint(tmp_path) == step
    with pytest.raises(FgdataError) as refused:
        load_state(step)
    assert "cannot resume" in one_line(refused.value) and str(step) in str(refused.value)
    assert not marker.exists()
    pickle_bytes = pickle.dumps(WritesMarker(marker))  # a bare pickle, not torch's zip format
    poisoned.write_bytes(pickle_bytes)
    with pytest.raises(FgdataError, match="cannot resume"):
        load_state(step)
    assert not marker.exists()


def test_trainer_state_round_trips_as_tensors_and_plain_data(tmp_path):
    """What train and distill save (AdamW, LambdaLR, RNG, history) loads back under weights_only=True."""
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    schedule.step()
    history = [{"step": 1, "lr": schedule.get_last_lr()[0], "loss": 0.5, "eval_loss": None}]
    state = {"history": history, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": torch.get_rng_state(), "cuda_rng": None}
    save_checkpoint(tmp_path, 1, lambda d: None, state, keep=2)
    loaded = load_state(latest_checkpoint(tmp_path))
    assert loaded["step"] == 1 and loaded["history"] == history and loaded["cuda_rng"] is None
    assert torch.equal(loaded["rng"], state["rng"])
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 1.0).load_state_dict(loaded["schedule"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_distill_resumes_from_its_own_checkpoint_and_refuses_a_poisoned_one(tmp_path, marker, monkeypatch):
    """A real distill state, saved and read back under weights_only=True; the same run with its
    state file swapped for a pickle stops with one line, before any step."""
    import pyarrow.parquet as pq
    from synthetic import synthetic_chains  # bench/, on the path through conftest

    import pipeline.train.distill as distill_module
    from pipeline.config import DistillConfig
    from pipeline.core.schemas import conform
    from pipeline.models.tiny import build_tiny_t5

    chains = synthetic_chains(40, seed=2)
    data = tmp_path / "chains"
    data.mkdir()
    rows = [{"key": f"chain-{i:05d}", "split": "train", "tiers": tiers, "source": "synthetic"} for i, tiers in enumerate(chains)]
    pq.write_table(conform(rows, "hierarcaps"), data / "part-00000.parquet")
    base = build_tiny_t5(tmp_path / "t5", [text for tiers in chains for pair in distill_module.distillation_pairs(tiers) for text in pair])
    settings = DistillConfig(base_model=str(base), max_steps=6, save_every=2, eval_every=3, batch_size=8, eval_fraction=0.0)

    class Killed(Exception):
        pass

    def save_then_die(*args, **kwargs):
        saved = save_checkpoint(*args, **kwargs)
        raise Killed(saved)

    import pipeline.train.loop as loop_module  # the one loop distill trains in saves the checkpoints

    with monkeypatch.context() as patch:
        patch.setattr(loop_module, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            distill_module.distill([data], tmp_path / "out", settings, progress=False)
    checkpoint = latest_checkpoint(tmp_path / "out")
    assert checkpoint.name == "step-00000002"
    state = load_state(checkpoint)
    assert state["step"] == 2 and state["optimizer"]["state"] and state["rng"].dtype == torch.uint8

    good_state = (checkpoint / "trainer_state.pt").read_bytes()
    torch.save({**state, "rng": WritesMarker(marker)}, checkpoint / "trainer_state.pt")
    with pytest.raises(FgdataError, match="cannot resume") as refused:
        distill_module.distill([data], tmp_path / "out", settings, progress=False)
    one_line(refused.value)
    assert not marker.exists()

    (checkpoint / "trainer_state.pt").write_bytes(good_state)
    report = distill_module.distill([data], tmp_path / "out", settings, progress=False)
    assert report["finished"] and report["steps"] == 6 and [e["step"] for e in report["history"]] == [3, 6]
