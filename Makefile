# make install  — .venv with turnflow, the embedded llama-server (built from source, ~8 min once), LiveKit Agents, psycopg and test tools
# make demo     — the main job: a two-persona conversation on the embedded defaults, with the rendered DAG
# make test     — the test suite (real llama-server, real SQLite, real audio)
# make bench    — the quick benchmark against the naive pipeline; `make bench-full` for the full one
# make faults   — the fault suite: kill -9 mid-turn, concurrent rooms, malformed recipes, bad media (figures printed)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install demo test bench bench-full bench-kv overhead faults lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install-system-deps.sh
	./scripts/install-system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[server,bench,dev,agents,postgres,models,whisper,piper]'
	touch $@

demo: install
	./scripts/demo.sh

test: install
	$(BIN)/pytest

bench: install
	$(BIN)/turnflow bench --quick

bench-full: install
	$(BIN)/turnflow bench

bench-kv: install
	$(BIN)/python benchmarks/kv_sweep.py --out docs/bench

HISTORY ?= 100
PROMPT_TOKENS ?= 14000
overhead: install
	$(BIN)/python benchmarks/turn_overhead.py --history $(HISTORY) --prompt-tokens $(PROMPT_TOKENS) \
		--json docs/bench/overhead.json

faults: install
	$(BIN)/python benchmarks/faults.py --json docs/bench/faults.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy turnflow nodes dataflows viz benchmarks

clean:
	rm -rf $(VENV) build bench-runs .pytest_cache
