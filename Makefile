# Every target does its own set-up: the venv is created once and reused (torch is large),
# and re-synced only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.modstream-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test-tools run review demo test lint typecheck unit bench bench-stream bench-review ablate stack-up stack-down clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

# The whole pipeline on this machine: Kafka + Redis, default model, media server, producer, worker.
run: venv
	$(VENV)/bin/modstream run

# `make run`, then the review console on its stack with a demo reviewer (password printed once),
# the posts' images served, until Ctrl-C.
review: venv
	$(VENV)/bin/modstream run --review

# Offline only (no Kafka): classify the bundled sample posts.
demo: venv
	$(VENV)/bin/modstream demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

# Debian packages the tests need, installed once: Chromium (browser tests), redis-server,
# prometheus (promtool for the alert-rule tests).
test-tools:
	bash deploy/test-tools.sh

unit: venv test-tools
	$(PY) -m pytest -q --durations=30 tests

test: lint typecheck unit

bench: venv
	$(PY) bench/forward_throughput.py

bench-stream: venv
	$(PY) bench/stream_throughput.py

# The human loop: review sink (topic -> Redis) and review API (decisions/s); each starts its own stack.
bench-review: venv
	$(PY) bench/review_sink_throughput.py
	$(PY) bench/review_api_throughput.py

stack-up:
	bash deploy/local-stack.sh start

stack-down:
	bash deploy/local-stack.sh stop

ablate: venv
	$(VENV)/bin/modstream ablate --preset cm-off-meme --out var/ablation

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
