# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/lightningllm
# CPU wheel on these machines; an unpinned torch pulls gigabytes of CUDA packages.
TORCH ?= torch==2.13.0
DEMO_CONFIG ?= configs/pretrain/shakespeare-char.yaml
DEMO_EXPORT ?= runs/shakespeare-char/export
SFT_CONFIG ?= configs/finetune/sft-shakespeare.yaml
CLASSIFY_CONFIG ?= configs/finetune/classify-shakespeare.yaml
HEAD_ONLY := --model.model.transforms='[{class_path: Freeze, init_args: {train: head}}]' --model.optimizer.init_args.lr=1.0e-2

.PHONY: install test test-slow demo finetune-demo lint bench clean

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

# Fine-tuning from the demo export (pretrained first when missing). Classification: random init, head only, then
# full fine-tuning from the export (its checkpoint and export are the ones kept); each run logs the
# majority-class baseline at its start and the held-out accuracy and macro F1 at its end. Instruction tuning:
# exact match of the export before tuning, then after tuning from random init and from the export.
finetune-demo: install $(DEMO_EXPORT)/model.safetensors
	$(CLI) fit --config $(CLASSIFY_CONFIG) --config configs/finetune/from-scratch.yaml --trainer.logger.init_args.name=random-init --overwrite true
	$(CLI) fit --config $(CLASSIFY_CONFIG) $(HEAD_ONLY) --trainer.logger.init_args.name=head-only --overwrite true
	$(CLI) fit --config $(CLASSIFY_CONFIG) --trainer.logger.init_args.name=full --overwrite true
	$(CLI) predict --config $(CLASSIFY_CONFIG) --ckpt_path runs/classify-shakespeare/checkpoints/last.ckpt
	$(CLI) validate --config $(SFT_CONFIG)
	$(CLI) fit --config $(SFT_CONFIG) --config configs/finetune/from-scratch.yaml --trainer.logger.init_args.name=random-init --overwrite true
	$(CLI) fit --config $(SFT_CONFIG) --trainer.logger.init_args.name=pretrained --overwrite true

$(DEMO_EXPORT)/model.safetensors:
	$(CLI) fit --config $(DEMO_CONFIG) --overwrite true

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .cache lightning_logs
