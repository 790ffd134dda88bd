# The two quick-start commands; both set up .venv on first use (scripts/install.sh).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: run test install

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/llmstack pipeline --config configs/tiny/pipeline.yaml

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
