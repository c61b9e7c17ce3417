# The whole setup: `make test` and `make demo` create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test demo bench lint format clean

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The tests cover the framework integrations (Flax, Haiku, Equinox, Orbax), so they take both extras.
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test,examples]"
	touch $@

$(VENV)/.installed-examples: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[examples]"
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

demo: $(VENV)/.installed-examples
	$(PY) examples/flax_digits.py

bench: $(VENV)/.installed-test
	$(PY) benchmarks/run.py --json benchmarks/results/bench.json --png benchmarks/results/bench.png
	$(PY) benchmarks/fused_vs_torch.py --json benchmarks/results/fused_vs_torch.json
	$(PY) benchmarks/scaling.py --json benchmarks/results/scaling.json
	$(PY) benchmarks/sparse_step.py --json benchmarks/results/sparse_step.json

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
