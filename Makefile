# `make test` and `make demo` set themselves up: a local .venv with the locked versions
# (requirements/lock.txt) and torch's CPU build. See the README's "Dependency policy".
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: test test-latest test-min demo bench lock clean

$(STAMP): requirements/lock.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

# The whole suite on the newest release of every dependency inside setup.cfg's ranges, in a
# fresh environment; remote code saved there must load under the lock and the reverse.
test-latest: $(STAMP)
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q $(TORCH)
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,train]"
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -iE "^(transformers|accelerate|safetensors|tokenizers|huggingface.hub|datasets|peft|lm.eval)=="
	DIFFUSION_MOE_OTHER_PYTHON=$(CURDIR)/$(PY) .venv-latest/bin/python -m pytest tests

# The smoke tests on the oldest versions setup.cfg declares (requirements/minimum.txt), with
# remote code saved there loaded under the lock and the reverse (5.23 <-> the lock's 5.24).
test-min: $(STAMP)
	rm -rf .venv-min
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/python -m pip install -q $(TORCH)
	.venv-min/bin/python -m pip install -q -r requirements/minimum.txt
	.venv-min/bin/python -m pip install -q --no-deps -e .
	.venv-min/bin/python -m pip check
	DIFFUSION_MOE_OTHER_PYTHON=$(CURDIR)/$(PY) .venv-min/bin/python -m pytest tests -m smoke

demo: $(STAMP)
	$(PY) examples/demo.py --output_dir outputs/demo

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

# Rewrite the lock from the newest releases (after `make test-latest` passed).
lock: test-latest
	head -2 requirements/lock.txt > requirements/lock.new
	.venv-latest/bin/python -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' \
		>> requirements/lock.new
	mv requirements/lock.new requirements/lock.txt

clean:
	rm -rf $(VENV) .venv-latest .venv-min build *.egg-info .pytest_cache .hypothesis
