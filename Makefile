# edgefilter: `make run` serves on the embedded SQLite default, `make test` runs the whole suite,
# `make bench` measures edgefilter against the FastAGI floor (bench/README.md; not part of CI).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
CONFIG ?=
BENCH_SIZES ?= 10000,1000000
BENCH_ARGS ?=

.PHONY: run test venv clean bench bench-lists

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	mkdir -p var
	$(BIN)/edgefilter serve $(if $(CONFIG),--config $(CONFIG))

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	BENCH_COMMAND="make bench BENCH_SIZES=$(BENCH_SIZES)$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" \
		$(BIN)/python bench/run.py --sizes $(BENCH_SIZES) $(BENCH_ARGS)

# Lists at scale (issue 6): 10M exact numbers + 100k prefixes; not part of CI (minutes, GBs of disk).
bench-lists: $(STAMP)
	$(BIN)/python bench/lists_scale.py

clean:
	rm -rf $(VENV) var .pytest_cache
