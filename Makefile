# The two commands a newcomer needs (README.md): `make search` and `make test`.
PY ?= python3

.PHONY: install install-test search test test-fast lint

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh --test

search: install
	pxopt search

test: install-test
	$(PY) -m ruff check pxopt tests benchmarks
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check pxopt tests benchmarks
