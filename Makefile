# One command each: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both install on first use. A GPU user installs their CUDA torch into .venv first; it is never replaced.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: install test test-slow verify demo demo-quick bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# One pytest worker per core (tests run torch on one thread each; tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -q -n auto

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Coverage studies of `qtm fit` (verification/): 100 seeds per study, ~10-20 min each on one loaded core.
verify: $(STAMP)
	$(PY) -m verification $(VERIFY_ARGS)

demo: $(STAMP)
	$(VENV)/bin/qtm demo

demo-quick: $(STAMP)
	$(VENV)/bin/qtm demo --quick

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
