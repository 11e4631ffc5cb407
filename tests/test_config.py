import pytest

from pipeline.config import load_config
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
