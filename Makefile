# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/lightningllm
# CPU wheel on these machines; an unpinned torch pulls gigabytes of CUDA packages.
TORCH ?= torch==2.13.0
DEMO_CONFIG ?= configs/pretrain/shakespeare-char.yaml
DEMO_EXPORT ?= runs/shakespeare-char/export

.PHONY: install test test-slow demo lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -n 2 --durations=15

test-slow: install
	$(PY) -m pytest -n 2 -m slow

demo: install
	$(CLI) fit --config $(DEMO_CONFIG) --overwrite true
	$(CLI) generate $(DEMO_EXPORT) --prompt "ROMEO:" --max_new_tokens 300 --temperature 0.8 --top_k 40

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .cache lightning_logs
