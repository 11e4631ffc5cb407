"""The `fgdata` command line."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from pipeline.config import Config, FgclipTrainConfig, load_config
from pipeline.core.sources import FORMATS
from pipeline.core.storage import command_endpoints, s3_endpoint_problem
from pipeline.core.terminal import PrintableFormatter, printable, printable_lines
from pipeline.errors import FgdataError, StageFailed

class _Commands(typer.core.TyperGroup):
    """Runs every command inside `_user_errors`, its arguments' handling included: a stage checks
    its input's location when it is built, before the command's own `with _user_errors()`."""

    def invoke(self, ctx):
        with command_endpoints(), _user_errors():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Commands,
    help=(
        "Build FgGRN and HierarCaps training data as Parquet shards, stage by stage.\n\n"
        "Every stage reads a dataset directory and writes one; rerunning a stage resumes it. "
        "Settings come from defaults < --config FILE.yaml < --set section.key=value "
        "(see `fgdata config` for every key). Stages run on Ray: locally by default, on a "
        "cluster when RAY_ADDRESS is set; a tiny run, or any with --executor local, runs in this process."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

export_app = typer.Typer(help="Write a dataset in another project's layout.", no_args_is_help=True)
app.add_typer(export_app, name="export")
hierarcaps_app = typer.Typer(
    help=(
        "HierarCaps: 4-tier caption hierarchies, generic to specific, each tier entailed by the next.\n\n"
        "The builder, step by step: seed (an LLM, few-shot) -> filter (NLI) -> augment (the LLM, with "
        "validated chains as examples) -> filter -> distill (Flan-T5, both directions) -> generate (over "
        "many captions, with candidate negatives) -> filter -> negatives (NLI) -> export. `make hierarcaps` "
        "runs them all on the sample."
    ),
    no_args_is_help=True,
)
app.add_typer(hierarcaps_app, name="hierarcaps")
import_app = typer.Typer(help="Start mid-pipeline: read released data (FG-CLIP JSON, GRIT, Hugging Face) into fgdata shards.", no_args_is_help=True)
app.add_typer(import_app, name="import")
audit_app = typer.Typer(
    help="The hand check of hard negatives, repeatable: sample them into a page to judge with the keyboard, then score the verdicts.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")

log = logging.getLogger("fgdata")



def _local_path(value: str) -> Path:
    """An argument that must be on this machine's disk, as its path (`file:///abs` as /abs); a store
    URI is refused (typer's own Path would turn s3://b/x into the local folder s3:/b/x)."""
    from pipeline.core.storage import is_uri, location

    if is_uri(value):
        raise FgdataError(f"{value}: a path on this machine is needed here, not a store URI (copy the result to the store afterwards)")
    return location(value)


ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", parser=_local_path, help="YAML file with settings, by section (see `fgdata config`).")
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one setting, e.g. --set phrases.batch_size=128. Repeatable."),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Delete OUT first instead of resuming the run already there.")
]
ExecutorOption = Annotated[
    Optional[str],
    typer.Option(
        "--executor",
        help=(
            "Where the shards run: ray (a local Ray, or the cluster in RAY_ADDRESS), local (this process, "
            "one shard after another, no Ray: for debugging) or auto (the default: local for a tiny run, "
            "i.e. one shard to do, a stage without a model, no RAY_ADDRESS; ray otherwise). "
            "Same as --set run.executor=..."
        ),
    ),
]


