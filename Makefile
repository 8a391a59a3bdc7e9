# Two entry points for a fresh clone:
#   make demo   set up, build the demo data and segment it with the shipped demo models
#   make test   set up and run the test suite
#   make study, make results, make compare   the ablation, the results table and the whole-scan comparison (CPU minutes)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# The demo model folder runs/demo: its weights, preprocessing and the choice `mask_tuned` of its
# selection.json, made by scripts/ablation.py (`make study`) on the training split and applied, not
# retyped: Q, R, tau, s, the noise draws, the post-processing, the detection threshold and the
# whole-scan decision (see docs/results.md).
DEMO_FLAGS ?= --model_dir runs/demo
# The 11 demo validation subjects segmented as whole scans: only their FLAIR goes in; their *_seg files
# are the --reference, read for the scores alone.
DEMO_SCANS := demo_005 demo_008 demo_016 demo_020 demo_030 demo_035 demo_043 demo_045 demo_053 demo_057 demo_070
DEMO_DATA := data/demo/slices/manifest.csv
# The stress set: 30 subjects at 1 mm taking in turn a typical, a small, three, an edge tumour and none;
# its training split joins the demo's in choosing the whole-scan decision, its validation split reports.
STRESS_DATA := data/stress/slices/manifest.csv

.PHONY: setup test demo study results compare

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
	$(PY) scripts/image_p_seg.py $(DEMO_FLAGS) --src_dir data/demo/slices --batch_size 32 --out_dir runs/demo_seg
	$(PY) scripts/segment_scans.py $(DEMO_FLAGS) --batch_size 64 \
		--input $(foreach s,$(DEMO_SCANS),data/demo/raw/$(s)/$(s)_flair.nii.gz) --reference data/demo/raw \
		--out_dir runs/demo_scans
	@echo "picture grid: runs/demo_seg/grid.png; whole scans: runs/demo_scans/*_overview.png"

$(STRESS_DATA): | $(VENV)/.installed
	$(PY) scripts/make_demo_data.py --profile stress --num_subjects 30 --voxel_size 1 --val_fraction 0.5 \
		--out_dir data/stress

# The ablation of the paper's Fig. 3 on the training split and the settings chosen there, the whole-scan
# decision chosen on the training scans of the demo and of the stress set (about 35 min on 2 cores)
study: $(VENV)/.installed $(DEMO_DATA) $(STRESS_DATA)
	$(PY) scripts/ablation.py --models runs/demo --max_images 16 --batch_size 16 --record_steps 1,2,5,10,20,30 \
		--scan_extra_src_dirs data/stress/slices --out_dir runs/demo_study

# The whole-scan decisions side by side on the validation scans of the demo and of the stress set
compare: $(VENV)/.installed $(DEMO_DATA) $(STRESS_DATA)
	$(PY) scripts/compare_scan_decisions.py --model_dir runs/demo --input data/demo/raw \
		--subjects validation:data/demo/slices --out runs/demo_compare
	$(PY) scripts/compare_scan_decisions.py --model_dir runs/demo --input data/stress/raw \
		--subjects validation:data/stress/slices --out runs/stress_compare

# Every method on the validation split with those settings, beside the paper's Table 1
results: $(VENV)/.installed $(DEMO_DATA)
	$(PY) scripts/demo_results.py --models runs/demo --selection runs/demo_study/selection.json --max_images 108 \
		--out_dir runs/demo_results
