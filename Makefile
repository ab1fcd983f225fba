# One command each: `make test` (set up .venv if needed, then run the tests) and `make demo`
# (set up .venv if needed, then a real horovodrun training on MNIST-1D).
PY := .venv/bin/python
NP ?= 4
PYTEST_ARGS ?=

.PHONY: env test test-fast demo bench clean-env
env:
	@bash scripts/setup_env.sh

test: env
	@bash scripts/run_tests.sh $(PYTEST_ARGS)

test-fast: env
	@$(PY) -m pytest -q tests/common $(PYTEST_ARGS)

demo: env
	@TF_USE_LEGACY_KERAS=1 .venv/bin/horovodrun -np $(NP) $(PY) examples/pytorch_mnist1d.py $(ARGS)

clean-env:
	rm -rf .venv
