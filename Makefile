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

# pip runs --quiet, so each step first says what it does and about how long it takes (timed on a 2-core CPU
# with the packages in pip's cache; downloading them takes longer, most of all PyTorch's).
$(STAMP): pyproject.toml
	@echo "setting up $(VENV): the venv and an up-to-date pip (a few seconds)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "keeping the PyTorch already in $(VENV)"; else \
		echo "installing PyTorch ($(TORCH_SPEC), CPU build): about 1 min, several minutes when it must be downloaded"; \
		$(PY) -m pip install --quiet "$(TORCH_SPEC)"; fi
	@echo "installing medtune with all its extras and the test tools: about 1 min, longer when downloading"
	@$(PY) -m pip install --quiet -e ".[all,test]"
	@touch $(STAMP)
	@echo "$(VENV) is ready; activate it with: source $(VENV)/bin/activate"

demo: venv
	$(VENV)/bin/medtune demo $(ARGS)

test: venv
	$(PY) -m pytest $(ARGS)

bench: venv
	for script in benchmarks/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
