# make run   - set everything up, then serve the app on http://localhost:8501
# make test  - set everything up, then run every test
# make bench - speed and memory benchmark, table in results/benchmark.md
# make results - fit and evaluate on ../shared/datasets, tables in results/datasets*.md

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APP_STAMP := $(VENV)/.installed-app
DEV_STAMP := $(VENV)/.installed-dev
PORT ?= 8501

.PHONY: setup setup-dev run test test-fast bench results lint clean

# The app needs requirements.txt alone; tests add the dev tools and the
# optional Ray extra.
setup: $(APP_STAMP)

setup-dev: $(DEV_STAMP)

$(APP_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): $(APP_STAMP) requirements-dev.txt requirements-ray.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt -r requirements-ray.txt
	touch $@

run: setup
	$(VENV)/bin/streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT)

test: setup-dev
	$(PY) -m pytest -q

test-fast: setup-dev
	$(PY) -m pytest -q -m "not e2e and not slow and not ray"

bench: setup-dev
	$(PY) bench/benchmark.py --out results/benchmark.md

results: setup
	$(PY) bench/evaluate_datasets.py --out results/datasets.md
	$(PY) bench/evaluate_datasets.py --first 300 --out results/datasets_first300.md

lint: setup-dev
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
