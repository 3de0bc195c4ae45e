# Set-up and entry points. Every target creates or reuses .venv first.
#   make demo       train briefly on the bundled real sample, evaluate, predict
#   make test       unit tests, then the notebooks (papermill)
#   make notebooks  only the notebooks
# TORCH_SPEC chooses the torch build, e.g. TORCH_SPEC="torch==2.13.0" (CPU wheel)
# or a CUDA build with --index-url in PIP_TORCH_ARGS.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
DEMO_OUT ?= runs/demo
DATA ?= sample_data/openkbp
PY := $(VENV)/bin/python

.PHONY: venv demo test unit notebooks bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(PY) -m pip install --quiet -e ".[notebooks,test,bench]"
	touch $@

demo: venv
	$(PY) -m hurmacl_kit train --data $(DATA) --out $(DEMO_OUT) --preset demo
	$(PY) -m hurmacl_kit evaluate --checkpoint $(DEMO_OUT)/checkpoint.pt --data $(DATA) --out $(DEMO_OUT) --split test
	$(PY) -m hurmacl_kit predict --checkpoint $(DEMO_OUT)/checkpoint.pt \
		--input $(DATA)/imagesTr/pt_247_0000.nii.gz \
		--labels-out $(DEMO_OUT)/predict/pt_247_labels.nii.gz \
		--uncertainty-out $(DEMO_OUT)/predict/pt_247_uncertainty.nii.gz

test: unit notebooks

unit: venv
	$(PY) -m pytest tests

notebooks: venv
	$(PY) notebooks/run_all.py

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs notebooks/executed
