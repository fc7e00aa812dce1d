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
SFT_EXPORT ?= runs/sft-shakespeare/export
RLHF := runs/rlhf
DPO_LOSSES ?= dpo cdpo robust ipo hinge orpo simpo kto
LABEL_PROMPTS ?= 600
# $(call timed,NAME,COMMAND): run COMMAND and append "NAME seconds" to the wall times the scores table reads.
# One DPO run per loss, each in its own folder (inside the recipe's loop over $$loss); ORPO and SimPO are
# reference-free, KTO reads the pairs as unpaired desirable/undesirable replies, cDPO and robust DPO assume 10% flips.
DPO_RUN = --model.loss=$$loss --trainer.default_root_dir=$(RLHF)/dpo-$$loss \
	--trainer.logger.init_args.save_dir=$(RLHF)/dpo-$$loss \
	--trainer.callbacks='[{class_path: lightningllm.callbacks.Export, init_args: {dirpath: $(RLHF)/dpo-'$$loss'/export}}]' \
	$$(case $$loss in (cdpo|robust) echo --model.label_smoothing=0.1;; (orpo|simpo) echo --model.reference=null;; \
	(kto) echo --data.unpaired=true;; esac)
# PPO rewarded by the judge itself instead of the reward model (the same algorithm, without a learnt reward to exploit).
PPO_JUDGE_RUN = --model.reward_model=null '--model.judge={class_path: lightningllm_plugins.judge.speaker.SpeakerJudge}' \
	--trainer.default_root_dir=$(RLHF)/ppo-judge --trainer.logger.init_args.save_dir=$(RLHF)/ppo-judge \
	--trainer.callbacks='[{class_path: lightningllm.callbacks.Export, init_args: {dirpath: $(RLHF)/ppo-judge/export}}]'
timed = s=$$(date +%s) && $(2) && echo "$(1) $$(($$(date +%s) - s))" >> $(RLHF)/wall.txt
HEAD_ONLY := --model.model.transforms='[{class_path: Freeze, init_args: {train: head}}]' --model.optimizer.init_args.lr=1.0e-2

.PHONY: install test test-slow demo finetune-demo rlhf-demo lint bench clean

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
	$(PY) benchmarks/evaluate_exports.py pretrained=$(DEMO_EXPORT) sft=$(SFT_EXPORT) --out runs/sft-shakespeare/evaluation.md

# Alignment from the instruction-tuned export (docs/rlhf-demo.md): SpeakerJudge labels pairs of the SFT model's
# replies; a reward model and DPO (one run per loss) learn from them; PPO against the reward model; GRPO against
# the judge itself; then every policy against the SFT model on the questions of the held-out plays.
# Labels sample among the 10 likeliest tokens: a special token (<mask>) in a reply decodes to 6 characters and
# would push the pair past the context of the reward model and DPO.
rlhf-demo: install $(SFT_EXPORT)/model.safetensors
	mkdir -p $(RLHF) && : > $(RLHF)/wall.txt
	$(call timed,label,$(CLI) label $(SFT_EXPORT) --prompts shakespeare --template chat --judge SpeakerJudge --k 4 \
		--max_new_tokens 16 --top_k 10 --max_prompts $(LABEL_PROMPTS) --batch_size 128 --out $(RLHF)/preferences.jsonl --overwrite true)
	$(call timed,reward-model,$(CLI) fit --config configs/rlhf/reward-model.yaml --overwrite true)
	for loss in $(DPO_LOSSES); do \
		$(call timed,dpo-$$loss,$(CLI) fit --config configs/rlhf/dpo.yaml $(DPO_RUN) --overwrite true) || exit 1; \
	done
	$(call timed,ppo,$(CLI) fit --config configs/rlhf/ppo.yaml --overwrite true)
	$(call timed,ppo-judge,$(CLI) fit --config configs/rlhf/ppo.yaml $(PPO_JUDGE_RUN) --overwrite true)
	$(call timed,grpo,$(CLI) fit --config configs/rlhf/grpo.yaml --overwrite true)
	$(PY) benchmarks/rlhf_scores.py $(foreach loss,$(DPO_LOSSES),dpo-$(loss)=$(RLHF)/dpo-$(loss)/export) \
		ppo=$(RLHF)/ppo/export ppo-judge=$(RLHF)/ppo-judge/export grpo=$(RLHF)/grpo/export --reference $(SFT_EXPORT) --wall $(RLHF)/wall.txt \
		--prompts 150 --k 4 --examples 2 --out $(RLHF)/scores.md
	$(PY) benchmarks/evaluate_exports.py sft=$(SFT_EXPORT) $(foreach loss,$(DPO_LOSSES),dpo-$(loss)=$(RLHF)/dpo-$(loss)/export) \
		ppo=$(RLHF)/ppo/export ppo-judge=$(RLHF)/ppo-judge/export grpo=$(RLHF)/grpo/export --out $(RLHF)/evaluation.md

$(SFT_EXPORT)/model.safetensors: $(DEMO_EXPORT)/model.safetensors
	$(CLI) fit --config $(SFT_CONFIG) --overwrite true

$(DEMO_EXPORT)/model.safetensors:
	$(CLI) fit --config $(DEMO_CONFIG) --overwrite true

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .cache lightning_logs
