# The two commands: `make demo` and `make test`. Everything a fresh machine needs is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch and torchvision first, pinned to the builds this machine kind ships on disk.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test soak lint bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

$(VENV)/.torch: $(VENV)/bin/activate
	$(PIP) install --quiet $(TORCH)
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e '.[demo,openclip,webdataset]'
	touch $@

$(VENV)/.dev: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e '.[dev]'
	touch $@ $(VENV)/.demo

demo: $(VENV)/.demo
	$(VENV)/bin/jeststream demo

test: $(VENV)/.dev
	$(VENV)/bin/ruff check jeststream adapters tests benchmarks examples
	$(PY) -m pytest -q

soak: $(VENV)/.dev
	$(PY) -m pytest -q -m soak

bench: $(VENV)/.dev
	$(PY) benchmarks/selection.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/scoring_cost.py

clean:
	rm -rf $(VENV) build dist *.egg-info runs
