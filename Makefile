# edgefilter: `make run` serves on the embedded SQLite default, `make test` runs the whole suite,
# `make bench` measures edgefilter against the FastAGI floor (bench/README.md; not part of CI).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
CONFIG ?=
BENCH_SIZES ?= 10000,1000000
BENCH_ARGS ?=

.PHONY: run test lint venv clean bench bench-lists bench-asterisk mutation

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

# With a private PostgreSQL when its server binaries are installed (.ci/with-postgres says so
# in one line when they are not, and the PostgreSQL tests skip). EDGEFILTER_TEST_PG=off: without.
test: lint $(STAMP)
	@.ci/with-postgres $(BIN)/python -m pytest -q

# ruff (pyflakes, pycodestyle, bugbear, pyupgrade, isort) and mypy, configured in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	BENCH_COMMAND="make bench BENCH_SIZES=$(BENCH_SIZES)$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" \
		$(BIN)/python bench/run.py --sizes $(BENCH_SIZES) $(BENCH_ARGS)

# Lists at scale (issue 6): 10M exact numbers + 100k prefixes; not part of CI (minutes, GBs of disk).
bench-lists: $(STAMP)
	$(BIN)/python bench/lists_scale.py

# The whole path through a real Asterisk 22 with sipp (issue 16): no screening, a trivial FastAGI,
# edgefilter bare and through the shipped subroutine; not part of CI (about 13 minutes).
BENCH_ASTERISK_ARGS ?=
bench-asterisk: $(STAMP)
	$(BIN)/python bench/asterisk.py $(BENCH_ASTERISK_ARGS)

# Mutation score of the call-path modules (tools/mutation.py, docs/testing.md): on demand, never
# in CI; stops after 45 min (MUTATION_ARGS="--max-minutes N"); MUTATION_ARGS="--only agi numbers" for a part.
MUTATION_ARGS ?=
$(VENV)/.mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,mutation]'
	touch $@

mutation: $(VENV)/.mutation
	$(BIN)/python tools/mutation.py $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache mutants
