# make demo: set up, make the synthetic data set (unless input/ has data), split folds, ...
# make test: set up and run the tests (this is what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo data folds test lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

data: setup
	@if [ -e input/train ] || [ -e input/train.zip ]; then echo "input/ already holds data: keeping it"; \
	else $(BIN)/python -m competition.synthetic --out input/; fi

folds: data
	$(BIN)/python make_folds.py --data-dir input/ --n-folds 5 --seed 42 --out folds/folds.csv

demo: folds

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench.rle_bench
