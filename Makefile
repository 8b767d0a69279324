# The two commands: `make demo` and `make test`. Everything a fresh machine needs is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch and torchvision first, pinned to the builds this machine kind ships on disk.
TORCH  := torch==2.14.1 torchvision==0.29.1

# webdataset 1.x beside the 0.2.86 that open_clip_train pins: a light overlay on .venv
# (webdataset 1.0.2 alone in its own venv, ahead of .venv's site-packages on sys.path, which a
# .pth file adds with its own .pth files, the editable install's among them: no second copy of
# torch), in which `make test-wds1` runs the webdataset tests.
WDS1_VENV := build/venv-wds1
WDS1_PY   := $(WDS1_VENV)/bin/python
WDS1      := webdataset==1.0.2

.PHONY: demo test test-fast test-wds1 browser soak lint bench clean

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

test: $(VENV)/.dev browser
	$(VENV)/bin/ruff check jeststream adapters tests benchmarks examples
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-wds1

# The loop to live in while changing code: everything but the slow and soak tests (make test,
# which CI runs, has them all).
test-fast: $(VENV)/.dev
	$(VENV)/bin/ruff check jeststream adapters tests benchmarks examples
	$(PY) -m pytest -q -m "not slow and not soak"

$(WDS1_VENV)/.ready: $(VENV)/.dev
	rm -rf $(WDS1_VENV)
	$(PY) -m venv --without-pip $(WDS1_VENV)
	$(PIP) install --quiet --no-deps --target $(WDS1_VENV)/wds1 '$(WDS1)'
	$(PY) -c 'import site, sys, pathlib; v = pathlib.Path(sys.argv[1]).resolve(); \
	  sp = next(v.glob("lib/python*/site-packages")); \
	  (sp / "jeststream-overlay.pth").write_text(str(v / "wds1") + "\nimport site; " + \
	  "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()) + "\n")' $(WDS1_VENV)
	$(WDS1_PY) -c 'import torch, webdataset, sys; v = webdataset.__version__; \
	  sys.exit(0 if v.startswith("1.") else f"webdataset {v} in $(WDS1_VENV), expected 1.x")'
	touch $@

test-wds1: $(WDS1_VENV)/.ready
	$(WDS1_PY) -m pytest -q tests/test_adapters_webdataset.py tests/test_user_pipelines.py

# Headless Chromium for the browser test of `jeststream report` (tests/test_report.py): Debian's
# package, installed when no Chromium/Chrome is on PATH and apt-get can be run as root. Best
# effort: when it can't be installed, build/browser-unavailable says why and that test skips
# with that reason (without the file it fails, so a browser that should be there is never
# silently missing).
browser:
	@mkdir -p build; rm -f build/browser-unavailable; \
	for b in chromium chromium-browser google-chrome google-chrome-stable; do \
		command -v $$b >/dev/null 2>&1 && exit 0; done; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "no apt-get to install chromium with" > build/browser-unavailable; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "apt-get needs root to install chromium (uid $$(id -u))" > build/browser-unavailable; \
	else \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium; } || \
		echo "apt-get install chromium failed" > build/browser-unavailable; \
	fi; \
	[ ! -f build/browser-unavailable ] || echo "browser test will skip: $$(cat build/browser-unavailable)"

soak: $(VENV)/.dev
	$(PY) -m pytest -q -m soak

bench: $(VENV)/.dev
	$(PY) benchmarks/selection.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/scoring_cost.py

clean:
	rm -rf $(VENV) build dist *.egg-info runs
