# Two entry points for a fresh clone:
#   make demo   set up, build the demo data and segment it with the shipped demo models
#   make test   set up and run the test suite
#   make study, make results   the ablation and the results table of the README (CPU minutes)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# The demo's settings, chosen on 16 tumour slices of the training split by scripts/ablation.py
# (runs/demo/selection.json; see README): Q = 0.1 T, R = 10, tau = 0, s = 10, a 1-pixel Gaussian blur
# and Otsu over the brain only.
DEMO_FLAGS ?= --noise_level 0.1 --steps 10 --tau 0 --classifier_scale 10 --smooth_sigma 1 --foreground_only True
DEMO_DATA := data/demo/slices/manifest.csv

.PHONY: setup test demo study results

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
		$(DEMO_FLAGS) --batch_size 32 --out_dir runs/demo_seg
	@echo "picture grid: runs/demo_seg/grid.png"

# The ablation of the paper's Fig. 3 on the training split and the settings chosen there (about 15 min)
study: $(VENV)/.installed $(DEMO_DATA)
	$(PY) scripts/ablation.py --models runs/demo --max_images 16 --batch_size 16 --record_steps 1,2,5,10,20,30 \
		--out_dir runs/demo_study

# Every method on the validation split with those settings, beside the paper's Table 1
results: $(VENV)/.installed $(DEMO_DATA)
	$(PY) scripts/demo_results.py --models runs/demo --selection runs/demo_study/selection.json --max_images 108 \
		--out_dir runs/demo_results
