# The whole setup: `make test` and `make demo` create .venv and install what they need, at the
# exact versions in requirements/constraints.txt (`make lock` refreshes that file).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
PIP_INSTALL := $(PY) -m pip install -q -c $(CONSTRAINTS)
# CI's torch and FBGEMM (.ci/run); the lock pins them and the packages they pull in.
TORCH := torch==2.13.0 fbgemm-gpu-cpu==1.8.0
LOCK_VENV := .venv-lock

.PHONY: venv test demo docs bench lint format lock clean

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The tests cover the framework integrations (Flax, Haiku, Equinox, Orbax) and build the docs
# (tests/test_docs.py), so they take all three extras.
$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP_INSTALL) -e ".[test,examples,docs]"
	touch $@

# The API reference imports every module, mx_adagrad.flax included: docs take the examples too.
$(VENV)/.installed-docs: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP_INSTALL) -e ".[docs,examples]"
	touch $@

$(VENV)/.installed-examples: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP_INSTALL) -e ".[examples]"
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

demo: $(VENV)/.installed-examples
	$(PY) examples/flax_digits.py

# The site, from a clean environment (-E), warnings (broken cross-references too) as errors.
docs: $(VENV)/.installed-docs
	$(PY) -m sphinx -W --keep-going -E -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

bench: $(VENV)/.installed-test
	$(PY) benchmarks/run.py --json benchmarks/results/bench.json --png benchmarks/results/bench.png
	$(PY) benchmarks/fused_vs_torch.py --json benchmarks/results/fused_vs_torch.json
	$(PY) benchmarks/scaling.py --json benchmarks/results/scaling.json
	$(PY) benchmarks/sparse_step.py --json benchmarks/results/sparse_step.json
	$(PY) benchmarks/bag_step.py --json benchmarks/results/bag_step.json
	$(PY) benchmarks/family_step.py --json benchmarks/results/family_step.json
	$(PY) benchmarks/sharded_bags.py --json benchmarks/results/sharded_bags.json

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Resolves the newest releases that pyproject.toml allows in a fresh venv and writes their exact
# versions. Local labels are dropped (torch==2.13.0, not 2.13.0+cpu), so a constraint names the
# release and the wheel found on the machine satisfies it.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[test,examples,docs]" "$(TORCH)"
	mkdir -p $(dir $(CONSTRAINTS))
	{ echo "# Exact versions the test suite was run with; made by \`make lock\` with $$($(LOCK_VENV)/bin/python -V)."; \
	  echo "# Used by make test/demo/bench and .ci/run (pip install -c). Users' installs are unpinned."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; \
	} > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info docs/_build
