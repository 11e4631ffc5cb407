import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_IMAGES, assert_dataset_invariants, image_bytes, make_config, read_rows
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.schemas import conform
from pipeline.core.shards import read_json, read_rejects
from pipeline.errors import FgdataError
from pipeline.models.generation import Sampling
from pipeline.models.tiny import build_tiny_vlm
from pipeline.models.transformers_vlm import TransformersVLM
from pipeline.runner import run_stage
from pipeline.stages.fggrn.ingest import IngestStage
from pipeline.stages.fggrn.recaption import RecaptionStage

FAKES = Path(__file__).parent / "fakes"


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A random-weight Qwen2.5-VL built from its real config class and saved like a hub model."""
    texts = [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10
    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm", texts)


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory, ray_session) -> Path:
    out = tmp_path_factory.mktemp("ingest") / "images"
    run_stage(IngestStage(SAMPLE_IMAGES), out, make_config("ingest.rows_per_shard=10"))
    return out


def test_transformers_backend_loads_by_path_and_is_deterministic_when_greedy(tiny_vlm):
    model = TransformersVLM(str(tiny_vlm), revision=None, trust_remote_code=False, dtype="auto")
    assert model.info.is_random and model.info.backend == "transformers"
    images = [Image.new("RGB", (200, 120), "red"), Image.new("RGB", (90, 160), "blue")]
    greedy = Sampling(max_new_tokens=12, temperature=0.0, top_p=1.0, seed=0)
    first, again = model.generate(images, "Describe the image.", greedy), model.generate(images, "Describe the image.", greedy)
    assert [g.text for g in first] == [g.text for g in again]
    assert all(g.tokens <= 12 and g.finish_reason in ("stop", "length") for g in first)
    assert any(g.finish_reason == "length" and g.tokens == 12 for g in first)  # random weights rarely stop early


@pytest.mark.usefixtures("ray_session")
def test_recaption_end_to_end_on_a_random_tiny_vlm(tiny_vlm, sample_images, tmp_path):
    out = tmp_path / "captions"
    config = make_config(f"recaption.model={tiny_vlm}", "recaption.max_new_tokens=24", "recaption.batch_size=4")
    summary = run_stage(RecaptionStage(sample_images), out, config)
    assert summary.rows_in == 17 and summary.shards_total == 2
    assert_dataset_invariants(out, expected_keys={p.stem for p in SAMPLE_IMAGES.glob("*.jpg") if not p.stem.startswith("broken")})
    rejects = read_rejects(out).to_pylist()
    assert {r["reason"] for r in rejects} <= {"truncated", "degenerate", "not_english", "too_short", "empty_output"}
    assert all("output:" in r["detail"] for r in rejects)
    for row in read_rows(out):  # whatever survived is labelled as random-model output
        assert row["caption_model_is_random"] and row["caption_model"] == str(tiny_vlm)
        assert row["prompt_name"] == "recaption_long.v1" and row["caption_backend"] == "transformers"
    manifest = read_json(out / "_manifest.json")
    assert manifest["provenance"]["random_weights"] == [True]
    assert manifest["provenance"]["prompt"][0].startswith("recaption_long.v1 sha256:")
    # every image whose first caption failed was retried once with sampling
    assert manifest["counters"]["retried"] >= len(rejects)


@pytest.mark.usefixtures("ray_session")
def test_images_a_vlm_cannot_take_are_rejected_and_retry_can_be_turned_off(tiny_vlm, tmp_path):
    def image_row(key, data):
        return {"key": key, "image": data, "width": 1, "height": 1, "format": "PNG", "short_caption": "x", "source": "test"}

    rows = [
        image_row("fine", image_bytes((64, 48))),
        image_row("banner", image_bytes((2100, 60), "PNG")),
        image_row("corrupt", image_bytes((64, 48))[:200]),
    ]
    source = tmp_path / "images"
    source.mkdir()
    pq.write_table(conform(rows, "images"), source / "part-00000.parquet")
    out = tmp_path / "captions"
    config = make_config(f"recaption.model={tiny_vlm}", "recaption.max_new_tokens=4", "recaption.retry_temperature=0")
    run_stage(RecaptionStage(source), out, config)
    reasons = {r["key"]: r["reason"] for r in read_rejects(out).to_pylist()}
    assert reasons == {"banner": "extreme_aspect_ratio", "corrupt": "decode_error", "fine": "truncated"}
    assert "retried" not in read_json(out / "_manifest.json")["counters"]


def test_bad_recaption_settings_stop_before_any_work(tmp_path, sample_images):
    with pytest.raises(FgdataError, match="recaption.backend must be transformers or vllm"):
        run_stage(RecaptionStage(sample_images), tmp_path / "o", make_config("recaption.backend=onnx"))
    with pytest.raises(FgdataError, match="prompt 'nope.v9' not found"):
        run_stage(RecaptionStage(sample_images), tmp_path / "o", make_config("recaption.prompt=nope.v9"))
    with pytest.raises(FgdataError, match="cannot use model '/no/such/model'"):
        run_stage(RecaptionStage(sample_images), tmp_path / "o", make_config("recaption.model=/no/such/model"))
    assert not (tmp_path / "o").exists()


def test_vllm_adapter_makes_the_expected_calls(tiny_vlm, monkeypatch):
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm  # the FAKE from tests/fakes

    from pipeline.models.vllm_vlm import VllmVLM

    vllm.CALLS.clear()
    model = VllmVLM(str(tiny_vlm), revision=None, trust_remote_code=False, dtype="bfloat16", tensor_parallel_size=2)
    images = [Image.new("RGB", (32, 32)), Image.new("RGB", (40, 30))]
    results = model.generate(images, "Describe the image.", Sampling(max_new_tokens=64, temperature=0.0, top_p=0.9, seed=5))
    (name, llm_kwargs), (_, params), (_, call) = vllm.CALLS
    assert name == "LLM" and llm_kwargs == {
        "model": str(tiny_vlm), "revision": None, "trust_remote_code": False, "dtype": "bfloat16",
        "tensor_parallel_size": 2, "limit_mm_per_prompt": {"image": 1},
    }
    assert params == {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 5}
    assert [p["multi_modal_data"]["image"] for p in call["prompts"]] == images
    assert call["prompts"][0]["prompt"].endswith("Describe the image.<|im_end|>\n<|im_start|>assistant\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in call["prompts"][0]["prompt"]
    assert [(r.text, r.tokens, r.finish_reason) for r in results] == [("fake output 0", 3, "stop"), ("fake output 1", 3, "stop")]
    truncated = model.generate(images[:1], "x", Sampling(max_new_tokens=4, temperature=0.7, top_p=0.9, seed=1))
    assert truncated[0].finish_reason == "length" and vllm.CALLS[-2][1]["top_p"] == 0.9


def test_vllm_backend_without_vllm_installed_is_a_clear_error(tiny_vlm, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    from pipeline.models.vllm_vlm import VllmVLM

    with pytest.raises(FgdataError, match=r"pip install 'fgdata\[gpu\]'"):
        VllmVLM(str(tiny_vlm), revision=None, trust_remote_code=False, dtype="auto", tensor_parallel_size=1)


@pytest.mark.usefixtures("ray_session")
def test_recaption_cli_with_model_flag(tiny_vlm, sample_images, tmp_path):
    result = CliRunner().invoke(
        app, ["recaption", str(sample_images), str(tmp_path / "c"), "--model", str(tiny_vlm), "-s", "recaption.max_new_tokens=8", "-s", "run.progress=false"]
    )
    assert result.exit_code == 0, result.output
    assert "17 rows in" in result.output
    assert json.loads((tmp_path / "c" / "_manifest.json").read_text())["config"]["recaption"]["model"] == str(tiny_vlm)
