import os

import pytest

from pipeline.config import Config, load_config, numeric_settings, range_of, validate
from pipeline.errors import FgdataError


def test_defaults_then_yaml_then_set_overrides(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("phrases:\n  batch_size: 64\n  spacy_model: en_core_web_trf\ningest:\n  rows_per_shard: 10\n")
    config = load_config(config_file, ["phrases.batch_size=32", "run.num_cpus=1"])
    assert config.phrases.batch_size == 32  # --set beats the file
    assert config.phrases.spacy_model == "en_core_web_trf"  # the file beats the default
    assert config.ingest.rows_per_shard == 10
    assert config.run.num_cpus == 1
    assert config.ingest.min_side == 8  # untouched default


def test_resolved_config_round_trips_through_dict():
    config = load_config(None, ["phrases.abstract_heads=[scene, view]", "phrases.min_latin_fraction=1"])
    assert config.phrases.abstract_heads == ["scene", "view"]
    assert config.phrases.min_latin_fraction == 1.0 and isinstance(config.phrases.min_latin_fraction, float)
    assert config.to_dict()["phrases"]["abstract_heads"] == ["scene", "view"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("phrases.batch_sise=3", "unknown config key 'phrases.batch_sise'"),
        ("phrase.batch_size=3", "unknown config key 'phrase.batch_size'"),
        ("phrases=3", "unknown config key 'phrases'"),
        ("phrases.batch_size=many", "phrases.batch_size must be int, got 'many'"),
        ("phrases.batch_size=true", "phrases.batch_size must be int"),
        ("run.progress=1", "run.progress must be bool"),
        ("run.num_cpus=two", "run.num_cpus must be int or null"),
        ("phrases.abstract_heads=scene", "phrases.abstract_heads must be a list of str"),
        ("phrases.batch_size", "--set expects key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(FgdataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_bad_yaml_files_are_clear_errors(tmp_path):
    with pytest.raises(FgdataError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("phrases: [unclosed\n")
    with pytest.raises(FgdataError, match="not valid YAML"):
        load_config(broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("ingest:\n  rows_per_shard: lots\n")
    with pytest.raises(FgdataError, match=f"{wrong}: ingest.rows_per_shard must be int"):
        load_config(wrong)


def test_settings_hash_follows_the_stage_section_only():
    base = load_config()
    assert base.section_hash("phrases") == load_config(None, ["run.num_cpus=1"]).section_hash("phrases")
    assert base.section_hash("phrases") != load_config(None, ["phrases.batch_size=8"]).section_hash("phrases")


# Settings that once gave a traceback, silently dropped or cut data, or hung (issue 12).
@pytest.mark.parametrize(
    "override, message",
    [
        ("ingest.rows_per_shard=0", "ingest.rows_per_shard=0 is out of range: it must be at least 1"),  # was a traceback
        ("ingest.rows_per_shard=-1", "ingest.rows_per_shard=-1 is out of range"),  # dropped every image
        ("ingest.max_caption_chars=-1", "ingest.max_caption_chars=-1 is out of range"),  # cut a character off each caption
        ("run.num_cpus=0", "run.num_cpus=0 is out of range: it must be at least 1 \\(or null for all cores\\)"),  # hung
        ("run.cpus_per_task=0", "run.cpus_per_task=0.0 is out of range: it must be more than 0"),
        ("run.max_retries=-1", "run.max_retries=-1 is out of range: it must be at least 0"),
        ("run.max_shards_in_flight=-1", "run.max_shards_in_flight=-1 is out of range"),
        ("phrases.batch_size=0", "phrases.batch_size=0 is out of range"),
        ("recaption.batch_size=0", "recaption.batch_size=0 is out of range"),
        ("ground.batch_size=0", "ground.batch_size=0 is out of range"),
        ("negatives.batch_size=0", "negatives.batch_size=0 is out of range"),
        ("hierarcaps.batch_size=0", "hierarcaps.batch_size=0 is out of range"),
        ("distill.batch_size=0", "distill.batch_size=0 is out of range"),
        ("fgclip.batch_size=0", "fgclip.batch_size=0 is out of range"),
        ("radial.batch_size=-8", "radial.batch_size=-8 is out of range"),
        ("ground.score_threshold=1.5", "ground.score_threshold=1.5 is out of range: it must be at least 0 and at most 1"),
        ("recaption.top_p=0", "recaption.top_p=0.0 is out of range: it must be more than 0 and at most 1"),
        ("fgclip.learning_rate=0", "fgclip.learning_rate=0.0 is out of range: it must be more than 0"),
        ("distill.learning_rate=.nan", "distill.learning_rate=nan is out of range"),
        ("radial.learning_rate=.inf", "radial.learning_rate=inf is out of range"),
        ("distill.eval_fraction=1", "distill.eval_fraction=1.0 is out of range: .* \\(1 leaves nothing to train on\\)"),
        ("recaption.seed=-1", "recaption.seed=-1 is out of range: it must be at least 0 and at most 4294967295"),
        ("recaption.max_ngram_repeats=1", "recaption.max_ngram_repeats=1 is out of range: it must be at least 2"),
        ("ground.text_cache_size=-1", "ground.text_cache_size=-1 is out of range"),
        ("negatives.min_valid=11", "negatives.min_valid=11 must be at most negatives.per_region=10"),
        ("fgclip.keep_positions=248", "fgclip.keep_positions=248 must be less than fgclip.long_text_tokens=248"),
        ("ingest.rows_per_shard=-" + "1" * 4000, "ingest.rows_per_shard=-1111.*\\.\\.\\. is out of range"),  # quoted short
    ],
)
def test_out_of_range_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(FgdataError, match=message) as refused:
        load_config(None, [override])
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 300


def test_ranges_are_checked_in_files_too(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("ground:\n  min_box_area: 0.5\n  max_box_area: 0.2\n")
    with pytest.raises(FgdataError, match="ground.min_box_area=0.5 must be at most ground.max_box_area=0.2"):
        load_config(config_file)


def test_every_numeric_setting_has_a_range_and_its_default_is_in_it():
    missing = [f"{section}.{name}" for section, name, _ in numeric_settings(Config()) if range_of(section, name) is None]
    assert missing == [], f"add a range to pipeline.config.RANGES for {missing}"
    validate(Config())  # the defaults themselves pass
    assert load_config(None, ["run.num_cpus=null"]).run.num_cpus is None  # null stays "all cores"


def _mkfifo(path):
    os.mkfifo(path)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("a directory", lambda p: p.mkdir(), "is not a regular file"),
        ("a FIFO", _mkfifo, "is not a regular file"),  # reading it would block forever
        ("binary", lambda p: p.write_bytes(bytes(range(256)) * 4), "is not UTF-8 text"),
        ("latin-1 text", lambda p: p.write_bytes("ingest:\n  rows_per_shard: 5  # café\n".encode("latin-1")), "is not UTF-8 text"),
        ("NUL bytes", lambda p: p.write_bytes(b"ingest:\n  rows_per_shard: 5\x00\n"), "is not valid YAML"),
        ("100,000 nested brackets", lambda p: p.write_text("[" * 100_000), "is not valid YAML"),  # was RecursionError
        ("an int of 5,000 digits", lambda p: p.write_text("ingest:\n  rows_per_shard: " + "1" * 5000), "is not valid YAML"),
        ("2 MiB", lambda p: p.write_text("#" * (2 << 20)), "is over 1 MiB"),
    ],
)
def test_a_config_that_is_no_yaml_text_file_is_a_one_line_error(tmp_path, name, make, message):
    path = tmp_path / "settings.yaml"
    make(path)
    with pytest.raises(FgdataError, match=message) as refused:
        load_config(path)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_the_cli_refuses_a_bad_setting_before_any_work(tmp_path):
    from conftest import SAMPLE_IMAGES
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["ingest", str(SAMPLE_IMAGES), str(tmp_path / "out"), "--set", "ingest.rows_per_shard=-1"])
    assert result.exit_code == 2 and "ingest.rows_per_shard=-1 is out of range" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.usefixtures("ray_session")
def test_a_task_larger_than_every_node_is_refused_instead_of_waiting_forever(tmp_path):
    from conftest import SAMPLE_IMAGES, make_config

    from pipeline.runner import run_stage
    from pipeline.stages.fggrn.ingest import IngestStage

    out = tmp_path / "out"
    with pytest.raises(FgdataError, match="run.cpus_per_task=64 is more than the largest Ray node's 2 CPUs"):
        run_stage(IngestStage(SAMPLE_IMAGES), out, make_config("run.cpus_per_task=64", "run.executor=ray"))
    assert not list(out.glob("**/part-*.parquet"))