@contextmanager
def _user_errors():
    """User mistakes end with a message and exit code 2; failed shards with exit code 1."""
    try:
        yield
    except StageFailed as exc:
        typer.secho(f"error: {printable_lines(exc)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    except FgdataError as exc:  # messages quote paths, keys and values from data: escaped for the terminal
        # a wrong S3 endpoint shows as "does not exist" or "is a file": named as the cause instead
        typer.secho(f"error: {s3_endpoint_problem() or printable_lines(exc)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    except typer.Exit:
        raise
    except Exception:
        # a store client's own error (a refused connection): one line when a wrong S3 endpoint is
        # the cause; anything else is a bug and keeps its traceback
        problem = s3_endpoint_problem()
        if problem is None:
            raise
        typer.secho(f"error: {problem}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


def _log_to_stderr() -> None:
    """Log lines as `fgdata: ...` on stderr, data in them escaped (a failed shard's error quotes keys).
    fgdata's own lines from INFO up; a library's (gcsfs, transformers, ...) from WARNING up and
    without its traceback, which would bury the command's one-line error under a client's retries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("fgdata: %(message)s"))
    handler.addFilter(_without_library_tracebacks)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for own in _OWN_LOGGERS:
        logging.getLogger(own).setLevel(logging.INFO)


_OWN_LOGGERS = ("fgdata", "pipeline")


def _without_library_tracebacks(record: logging.LogRecord) -> bool:
    if record.name.partition(".")[0] not in _OWN_LOGGERS:
        record.exc_info = record.exc_text = record.stack_info = None
    return True


def _setup(config_file: Path | None, overrides: list[str] | None) -> Config:
    _log_to_stderr()
    return load_config(config_file, overrides)


def _run_stage(stage, out: str | Path, config_file: Path | None, overrides: list[str] | None, overwrite: bool, executor: str | None = None) -> None:
    """Resolves the settings, runs `stage` into `out` and prints what it wrote."""
    from pipeline.runner import run_stage

    if executor:  # the flag is the last word, after --config and --set
        overrides = [*(overrides or []), f"run.executor={executor}"]
    with _user_errors():
        settings = _setup(config_file, overrides)
        _report_run(run_stage(stage, out, settings, overwrite=overwrite))


def _check_out_file(out: Path | str, overwrite: bool) -> None:
    """A results file named by --out, checked before any work: never a folder, never replaced unless
    asked. On a store (a URI) it is one object, uploaded whole: only the replacing is checked."""
    from pipeline.core.storage import is_bucket, is_uri, location

    out = location(out)  # a URI checked and spelled one way; file:///abs as /abs
    if is_uri(out):
        if is_bucket(out):
            raise FgdataError(f"--out {str(out).rstrip('/')} is a whole bucket; give a file name in it")
        if out.exists() and not overwrite:
            raise FgdataError(f"--out {out} already exists; choose another name, or add --overwrite to replace it")
        return
    if out.is_dir():
        raise FgdataError(f"--out {out} is a folder; give a file name")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking:
        raise FgdataError(f"--out {out} is under {blocking}, which is a file; give a path in a folder")
    if out.exists() and not overwrite:
        raise FgdataError(f"--out {out} already exists; choose another file name, or add --overwrite to replace it")


def _report_run(summary) -> None:
    resumed = f", {summary.shards_skipped} already finished" if summary.shards_skipped else ""
    typer.echo(
        f"wrote {summary.out_dir}: {summary.shards_total} shard(s) ({summary.shards_run} run{resumed}), "
        f"{summary.rows_in} rows in, {summary.rows_out} out, {summary.rows_rejected} rejected "
        f"(see _rejects/), {summary.seconds:.1f}s"
    )


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="Folder of images with .txt/.json captions, img2dataset output, or a .csv/.parquet table; a path or an s3://, gs://, hf:// URI.")],
    out: Annotated[str, typer.Argument(help="Output directory for image shards (a path or an s3://, gs://, hf:// URI).")],
    source_format: Annotated[
        str, typer.Option("--format", help=f"Layout of SOURCE: {', '.join(FORMATS)}.")
    ] = "auto",
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Read images and their alt-text into image shards (key, bytes, size, format, short_caption).

    Corrupt, truncated, empty, oversized and non-image files go to OUT/_rejects/ with a reason.
    Shard size: --set ingest.rows_per_shard=N.
    """
    from pipeline.stages.fggrn.ingest import IngestStage

    _run_stage(IngestStage(source, source_format), out, config, set_, overwrite, executor)


@app.command()
def download(
    urls: Annotated[str, typer.Argument(metavar="URLS", help="URL list: .parquet/.csv/.tsv with url + caption (GRIT, COYO, CC), or FineHARD/FG-CLIP .json/.jsonl with url + f_path; a path or an s3://, gs://, hf:// URI.")],
    out: Annotated[str, typer.Argument(help="Output directory for image shards, a path or an s3://, gs://, hf:// URI (downloads are staged in OUT/_download).")],
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Download the images of a URL list straight into image shards.

    Keys: the key, f_path or id field, else <file stem>-<row>. Only public addresses are requested
    (blocked_address otherwise, redirects included). Failed downloads (http_404, timeout, too_large,
    ...) and bodies that are not usable images go to OUT/_rejects/ with a reason; rerunning the same
    command requests again only the URLs whose failure may pass. Settings: download.timeout (per URL,
    in all), download.max_bytes, download.allow_private_addresses, download.threads,
    download.retries; shard size: ingest.rows_per_shard.
    """
    from pipeline.stages.fggrn.download import DownloadStage, reopen_failed_shards

    with _user_errors():
        reopened = [] if overwrite else reopen_failed_shards(out)
    if reopened:
        typer.echo(f"retrying the failed downloads of {len(reopened)} shard(s)", err=True)
    _run_stage(DownloadStage(urls, out), out, config, set_, overwrite, executor)


@import_app.command("fgclip")
def import_fgclip(
    json_path: Annotated[str, typer.Argument(metavar="JSON", help="FineHARD / FG-CLIP stage-2 .json (a list of items) or .jsonl (a path or an s3://, gs://, hf:// URI).")],
    out: Annotated[str, typer.Argument(help="Output directory for FgGRN shards (a path or an s3://, gs://, hf:// URI).")],
    images: Annotated[Optional[str], typer.Option(help="Folder the items' f_path values are relative to (a path or an s3://, gs://, hf:// URI): also build image shards.")] = None,
    images_out: Annotated[Optional[str], typer.Option(help="Where the image shards go (default: OUT-images next to OUT; a path or a URI).")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Read FG-CLIP JSON (caption, short_caption, f_path, bbox_info) into FgGRN shards keyed by f_path.

    Boxes, phrases (short_expr) and hard negatives (short_expr_negs) are kept; bad items go to
    OUT/_rejects/ with a reason. Without --images width and height are 0 (unknown).
    """
    from pipeline.stages.fggrn.import_fgclip import FgclipImagesStage, ImportFgclipStage

    from pipeline.core.storage import location

    image_shards = None
    if images:
        image_shards = images_out or location(out).with_name(f"{location(out).name}-images")
        _run_stage(FgclipImagesStage(json_path, images), image_shards, config, set_, overwrite, executor)
    _run_stage(ImportFgclipStage(json_path, image_shards), out, config, set_, overwrite, executor)


@import_app.command("grit")
def import_grit(
    parquet: Annotated[str, typer.Argument(metavar="PARQUET", help="A GRIT parquet file (caption, width, height, noun_chunks, ref_exps); a path or an s3://, gs://, hf:// URI.")],
    out: Annotated[str, typer.Argument(help="Output directory for region shards (a path or an s3://, gs://, hf:// URI).")],
    expressions: Annotated[str, typer.Option(help="ref_exps or noun_chunks: which spans become regions.")] = "ref_exps",
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Read GRIT's grounded captions into region shards, keyed as `fgdata download` keys their images."""
    from pipeline.stages.fggrn.import_grit import ImportGritStage

    _run_stage(ImportGritStage(parquet, expressions), out, config, set_, overwrite, executor)


@import_app.command("hf")
def import_hf(
    source: Annotated[str, typer.Argument(help="A datasets.save_to_disk folder, or a .parquet file / folder in the hub's layout; a path or an s3://, gs://, hf:// URI.")],
    out: Annotated[str, typer.Argument(help="Output directory for image or caption shards (a path or an s3://, gs://, hf:// URI).")],
    kind: Annotated[str, typer.Option(help="images (an image column) or captions (long_caption / caption / text).")] = "images",
    split: Annotated[str, typer.Option(help="Which split to read.")] = "train",
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Read a Hugging Face dataset into image or caption shards; unusable rows go to OUT/_rejects/."""
    from pipeline.stages.fggrn.import_hf import ImportHfStage

    _run_stage(ImportHfStage(source, kind, split), out, config, set_, overwrite, executor)


@app.command()
def dedup(
    images: Annotated[str, typer.Argument(help="Image shards (from `fgdata ingest`).")],
    out: Annotated[str, typer.Argument(help="Output directory for the image shards kept.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Drop exact and near-duplicate images across the whole dataset, keeping one of each group.

    Exact: the same decoded pixels. Near: 64-bit pHashes within dedup.max_distance bits, found by
    grouping on bands of the hash (no all-pairs comparison). The image kept is the group's smallest
    (shard, key); every other is a `duplicate` reject naming it. Hashing and grouping run on Ray
    unless --executor local.
    """
    from pipeline.runner import ensure_ray
    from pipeline.stages.fggrn.dedup import DedupStage

    with _user_errors():
        run = _setup(config, [*(set_ or []), *([f"run.executor={executor}"] if executor else [])]).run
        if run.executor != "local":
            ensure_ray(run)  # the hashing and grouping passes run in planning, on Ray as the shards do
    _run_stage(DedupStage(images), out, config, set_, overwrite, executor)


@app.command()
def screen(
    images: Annotated[str, typer.Argument(help="Image shards (from `fgdata ingest` or `fgdata dedup`).")],
    out: Annotated[str, typer.Argument(help="Output directory for the image shards kept.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Reject NSFW images, record faces (blur them with screen.blur_faces=true), flag personal data in captions.

    The detector is NudeNet's 320n model (MIT, shipped in the nudenet wheel, run with onnxruntime).
    An image with a detection of screen.nsfw_classes at screen.nsfw_threshold or above is an `nsfw`
    reject; FACE_FEMALE / FACE_MALE boxes go to the `faces` column. E-mails, phone numbers, URLs and
    street addresses in captions are listed in `caption_personal_data` (screen.personal_data=mask
    also replaces them in the caption).
    """
    from pipeline.stages.fggrn.screen import ScreenStage

    _run_stage(ScreenStage(images), out, config, set_, overwrite, executor)


@app.command()
def phrases(
    inp: Annotated[str, typer.Argument(metavar="IN", help="Image or caption shards with key and short_caption (and long_caption).")],
    out: Annotated[str, typer.Argument(help="Output directory for phrase shards.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Split each caption into referring expressions with spaCy (long caption if present, else short).

    Noun chunks are expanded with one prepositional attribute ("a man in a blue jacket");
    pronouns, abstract or scene-level nouns and number/date/place entities are dropped.
    Empty, over-long and non-English captions go to OUT/_rejects/ with a reason.
    """
    from pipeline.stages.fggrn.phrases import PhrasesStage

    _run_stage(PhrasesStage(inp), out, config, set_, overwrite, executor)


@app.command()
def recaption(
    images: Annotated[str, typer.Argument(help="Image shards (from `fgdata ingest`).")],
    out: Annotated[str, typer.Argument(help="Output directory for caption shards.")],
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help="Hub id or local directory of the VLM (recaption.model).")
    ] = None,
    backend: Annotated[Optional[str], typer.Option(help="transformers or vllm (recaption.backend).")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Write a detailed long caption for every image with a multimodal LLM, next to its short caption.

    Default model: Qwen/Qwen2.5-VL-7B-Instruct on transformers (bf16 on GPU). One model actor per GPU
    (or per --set recaption.tensor_parallel_size=N GPUs with vLLM); images are decoded and resized in
    CPU tasks. Empty, cut-off, too short, repetitive or non-English captions are retried once with
    sampling, then go to OUT/_rejects/ with a reason, as do images the model cannot take.
    """
    from pipeline.stages.fggrn.recaption import RecaptionStage

    flags = [f"recaption.model={model}"] * bool(model) + [f"recaption.backend={backend}"] * bool(backend)
    _run_stage(RecaptionStage(images), out, config, [*flags, *(set_ or [])], overwrite, executor)


@app.command()
def ground(
    phrases_dir: Annotated[str, typer.Argument(metavar="PHRASES", help="Phrase shards (from `fgdata phrases`).")],
    out: Annotated[str, typer.Argument(help="Output directory for region shards.")],
    images: Annotated[
        Optional[str], typer.Option(help="Image shards to take pixels from; default: found through PHRASES' lineage.")
    ] = None,
    backend: Annotated[Optional[str], typer.Option(help="yolo_world or owlv2 (ground.backend).")] = None,
    detector: Annotated[Optional[str], typer.Option(help="YOLO-World checkpoint name or path (ground.detector).")] = None,
    trust_model_file: Annotated[
        bool, typer.Option("--trust-model-file", help="Load a detector file whose safety fgdata cannot check: it may run code (ground.trust_model_file).")
    ] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Ground every phrase of every image to boxes with an open-vocabulary detector, one row per image.

    Default: ultralytics YOLO-World v2 with each image's own phrases as its classes, embedded once
    per distinct phrase by the CLIP ViT-B/32 text tower (ground.text_encoder). Boxes are kept above
    ground.score_threshold, after NMS within a phrase and across near-identical boxes, within the
    area limits and caps; whole-image boxes are dropped. Images left with no region keep an empty list.
    ground.agreement_detector (the other backend) keeps only boxes it confirms at IoU >= ground.agreement_iou.
    """
    from pipeline.stages.fggrn.ground import GroundStage

    flags = [f"ground.backend={backend}"] * bool(backend) + [f"ground.detector={detector}"] * bool(detector)
    flags += ["ground.trust_model_file=true"] * trust_model_file
    _run_stage(GroundStage(phrases_dir, images), out, config, [*flags, *(set_ or [])], overwrite, executor)


@app.command()
def quality(
    inp: Annotated[str, typer.Argument(metavar="FGGRN_OR_REGIONS", help="Region shards (from `fgdata ground`) or FgGRN shards (from `fgdata negatives`).")],
    out: Annotated[str, typer.Argument(help="Output directory for the scored shards (same kind as the input).")],
    images: Annotated[
        Optional[str], typer.Option(help="Image shards to take pixels from; default: found through the input's lineage.")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Score how well each image matches its captions and each box its phrase with a CLIP (quality.model).

    Adds short_caption_score and long_caption_score (image vs caption) and region_clip_scores
    (the box's crop vs its phrase): cosine similarities. Floors are off by default: a row under
    quality.min_short_caption_score or min_long_caption_score is a reject with its score; a region
    under quality.min_region_score is dropped from its row (counted as dropped_low_region_score).
    """
    from pipeline.stages.fggrn.quality import QualityStage

    _run_stage(QualityStage(inp, images), out, config, set_, overwrite, executor)


@app.command()
def negatives(
    regions: Annotated[str, typer.Argument(help="Region shards (from `fgdata ground`).")],
    out: Annotated[str, typer.Argument(help="Output directory for FgGRN shards.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Write hard negatives for every region phrase: one attribute changed, the object kept.

    Backend `rules` swaps one colour, material, size, count, pattern, texture, state, position,
    shape or age word from curated lexicons (CPU). Every candidate must keep the head noun, change
    1-3 content words, stay close in length and not merely reword the positive or another negative
    (lexicons, then all-MiniLM-L6-v2 similarity, negatives.embedding_model); then an NLI
    cross-encoder (negatives.nli_model) must find it contradicted by the positive in the caption
    (negatives.nli_rule=contradiction, P >= negatives.min_contradiction; or not_entailed). Regions
    with fewer than negatives.min_valid negatives are flagged, not dropped.
    """
    from pipeline.stages.fggrn.negatives import NegativesStage

    _run_stage(NegativesStage(regions), out, config, set_, overwrite, executor)


@export_app.command("fgclip")
def export_fgclip_command(
    fggrn: Annotated[str, typer.Argument(help="FgGRN shards (from `fgdata negatives`); a path or an s3://, gs://, hf:// URI.")],
    out: Annotated[Path, typer.Argument(parser=_local_path, help="Local directory for fgclip.json and images/ (FG-CLIP's --data_path and --image_folder).")],
    images: Annotated[Optional[str], typer.Option(help="Image shards (a path or a URI); default: found through FGGRN's lineage.")] = None,
    negatives: Annotated[int, typer.Option(help="Hard negatives a box needs for flag_short_neg=1 (FG-CLIP's hard-negative loss takes exactly 10).")] = 10,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete the files an earlier export into OUT wrote first (nothing else), instead of refreshing them.")
    ] = False,
    lowercase: Annotated[
        bool, typer.Option("--lowercase/--keep-case", help="Lowercase region texts (short_expr, long_expr, negatives), as FG-CLIP 2 does to the negatives it reads.")
    ] = True,
    allow_missing_long_captions: Annotated[
        bool, typer.Option("--allow-missing-long-captions", help="Export images without a long caption (their caption repeats short_caption, counted) instead of refusing.")
    ] = False,
    require_negatives: Annotated[
        bool, typer.Option("--require-negatives", help="Leave out images with no box that has hard negatives among their first 4 (FG-CLIP 1's collator fails on a batch of only such images).")
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Per-device batch FG-CLIP will train with (train.sh: 512): the export warns when such a batch may hold no hard negative at all.")
    ] = FgclipTrainConfig.batch_size,
):
    """Write FgGRN as FG-CLIP's stage-2 trainer reads it: a JSON list with the images beside it.

    Each item: f_path, caption (long caption), short_caption, and bbox_info, one box per phrase
    (best score), boxes with hard negatives first: bbox (x1, y1, x2, y2 normalised to 0-1),
    short_expr (the phrase), long_expr (the phrase with its modifiers from the long caption),
    flag_short_neg and short_expr_negs (the hard negatives keyed "0".."9"). Rows `fgdata import
    fgclip` wrote go out as released. Images without hard negatives are kept (as in FineHARD), with
    a warning when a batch may hold none; --require-negatives leaves them out. fgclip.json is the
    only .json file in OUT.
    """
    from pipeline.datasets.fgclip_export import LEFT_OUT_REASONS, NEGATIVE_FREE_BATCH_WARNING, SUMMARY_FILE, export_fgclip

    with _user_errors():
        summary = export_fgclip(
            fggrn, out, images, negatives_needed=negatives, overwrite=overwrite, lowercase=lowercase, allow_missing_long_captions=allow_missing_long_captions,
            require_negatives=require_negatives, batch_size=batch_size,
        )
        left_out = ", ".join(f"{n} {reason}" for reason, n in summary["left_out"].items() if n) or "none"
        typer.echo(
            f"wrote {summary['json']}: {summary['items']} images, {summary['boxes']} boxes, "
            f"{summary['boxes_with_negatives']} with {negatives} negatives; {len(summary['missing_images'])} image(s) not found, "
            f"{summary['bad_boxes']} bad box(es) left out, {summary['duplicate_phrase_boxes']} box(es) of a phrase already boxed left out; "
            f"images left out: {left_out}; {summary['missing_long_captions']} image(s) without a long caption"
        )
        if summary["missing_long_captions"]:
            typer.echo(f"warning: {summary['missing_long_captions']} image(s) have no long caption: their caption repeats short_caption", err=True)
        if any(summary["left_out"].values()):
            why = ", ".join(f"{n} {reason} ({LEFT_OUT_REASONS[reason]})" for reason, n in summary["left_out"].items() if n)
            typer.echo(f"note: {sum(summary['left_out'].values())} image(s) left out: {why}; their keys are in {Path(out) / SUMMARY_FILE}", err=True)
        if summary["chance_batch_without_negatives"] > NEGATIVE_FREE_BATCH_WARNING:
            typer.echo(
                f"warning: {summary['without_negatives']} of {summary['items']} images have no hard negatives among their first 4 boxes: "
                f"a batch of {batch_size} holds none with chance {summary['chance_batch_without_negatives']:.3g}, and FG-CLIP 1's collator "
                "fails on such a batch; pass --require-negatives to leave those images out",
                err=True,
            )
        if summary["other_data_files"]:
            names = ", ".join(summary["other_data_files"])
            typer.echo(f"warning: {out} also holds {names}; FG-CLIP's loaders read every *.json and *.jsonl there as data", err=True)


@hierarcaps_app.command("import")
def hierarcaps_import(
    csv_path: Annotated[str, typer.Argument(metavar="CSV", help="An official HierarCaps CSV: train (positive,negative) or test (id,captions,image_url); a path or an s3://, gs://, hf:// URI.")],
    out: Annotated[str, typer.Argument(help="Output directory for hierarcaps shards (a path or a URI).")],
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Read an official HierarCaps CSV into hierarcaps shards; malformed chains go to OUT/_rejects/."""
    from pipeline.stages.hierarcaps.import_csv import HierarcapsImportStage

    _run_stage(HierarcapsImportStage(csv_path), out, config, set_, overwrite, executor)


CaptionsArgument = Annotated[
    str,
    typer.Argument(
        metavar="CAPTIONS",
        help="Caption or image shards (key, short_caption), or a .txt (a caption per line), .csv, .tsv or .parquet of captions; a path or an s3://, gs://, hf:// URI.",
    ),
]
SplitOption = Annotated[Optional[str], typer.Option(help="train or test: what the chains are for (hierarcaps.split).")]


def _split_flags(split: str | None) -> list[str]:
    if split not in (None, "train", "test"):
        raise typer.BadParameter(f"--split must be train or test, got {split!r}")
    return [f"hierarcaps.split={split}"] * bool(split)


@hierarcaps_app.command("seed")
def hierarcaps_seed(
    captions: CaptionsArgument,
    out: Annotated[str, typer.Argument(help="Output directory for hierarcaps shards (a path or a URI).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Instruction LLM: a hub id, a local directory, a local .gguf file, or smollm2 (the real 135M demo model installed by make setup) (hierarcaps.model).")] = None,
    split: SplitOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Turn captions into chains with an instruction LLM and the few-shot prompt hierarcaps.seed_prompt.

    Default model: meta-llama/Llama-3.1-8B-Instruct on transformers (--set hierarcaps.backend=vllm for
    vLLM). The LLM writes the three tiers above each caption; answers that do not parse into four
    distinct tiers of growing length go to OUT/_rejects/ with the reason and the answer.
    """
    from pipeline.stages.hierarcaps.seed import HierarcapsSeedStage

    flags = [f"hierarcaps.model={model}"] * bool(model) + _split_flags(split)
    _run_stage(HierarcapsSeedStage(captions), out, config, [*flags, *(set_ or [])], overwrite, executor)


@hierarcaps_app.command("augment")
def hierarcaps_augment(
    captions: CaptionsArgument,
    out: Annotated[str, typer.Argument(help="Output directory for hierarcaps shards (a path or a URI).")],
    demonstrations: Annotated[str, typer.Option(help="Validated chains (the output of `fgdata hierarcaps filter`) to show as examples.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Instruction LLM: a hub id, a local directory, a local .gguf file, or smollm2 (the real 135M demo model installed by make setup) (hierarcaps.model).")] = None,
    split: SplitOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Like seed, but each prompt shows hierarcaps.demonstrations chains drawn from DEMONSTRATIONS
    (a different draw per caption, never the caption's own chain), to grow and diversify the set."""
    from pipeline.stages.hierarcaps.augment import HierarcapsAugmentStage

    flags = [f"hierarcaps.model={model}"] * bool(model) + _split_flags(split)
    _run_stage(HierarcapsAugmentStage(captions, demonstrations), out, config, [*flags, *(set_ or [])], overwrite, executor)


@hierarcaps_app.command("distill")
def hierarcaps_distill(
    chains: Annotated[list[str], typer.Argument(help="One or more hierarcaps datasets of validated chains (paths or URIs).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Local directory for the fine-tuned model (and its checkpoints while training); copy it to a store when done.")],
    base: Annotated[Optional[str], typer.Option(help="Model to fine-tune, hub id or local directory (distill.base_model).")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
):
    """Fine-tune Flan-T5 on the chains in both directions: `generalize: <caption>` -> the tiers above
    it, and `specify: <tier>` -> the next tier.

    Default base: google/flan-t5-base. Chains are held out by key (distill.eval_fraction) for the
    evaluation loss, logged every distill.eval_every steps, and the exact-match rates written to
    OUT/distill.json. Checkpoints (safetensors + optimizer state) every distill.save_every steps; a
    killed run resumes from the last one.
    """
    from pipeline.train.distill import distill

    with _user_errors():
        settings = _setup(config, [*([f"distill.base_model={base}"] * bool(base)), *(set_ or [])])
        report = distill(chains, out, settings.distill, overwrite=overwrite, progress=settings.run.progress)
        last = report["history"][-1] if report["history"] else {}
        match = report["held_out_exact_match"] or {}
        typer.echo(
            f"wrote {out}: {report['steps']} steps on {report['chains']['train']} chains; final train loss "
            f"{last.get('train_loss', float('nan')):.4f}, held-out loss {last.get('eval_loss') or float('nan'):.4f}, "
            f"exact match to_general {match.get('to_general', float('nan')):.2f}, to_specific {match.get('to_specific', float('nan')):.2f}"
        )


@hierarcaps_app.command("generate")
def hierarcaps_generate(
    captions: CaptionsArgument,
    out: Annotated[str, typer.Argument(help="Output directory for hierarcaps shards (a path or a URI).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The distilled model directory (hierarcaps.generator).")] = None,
    split: SplitOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Write a chain for every caption with the distilled model (beam search, hierarcaps.num_beams),
    and sample hierarcaps.negative_candidates siblings of every tier as candidate negatives."""
    from pipeline.stages.hierarcaps.generate import HierarcapsGenerateStage

    flags = [f"hierarcaps.generator={model}"] * bool(model) + _split_flags(split)
    _run_stage(HierarcapsGenerateStage(captions), out, config, [*flags, *(set_ or [])], overwrite, executor)


@hierarcaps_app.command("negatives")
def hierarcaps_negatives(
    dataset: Annotated[str, typer.Argument(help="Hierarcaps shards with negative_candidates (from generate, then filter); a path or a URI.")],
    out: Annotated[str, typer.Argument(help="Output directory for chains with their negative chain (a path or a URI).")],
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Pick one negative per tier by NLI: not entailed by the tier's positive, and entailing the tier
    above (a sibling under the same parent). Items with a tier left without one go to OUT/_rejects/."""
    from pipeline.stages.hierarcaps.negatives import HierarcapsNegativesStage

    _run_stage(HierarcapsNegativesStage(dataset), out, config, set_, overwrite, executor)


@hierarcaps_app.command("filter")
def hierarcaps_filter(
    dataset: Annotated[str, typer.Argument(help="Hierarcaps shards (a path or a URI).")],
    out: Annotated[str, typer.Argument(help="Output directory for the chains that pass (a path or a URI).")],
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Keep chains whose every tier is entailed by the next (NLI, hierarcaps.nli_model); the rest go
    to OUT/_rejects/ with the failing tier and its score."""
    from pipeline.stages.hierarcaps.filter import HierarcapsFilterStage

    _run_stage(HierarcapsFilterStage(dataset), out, config, set_, overwrite, executor)


@hierarcaps_app.command("export")
def hierarcaps_export(
    dataset: Annotated[str, typer.Argument(help="Hierarcaps shards (a path or an s3://, gs://, hf:// URI).")],
    out: Annotated[str, typer.Argument(help="CSV file to write (a path or a URI).")],
    layout: Annotated[str, typer.Option(help="train (positive,negative) or test (id,captions,image_url).")] = "train",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (otherwise an existing file is refused).")] = False,
):
    """Write hierarcaps shards in an official CSV layout (tiers joined by ' => ')."""
    from pipeline.datasets.hierarcaps_csv import write_official_csv

    with _user_errors():
        summary = write_official_csv(dataset, out, layout, overwrite=overwrite)
        typer.echo(f"wrote {summary['path']}: {summary['written']} rows ({summary['skipped_without_negatives']} without negatives left out), data card {summary['datacard']}")


@app.command()
def train(
    sources: Annotated[list[str], typer.Argument(help="fgclip: FgGRN shards (from `fgdata negatives`). re: hierarcaps shards or official train CSVs. Paths or URIs.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Local directory for the trained model, its checkpoints and train.json; copy it to a store when done.")],
    objective: Annotated[str, typer.Option(help="fgclip (FG-CLIP stage 2) or re (Radial Embedding on HierarCaps).")] = "fgclip",
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="CLIP to start from, hub id or local directory (fgclip.model / radial.model).")] = None,
    images: Annotated[Optional[str], typer.Option(help="fgclip: image shards (a path or a URI); default: found through the FgGRN lineage.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
):
    """Train a CLIP dual encoder on fgdata's shards.

    fgclip (settings under fgclip.): global InfoNCE image<->long caption (Long-CLIP positions, 248
    tokens) and image<->short caption ("a photo of ..."), regional InfoNCE between RoIAlign box
    features and region phrases (weight 0.1), and a hard-negative loss per region over its phrase
    and 10 negatives (weight 0.5), with their own learnable temperatures; defaults follow FG-CLIP's
    stage-2 recipe (openai/clip-vit-base-patch16, lr 1e-6, 200 warm-up steps, cosine, 1 epoch, bf16,
    weight decay 1e-3 except LayerNorm and biases, no gradient clipping).

    re (settings under radial.): only the text tower and projection learn; exterior-angle loss
    around the root (the embedding of the empty text), hardest-pair term and pullback to the frozen
    encoder, as HierarCaps' train.py (openai/clip-vit-base-patch32, constant lr 1e-7, AdamW weight
    decay 0.01, no clipping, fp32, batch 8, lambda_p 10).

    Checkpoints every save_every steps (safetensors + optimizer state); rerun the same command to
    resume. Multi-GPU: launch with `torchrun --nproc_per_node N .venv/bin/fgdata train ...`.
    """
    from pipeline.train.loop import train as run_training

    with _user_errors():
        section = {"fgclip": "fgclip", "re": "radial"}.get(objective, "fgclip")
        settings = _setup(config, [*([f"{section}.model={model}"] * bool(model)), *(set_ or [])])
        report = run_training(objective, sources, out, settings, images=images, overwrite=overwrite, progress=settings.run.progress)
        if report:
            last = report["history"][-1] if report["history"] else {}
            parts = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k not in ("step", "lr"))
            typer.echo(f"wrote {out}: {report['objective']}, {report['steps']} steps in {report['seconds']}s; last losses: {parts}")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="CLIP to evaluate: a `fgdata train` output, hub id or local directory.")],
    fggrn: Annotated[Optional[list[str]], typer.Option(help="FgGRN shards (held out): fg-ovd accuracy, regional and long/short retrieval. A path or a URI. Repeatable.")] = None,
    hierarcaps: Annotated[Optional[list[str]], typer.Option(help="Hierarcaps shards or an official CSV (e.g. hierarcaps_test.csv): d_corr, and hierarchical precision/recall as the reference evaluator computes them when images are at hand (--image-root, or an images dataset upstream of shards). A path or a URI. Repeatable.")] = None,
    fg_ovd: Annotated[Optional[str], typer.Option("--fg-ovd", help="An FG-OVD benchmark .jsonl (img_path, bbox, pos_expression, neg_expression); a path or a URI.")] = None,
    image_root: Annotated[Optional[str], typer.Option(help="FG-OVD: where img_path values are relative to (default: the jsonl's folder). HierarCaps: the folder of the test images (the reference's assets/test_imgs), matched by the COCO id in image_url. A path or a URI.")] = None,
    images: Annotated[Optional[str], typer.Option(help="Image shards for --fggrn (a path or a URI); default: found through its lineage.")] = None,
    hard_negatives: Annotated[Optional[int], typer.Option(help="Cap on the negatives per box for the fg-ovd accuracy; default: all of them, as FG-CLIP's evaluator scores (chance = mean 1/(k+1)).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many images / chains per set.")] = 5000,
    exif_rotate: Annotated[bool, typer.Option("--exif-rotate", help="FG-OVD and HierarCaps: turn images upright by their EXIF orientation (FG-OVD boxes with them); default: the stored pixels, as both reference evaluators read them.")] = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write the results as JSON here too (a path or a URI).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --out file when it already exists.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
):
    """Measure a CLIP on fine-grained and hierarchical understanding; prints a table and writes JSON."""
    from collections import Counter

    from pipeline.core.shards import write_json
    from pipeline.eval import evaluate as ev

    with _user_errors():
        settings = _setup(config, set_)
        if not (fggrn or hierarcaps or fg_ovd):
            raise FgdataError("nothing to evaluate: give --fggrn, --hierarcaps and/or --fg-ovd")
        if out:
            _check_out_file(out, overwrite)
        encoder = ev.Encoder(model)
        results: dict = {"model": model}
        if fggrn:
            fggrn_skipped = Counter()
            items = ev.fggrn_items(fggrn, images, limit, fggrn_skipped)
            prompt = settings.fgclip.short_prompt
            image_features, regions = ev.encode_items(encoder, items)
            pictures = [i["image"] for i in items]
            results["fggrn"] = {
                "fg_ovd": ev.fgovd_accuracy(encoder, items, hard_negatives, regions),
                "regional_retrieval": ev.regional_retrieval(encoder, items, regions),
                "long_retrieval": ev.retrieval(encoder, pictures, [i["long"] for i in items], long=True, image_features=image_features),
                "short_retrieval": ev.retrieval(encoder, pictures, [prompt.format(i["short"]) for i in items], long=False, image_features=image_features),
                "skipped": dict(fggrn_skipped),
            }
        if fg_ovd:
            results["fg_ovd_benchmark"] = ev.fgovd_benchmark(encoder, fg_ovd, image_root, hard_negatives, exif_rotate)
        if hierarcaps:
            chains_skipped = Counter()
            chains, chain_images = ev.hierarcaps_items(hierarcaps, limit, chains_skipped, image_root)
            results["hierarcaps"] = {**ev.hierarchy_metrics(encoder, chains, chain_images, exif_rotate), "skipped": dict(chains_skipped)}
        typer.echo(ev.format_table(results))
        if out:
            write_json(out, results)  # atomic: a reader never sees half a file
            typer.echo(f"wrote {out}")


@app.command("synthetic-world")
def synthetic_world(
    out: Annotated[Path, typer.Argument(parser=_local_path, help="Local directory for images/, fggrn/ and hierarcaps/.")],
    count: Annotated[int, typer.Option(help="How many images.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same world.")] = 0,
    side: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
):
    """Write a synthetic world of coloured shapes with known boxes, captions, hard negatives and
    hierarchies: data to check that `fgdata train` learns before spending GPUs on real data."""
    from pipeline.datasets.synthetic_world import write_world

    with _user_errors():
        paths = write_world(out, count, seed=seed, side=side)
        typer.echo(f"wrote {count} items: " + ", ".join(str(p) for p in paths.values()))


@app.command("tiny-model")
def tiny_model(
    out: Annotated[Path, typer.Argument(parser=_local_path, help="Local directory to write the model and its processor to.")],
    kind: Annotated[
        str,
        typer.Option(
            help="vlm (Qwen2.5-VL, for recaption), clip-text (YOLO-World's phrase encoder), owlv2, nli, "
            "llm (a Llama-shaped chat model), t5 (a Flan-T5-shaped model for hierarcaps distill) or clip (a whole CLIPModel for train)."
        ),
    ] = "vlm",
):
    """Build a tiny RANDOM-weight model from a real config class, for offline demos and tests.

    It loads through the same path as a hub model (pass the directory as --model or in --set);
    what it produces is noise, and every row it produces is marked as coming from random weights.
    """
    from pipeline.core.prompts import load_prompt
    from pipeline.core.resources import resource_dir
    from pipeline.models import tiny

    builders = {
        "vlm": tiny.build_tiny_vlm, "clip-text": tiny.build_tiny_clip_text, "owlv2": tiny.build_tiny_owlv2,
        "nli": tiny.build_tiny_nli, "llm": tiny.build_tiny_llm, "t5": tiny.build_tiny_t5, "clip": tiny.build_tiny_clip,
    }
    with _user_errors():
        if kind not in builders:
            raise FgdataError(f"unknown tiny model kind {kind!r}; available: {', '.join(builders)}")
        # the vocabulary is learnt from the bundled prompt and sample captions, so a random
        # model at least works with English word pieces
        texts = [load_prompt(name).text for name in ("recaption_long.v1", "hierarcaps_seed.v1")]
        sample = resource_dir("prompts").parent / "sample"
        texts += [p.read_text() for p in sorted(sample.glob("images/*.txt")) + sorted(sample.glob("images/*.json")) + sorted(sample.glob("hierarcaps/*.csv"))]
        typer.echo(f"wrote a random-weight {kind} to {builders[kind](out, texts * 20)}")


@app.command()
def info(
    dataset: Annotated[str, typer.Argument(help="A dataset directory written by an fgdata stage (a path or an s3://, gs://, hf:// URI).")],
    top: Annotated[int, typer.Option(help="How many top phrases and heads to list.")] = 10,
):
    """Show what a dataset holds: shards, rows, rejects by reason, models, top phrases."""
    from pipeline.datasets.info import describe_dataset

    with _user_errors():
        typer.echo(describe_dataset(dataset, top=top))


@app.command()
def report(
    dataset: Annotated[str, typer.Argument(help="A dataset directory written by an fgdata stage (a path or an s3://, gs://, hf:// URI).")],
    out: Annotated[str, typer.Option("--out", help="The HTML file to write (self-contained: images inline); a path or a URI.")],
    sample: Annotated[int, typer.Option(help="At most this many rows feed the histograms and examples (chosen at random).")] = 20_000,
    gallery: Annotated[int, typer.Option(help="How many images (or chains) to show.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
):
    """Write one HTML page to look at a dataset: the funnel across its lineage, rejects by reason with
    examples, images with boxes drawn, negatives with NLI scores, histograms, HierarCaps chains."""
    from pipeline.reports.html import write_report

    with _user_errors():
        if sample < 1 or gallery < 0:
            raise FgdataError("--sample must be at least 1 and --gallery at least 0")
        _check_out_file(out, overwrite)
        summary = write_report(dataset, out, sample=sample, gallery=gallery, seed=seed)
        sampled = f", {summary['sampled']:,} sampled" if summary["sampled"] < summary["rows"] else ""
        typer.echo(f"wrote {summary['out']}: {summary['kind']}, {summary['rows']:,} rows{sampled}, {summary['seconds']:.1f}s; open it in a browser")


@audit_app.command("sample")
def audit_sample(
    dataset: Annotated[str, typer.Argument(help="An fggrn or hierarcaps dataset written by fgdata (a path or an s3://, gs://, hf:// URI).")],
    out: Annotated[str, typer.Option("--out", help="The HTML page to write (self-contained: images inline, no network); a path or a URI.")],
    n: Annotated[int, typer.Option("--n", help="How many candidate negatives to sample, shared equally among the strata.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
):
    """Draw a stratified sample of candidate negatives (fggrn: by attribute kind and backend;
    hierarcaps: by tier) into one page: the image crop with its box, the positive and the candidate.
    Keys v / i / u judge valid / invalid / unsure; the verdicts download as JSON."""
    from pipeline.core.storage import location
    from pipeline.reports.audit import write_audit_page

    with _user_errors():
        _check_out_file(out, overwrite)
        summary = write_audit_page(dataset, out, n=n, seed=seed)
        typer.echo(f"wrote {location(out)}: {summary['items']} {summary['kind']} candidates from {len(summary['strata'])} strata "
                   f"({summary['images']} with an image), {summary['seconds']:.1f}s; open it in a browser")


@audit_app.command("score")
def audit_score(
    verdicts: Annotated[str, typer.Argument(help="The verdicts JSON the audit page downloads (a path or a URI).")],
    dataset: Annotated[Optional[str], typer.Option(help="The audited dataset (a path or an s3://, gs://, hf:// URI); default: the one the verdicts name.")] = None,
):
    """Print the valid rate with a Wilson 95% interval per stratum and overall, and record it in the
    dataset's manifest under "audit" (and in its data card)."""
    from pipeline.reports.audit import audited_dataset, format_scores, read_verdicts, record_audit

    with _user_errors():
        payload = read_verdicts(verdicts)
        dataset_dir = audited_dataset(verdicts, payload, dataset)
        # the verdicts file may name the dataset: say which one is written before writing it
        typer.echo(f"recording the audit in {printable(dataset_dir)}{'' if dataset else ' (named by the verdicts file; --dataset to choose)'}")
        audit = record_audit(verdicts, payload, dataset_dir)
        typer.echo(format_scores(audit))
        typer.echo(f"recorded in {printable(dataset_dir / '_manifest.json')} under \"audit\"")


@app.command()
def plan(
    recipe: Annotated[str, typer.Argument(help="fggrn, fggrn-demo or hierarcaps (bundled), or the path of your own recipe .yaml: its steps are planned.")],
    images: Annotated[Optional[int], typer.Option(help="Images to plan for (a recipe that starts from images, e.g. fggrn), e.g. 12_000_000.")] = None,
    captions: Annotated[Optional[int], typer.Option(help="Captions to plan for (a recipe that starts from captions, e.g. hierarcaps).")] = None,
    gpu: Annotated[Optional[str], typer.Option(help="GPU type the model stages run on, e.g. h100; leave out for CPU only.")] = None,
    gpus: Annotated[int, typer.Option(help="How many GPUs.")] = 1,
    cpus: Annotated[Optional[int], typer.Option(help="CPU cores (default: 16 per GPU, or run.num_cpus / this machine's).")] = None,
    stages: Annotated[Optional[str], typer.Option(help="Only these steps, by step or stage name, comma-separated, e.g. ingest,phrases.")] = None,
    caption_chars: Annotated[Optional[float], typer.Option(help="Mean caption length of your data in characters (phrases' time grows with it).")] = None,
    from_runs: Annotated[Optional[list[Path]], typer.Option("--from-runs", help="Dataset folder(s) of your own runs: their manifests' timings come first. Repeatable.")] = None,
    commands: Annotated[bool, typer.Option("--commands", help="Plan the stage commands run one after another (each starts its own Ray), not `fgdata run`.")] = False,
    export: Annotated[Optional[str], typer.Option(help="Then `fgdata export EXPORT` (fgclip).")] = None,
    results: Annotated[Optional[Path], typer.Option(help="Folder of bench records (default: bench/results of this checkout).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
):
    """The bill before the run: GPU-hours, CPU core-hours and wall time per stage and in total, from
    measured throughput records (bench/results, your runs' manifests), saying what each figure rests on."""
    import json

    from pipeline.recipes import load_recipe
    from pipeline.reports.plan import BENCH_RESULTS, format_plan, load_bench, load_runs
    from pipeline.reports.plan import plan as make_plan

    with _user_errors():
        settings = load_config(config, set_)
        the_recipe = load_recipe(recipe)
        if (images is None) == (captions is None):
            raise FgdataError(f"plan {recipe} needs --images N or --captions N (one of them): the rows its first step reads")
        step_configs = {}
        for step in the_recipe.steps:  # each step runs with the recipe's `set` for it, then --set, as `fgdata run` does
            try:
                step_configs[step.name] = load_config(config, [*step.overrides, *(set_ or [])])
            except FgdataError as exc:
                raise FgdataError(f"step {step.name!r}: {exc}") from None
        measures, startup = load_bench(results or BENCH_RESULTS) if results or BENCH_RESULTS.is_dir() or not from_runs else ([], {})
        measures = load_runs(from_runs or []) + measures
        chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
        bill = make_plan(
            the_recipe, images if images is not None else captions, settings, gpu=gpu, gpus=gpus, cpus=cpus, measures=measures, startup=startup,
            stages=chosen, caption_chars=caption_chars, step_configs=step_configs, commands=commands, export=export,
        )
        typer.echo(json.dumps(bill, indent=2, allow_nan=False) if as_json else format_plan(bill))


@app.command("run")
def run_recipe_command(
    recipe: Annotated[str, typer.Argument(help="fggrn or hierarcaps (bundled), or the path of your own recipe .yaml.")],
    source: Annotated[str, typer.Argument(help="What the recipe starts from: images for fggrn (as `fgdata ingest` reads), captions for hierarcaps; a path or an s3://, gs://, hf:// URI.")],
    out: Annotated[str, typer.Argument(help="Output folder: each step writes OUT/<step name>/, a normal fgdata dataset; a path or an s3://, gs://, hf:// URI.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    overwrite: OverwriteOption = False,
    executor: ExecutorOption = None,
):
    """Run a whole recipe in one job: a shard goes on to the next step as soon as it is done.

    On Ray (the default) model actors load once per step for the whole job and CPU and model steps
    overlap; --executor local runs the steps one after another in this process. Rerunning resumes
    every step where it stopped. --set applies to every step, after the recipe's own settings.
    """
    from pipeline.recipes import load_recipe
    from pipeline.recipes.run import run_recipe

    overrides = [*(set_ or []), *([f"run.executor={executor}"] if executor else [])]
    with _user_errors():
        _log_to_stderr()
        for summary in run_recipe(load_recipe(recipe), source, out, config, overrides, overwrite=overwrite):
            _report_run(summary)


@app.command("config")
def show_config(config: ConfigOption = None, set_: SetOption = None):
    """Print the resolved settings as YAML (a starting point for --config files)."""
    with _user_errors():
        typer.echo(yaml.safe_dump(load_config(config, set_).to_dict(), sort_keys=False), nl=False)
