# Two entry points for a fresh clone:
#   make demo   set up, build the demo data and segment it with the shipped demo models
#   make test   set up and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# tau for the demo, chosen on the training split by scripts/demo_results.py (see README)
DEMO_TAU ?= 0
DEMO_DATA := data/demo/slices/manifest.csv

.PHONY: setup test demo

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

$(DEMO_DATA): | $(VENV)/.installed
	$(PY) scripts/make_demo_data.py --out_dir data/demo

demo: $(VENV)/.installed $(DEMO_DATA)
	$(PY) scripts/image_p_seg.py --method cg-cdm --model_path runs/demo/ddpm/model.pt \
		--classifier_path runs/demo/classifier/model.pt --src_dir data/demo/slices \
		--tau $(DEMO_TAU) --batch_size 32 --out_dir runs/demo_seg
	@echo "picture grid: runs/demo_seg/grid.png"
