# `make test` and `make demo` set themselves up: a local .venv with the locked versions
# (requirements.lock, the lock: every package pinned) and torch's CPU build. See the README's "Dependency policy".
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: test test-latest test-min demo bench lock clean mutate

$(STAMP): requirements.lock setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.lock
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
	head -3 requirements.lock > requirements.new
	.venv-latest/bin/python -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' \
		>> requirements.new
	mv requirements.new requirements.lock

# Mutation testing (README, "Tests") of the routing, loss and denoising modules with the fast tests
# that cover them (setup.cfg's [mutmut]). mutmut 3 imports the mutated code from mutants/src (or
# mutants/) and names modules by their path, so the repository-root-is-the-package layout cannot
# be mutated in place: this stages a copy as src/diffusion_moe/ + tests/ in $(MUTATE_DIR) (the
# working tree's files, mtimes kept) and runs mutmut there. Results are cached in
# $(MUTATE_DIR)/mutants, so a rerun (or `make mutate MUTANTS='diffusion_moe.generation.*'`) resumes;
# `rm -rf $(MUTATE_DIR)` starts over. `cd $(MUTATE_DIR) && mutmut show NAME` prints a mutant. All ~2000
# mutants take hours on 2 cores: select with MUTANTS (names or globs).
MUTATE_DIR ?= build/mutate
MUTATE_JOBS ?= 2
MUTANTS ?=
mutate: $(STAMP)
	mkdir -p $(MUTATE_DIR)/src/diffusion_moe
	git ls-files -co --exclude-standard -- . ':!:tests' | while read -r f; do test -e "$$f" && echo "$$f"; done \
		| tar -cf - -T - | tar -xf - -C $(MUTATE_DIR)/src/diffusion_moe
	rm -rf $(MUTATE_DIR)/tests && cp -rp tests setup.cfg $(MUTATE_DIR)/
	cd $(MUTATE_DIR) && OMP_NUM_THREADS=1 $(CURDIR)/$(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	cd $(MUTATE_DIR) && $(CURDIR)/$(VENV)/bin/mutmut results | { grep -v ': not checked$$' || true; }

clean:
	rm -rf $(VENV) .venv-latest .venv-min build *.egg-info .pytest_cache .hypothesis
