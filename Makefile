PYTHON ?= python3

.PHONY: install demo test test-fast bench

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

demo: install
	$(PYTHON) -m tether demo

test: install
	PYTHON=$(PYTHON) bash scripts/install_browser.sh
	$(PYTHON) -m pytest -q tests

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" tests

bench:
	bash bench/run.sh
