# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv. PyTorch is pinned to the CPU build (2.13.0) unless a torch is already in the
# venv: GPU users create .venv and install their CUDA build of torch first (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.medtune-installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[all,test]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/medtune demo $(ARGS)

test: venv
	$(PY) -m pytest $(ARGS)

bench: venv
	for script in benchmarks/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
