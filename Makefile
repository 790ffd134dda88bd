# The two quick-start commands; both set up .venv on first use (scripts/install.sh).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: run test install

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/llmstack pretrain --config configs/tiny/pretrain.yaml
	$(VENV)/bin/llmstack sft --config configs/tiny/sft.yaml
	$(VENV)/bin/llmstack reward --config configs/tiny/reward.yaml
	$(VENV)/bin/llmstack ppo --config configs/tiny/ppo.yaml

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
