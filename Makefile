PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo demo-seg venv clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

DEMO ?= demo
SEEDS ?= 0,1,2
# epochs per task of the segmentation demo (the synth preset's 10 take about 15 minutes on 2 cores)
SEG_EPOCHS ?= 3

# The main job end to end: synthetic clips -> signal features -> 4 methods x 3 seeds -> table and plots.
# Every step reuses what an earlier run left in $(DEMO)/ (clips, feature store, finished runs).
demo: $(STAMP)
	@set -e; export PATH="$(abspath $(BIN)):$$PATH"; t0=$$(date +%s); \
	echo "== 1/4 render the synthetic dataset ($(DEMO)/synth)"; \
	avcl-data synth --out $(DEMO)/synth --classes 12 --clips-per-class 20 --seed 0; \
	echo "== 2/4 extract features with the weight-free signal encoder"; \
	avcl-extract --dataset synth --root $(DEMO)/synth --encoder signal --cache-dir $(DEMO)/cache --workers 2; \
	echo "   (pretrained encoders instead: avcl-extract --dataset synth --root $(DEMO)/synth --encoder sam-audio -o clip_seconds=2 --checkpoint /path/to/sam-audio/checkpoint.pt --device cuda)"; \
	store=$$(ls -td $(DEMO)/cache/synth/signal-*.zarr | head -n 1); \
	echo "== 3/4 train on synth-4x3 from $$store"; \
	avcl-train --cache $$store --protocol synth-4x3 --method finetune,ssil,lll,joint --seeds $(SEEDS) \
	    --preset synth --out $(DEMO)/runs --jobs 2; \
	avcl-train --cache $$store --protocol synth-4x3 --method lll --head audio,visual --seeds $(SEEDS) \
	    --preset synth --out $(DEMO)/runs --jobs 2; \
	echo "== 4/4 report"; \
	avcl-report $(DEMO)/runs --out $(DEMO)/report; \
	echo "demo finished in $$(( $$(date +%s) - t0 )) s; plots and tables in $(DEMO)/report/"
	@$(MAKE) --no-print-directory demo-seg

# Segmentation part of the demo: the same clips and store (synth writes the sounding object's
# masks, extraction stores them) -> ATLAS and fine-tuning on synth-seg-cil x 3 seeds -> CL-AVS
# tables, Max-F heatmaps, forward transfer vs forgetting and mask overlays. Steps 1-2 are reused
# when `make demo` ran them already.
demo-seg: $(STAMP)
	@set -e; export PATH="$(abspath $(BIN)):$$PATH"; t0=$$(date +%s); \
	echo "== seg 1/3 synthetic clips with masks and their signal features (reused when present)"; \
	avcl-data synth --out $(DEMO)/synth --classes 12 --clips-per-class 20 --seed 0; \
	avcl-extract --dataset synth --root $(DEMO)/synth --encoder signal --cache-dir $(DEMO)/cache --workers 2; \
	store=$$(ls -td $(DEMO)/cache/synth/signal-*.zarr | head -n 1); \
	echo "== seg 2/3 train atlas and finetune on synth-seg-cil from $$store"; \
	avcl-train --cache $$store --protocol synth-seg-cil --method atlas,finetune --seeds $(SEEDS) \
	    --preset synth --epochs $(SEG_EPOCHS) --out $(DEMO)/runs-seg --jobs 2; \
	echo "== seg 3/3 report"; \
	avcl-report $(DEMO)/runs-seg --out $(DEMO)/report-seg; \
	echo "segmentation demo finished in $$(( $$(date +%s) - t0 )) s; plots and tables in $(DEMO)/report-seg/"

clean:
	rm -rf $(VENV) $(DEMO)
