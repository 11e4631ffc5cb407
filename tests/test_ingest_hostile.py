"""A folder of hostile files next to good images, through the real `fgdata ingest` command:
it exits 0, every candidate image file is a row or a reject, every good image is kept, no
traceback, bounded time."""

import io
import json
import os
import random
import re
import stat
import struct
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image
from test_images import png_with_header_size

from pipeline.core.shards import list_shards, read_rejects

pytestmark = pytest.mark.slow

GOOD_FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def encoded(size, fmt, seed) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    image.putpixel((0, 0), (0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def mutated(data: bytes, rng: random.Random) -> bytes:
    """A few random bytes overwritten (header and body alike)."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def dds_header() -> bytes:
    # DDS magic + a 124-byte header whose pixel format no decoder implements
    header = struct.pack("<7I44s", 124, 0x1007, 64, 64, 0, 0, 0, b"") + struct.pack("<2I4s5I", 32, 0x4, b"ZZZZ", 0, 0, 0, 0, 0)
    return b"DDS " + header + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + bytes(64 * 64)


class Folder:
    """Builds the hostile folder and tallies, independently of fgdata, what it holds."""

    def __init__(self, root):
        self.root = root
        self.candidates = 0  # entries with an image suffix: each must become a row or a reject
        self.files = 0  # every entry created, images or not
        self.good: dict[str, bytes] = {}  # key -> bytes of the images that must be kept

    def path(self, relative: str | bytes) -> bytes:
        path = os.path.join(os.fsencode(self.root), os.fsencode(relative))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.files += 1
        name = os.fsdecode(os.path.basename(path)).lower()
        self.candidates += name.endswith((".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"))
        return path

    def write(self, relative: str | bytes, data: bytes | str) -> bytes:
        path = self.path(relative)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return path


# File names a terminal would obey (clear the screen, retitle the window, overwrite the line,
# reverse the text, a one-byte CSI): Ray's workers read them, and nothing of them may reach the
# command's output unescaped.
TERMINAL_NAMES = ["\x1b[2J\x1b]0;title\x07x", "bidi\u202egpj.exe", "cr\rline", "nl\nname", "del\x7fx", "c1\x9bmark", "bell\x07", "tab\tx"]
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def build_hostile_folder(root) -> Folder:
    rng = random.Random(1234)
    folder = Folder(root)
    for i in range(20):
        fmt = GOOD_FORMATS[i % len(GOOD_FORMATS)]
        data = encoded((40 + i, 30 + i), fmt, i)
        folder.write(f"good/img{i:02d}{SUFFIX[fmt]}", data)
        folder.good[f"good/img{i:02d}"] = data
        if i % 2:
            folder.write(f"good/img{i:02d}.txt", f"a good caption {i}")
    jpeg, png, tiff = encoded((64, 48), "JPEG", 1), encoded((64, 48), "PNG", 2), encoded((64, 48), "TIFF", 3)
    for i in range(40):
        folder.write(f"truncated/t{i}.jpg", jpeg[: rng.randrange(2, len(jpeg) - 2)])
    for i in range(30):
        folder.write(f"text/t{i}.jpg", f"this is not an image {i}\n" * (i + 1))
    for i in range(10):
        folder.write(f"empty/e{i}.png", b"")
    for i in range(10):
        folder.write(f"huge/h{i}.png", png_with_header_size(20000 + i, 30000))
    for i in range(10):
        folder.write(f"dds/d{i}.jpg", dds_header())
    for i in range(40):
        folder.write(f"mutated/tiff{i}.tif", mutated(tiff, rng))
        folder.write(f"mutated/png{i}.png", mutated(png, rng))
    for fmt in ("WEBP", "GIF", "BMP"):
        seed = encoded((64, 48), fmt, 4)
        for i in range(10):
            folder.write(f"mutated/{fmt.lower()}{i}{SUFFIX[fmt]}", mutated(seed, rng))
    for i in range(5):
        folder.write(f"small/s{i}.png", encoded((2, 2), "PNG", i))
        folder.write(f"foreign/ico{i}.png", _ico())
    for i in range(10):  # names that are not UTF-8, good and bad content
        folder.write(b"odd/caf\xe9" + str(i).encode() + b".jpg", jpeg if i % 2 else b"\xff\xd8garbage")
        folder.write(b"odd/\xff\xfe" + str(i).encode() + b".txt", b"orphan sidecar")
    for i in range(10):
        os.mkfifo(folder.path(f"fifo/f{i}.jpg"))
    for i in range(10):
        os.symlink(f"nowhere{i}.jpg", folder.path(f"links/broken{i}.jpg"))
    for i in range(5):
        os.symlink(f"loop{i}.jpg", folder.path(f"links/loop{i}.jpg"))
        os.symlink(os.path.join(root, "good", "img00.jpg"), folder.path(f"links/alias{i}.jpg"))  # read through
    os.symlink(os.path.join(root, "good"), folder.path("links/good-folder"))  # a folder link is not entered
    for i in range(10):
        os.makedirs(folder.path(f"dirs/d{i}.jpg"))
        os.makedirs(folder.path(f"dirs/c{i}.txt"))
    for i in range(5):
        folder.write(f"dotted/{i}/.jpg", jpeg)  # a name that is only a suffix
        folder.write(f"cased/UPPER{i}.JPG", jpeg)
        folder.write(f"cased/UPPER{i}.TXT", "an upper-case sidecar")
    sidecars = {
        "nested": "[" * 100_000,
        "deepobj": '{"caption": "x", "meta": ' + "[" * 50_000 + "]" * 50_000 + "}",
        "number": json.dumps({"caption": 42}),
        "list": json.dumps({"caption": ["a"]}),
        "object": json.dumps({"caption": {"a": 1}}),
        "toplist": json.dumps(["a caption"]),
        "bigint": '{"caption": ' + "9" * 5000 + "}",
        "broken": '{"caption": "unterminated',
    }
    for name, text in sidecars.items():
        for i in range(3):
            folder.write(f"sidecars/{name}{i}.jpg", jpeg)
            folder.write(f"sidecars/{name}{i}.json", text)
    for i in range(5):
        folder.write(f"sidecars/dir{i}.jpg", jpeg)
        os.makedirs(folder.path(f"sidecars/dir{i}.txt"))
        folder.write(f"sidecars/fifo{i}.jpg", jpeg)
        os.mkfifo(folder.path(f"sidecars/fifo{i}.txt"))
        folder.write(f"sidecars/latin{i}.jpg", jpeg)
        folder.write(f"sidecars/latin{i}.txt", b"caf\xe9 \xff")
        folder.write(f"sidecars/null{i}.jpg", jpeg)  # a null caption: kept without one
        folder.write(f"sidecars/null{i}.json", json.dumps({"caption": None}))
    folder.write("sidecars/oversized.jpg", jpeg)
    folder.write("sidecars/oversized.txt", "x" * (2 << 20))
    if os.geteuid() == 0:  # only root may create device nodes
        for i in range(3):
            os.mknod(folder.path(f"devices/null{i}.jpg"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    for i, name in enumerate(TERMINAL_NAMES):  # rows or rejects like any other, never printed raw
        folder.write(f"terminal/{name}.jpg", jpeg if i % 2 else b"\x1b[2J not an image \x9b")
        folder.write(f"terminal/{name}.txt", "a dog \x1b[31mred\x1b[0m \u202eon\u202c a mat\rOVERWRITTEN\x9b1m")
    for i in range(10):  # not images: never candidates, never rows
        folder.write(f"other/notes{i}.md", "# notes")
        folder.write(f"other/orphan{i}.txt", "a caption without an image")
    return folder


def _ico() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format="ICO")
    return buffer.getvalue()


def test_a_hostile_folder_ingests_every_good_image_and_rejects_the_rest(tmp_path):
    source, out = tmp_path / "hostile", tmp_path / "out"
    folder = build_hostile_folder(source)
    assert folder.candidates - len(folder.good) >= 300
    started = time.perf_counter()
    settings = ["--set", "run.num_cpus=1", "--set", "run.progress=false", "--set", "ingest.rows_per_shard=100"]
    result = run_cli("ingest", str(source), str(out), *settings, timeout=300)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert not RAW_CONTROL.search(output), [line for line in output.splitlines() if RAW_CONTROL.search(line)]
    rows = [row for shard in list_shards(out) for row in pq.read_table(shard).to_pylist()]
    rejects = read_rejects(out).to_pylist()
    by_reason = Counter(r["reason"] for r in rejects)
    print(
        f"\nhostile folder: {folder.files} entries, {folder.candidates} candidate images -> "
        f"{len(rows)} rows, {len(rejects)} rejects {dict(sorted(by_reason.items()))}, {seconds:.1f}s"
    )
    assert len(rows) + len(rejects) == folder.candidates
    kept = {row["key"]: row["image"] for row in rows}
    assert all(kept.get(key) == data for key, data in folder.good.items()), "a good image was lost"
    assert all(r["reason"] and r["detail"] for r in rejects)
    # what each kind of hostile file became
    reason_of = {r["key"]: r["reason"] for r in rejects}
    assert {reason_of[f"fifo/f{i}"] for i in range(10)} == {"not_a_file"}
    assert {reason_of[f"dirs/d{i}"] for i in range(10)} == {"not_a_file"}
    assert {reason_of[f"links/broken{i}"] for i in range(10)} == {"missing_file"}
    bad_sidecars = ["nested", "deepobj", "number", "list", "object", "toplist", "bigint", "broken", "dir", "fifo", "latin"]
    assert {reason_of[f"sidecars/{name}0"] for name in bad_sidecars} | {reason_of["sidecars/oversized"]} == {"bad_caption_sidecar"}
    assert {reason_of[f"dds/d{i}"] for i in range(10)} <= {"decode_error", "not_an_image", "unsupported_format"}
    read_through = {f"cased/UPPER{i}" for i in range(5)} | {f"dotted/{i}/.jpg" for i in range(5)} | {f"links/alias{i}" for i in range(5)}
    assert read_through | {"odd/caf\\xe91", "sidecars/null0"} <= set(kept)
    assert seconds < 120
