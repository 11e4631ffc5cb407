# fgdata: `make demo` runs the pipeline on the bundled sample, `make test` runs the tests.
# Both create .venv on first use (torch first, from the pinned pair, then fgdata itself).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fgdata-installed
DATA ?= sample/images
OUT ?= out/demo
PYTEST_ARGS ?=

.PHONY: setup demo ingest phrases recaption ground negatives tiny-vlm tiny-clip tiny-nli test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch before anything that depends on it, or pip pulls another multi-GB build from the index
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(STAMP)

ingest: setup
	$(BIN)/fgdata ingest $(DATA) $(OUT)/images --set ingest.rows_per_shard=8

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

negatives: ground $(if $(filter $(TINY_NLI),$(NLI_MODEL)),tiny-nli)
	$(BIN)/fgdata negatives $(OUT)/regions $(OUT)/fggrn --set negatives.nli_model=$(NLI_MODEL) \
		--set negatives.backend=$(NEG_BACKEND) $(if $(NEG_MODEL),--set negatives.model=$(NEG_MODEL))
	$(BIN)/fgdata export fgclip $(OUT)/fggrn $(OUT)/fgclip

demo: negatives recaption
	@echo
	@echo "== what the demo wrote =="
	$(BIN)/fgdata info $(OUT)/images
	$(BIN)/fgdata info $(OUT)/phrases
	$(BIN)/fgdata info $(OUT)/regions
	$(BIN)/fgdata info $(OUT)/fggrn
	$(BIN)/fgdata info $(OUT)/captions

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf out .pytest_cache
