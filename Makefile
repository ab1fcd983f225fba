# One command each: `make test` (set up .venv if needed, then run the tests) and `make demo`
# (set up .venv if needed, then a real horovodrun training on MNIST-1D).
PY := .venv/bin/python
NP ?= 4
PYTEST_ARGS ?=

.PHONY: env test test-fast test-stress demo bench clean-env
env:
	@bash scripts/setup_env.sh

test: env
	@bash scripts/run_tests.sh $(PYTEST_ARGS)

# what shows up now and then, repeated: a plain shutdown or exit after the last step (ten
# runs each), the Elastic 2 -> 3 -> 2 recovery (five jobs); and the TensorFlow world sizes
# that make test leaves to the core and PyTorch (robustness at P = 5, the tape at P = 4, the
# collective at P = 2, Horovod's own tests re-written at P = 3); hierarchical gTop-k on the
# emulated layouts make test leaves out (PyTorch 2 x 2, 3 x 2, 4 x 2; TensorFlow 2 x 3, 3 x 2,
# 4 x 2)
test-stress: env
	@GTOPK_TEST_STRESS=1 GTOPK_TEST_REPEAT=10 GTOPK_TEST_ELASTIC_REPEAT=5 bash scripts/run_tests.sh \
		tests/torch/test_torch_robustness.py \
		tests/torch/test_torch_elastic.py::test_killing_the_worker_that_joined_2_3_2_recovers_within_10_s \
		tests/tensorflow/test_tf_robustness.py tests/tensorflow/test_tf_training.py \
		tests/tensorflow/test_tf_collective.py tests/tensorflow/test_tf_horovod_parity.py \
		tests/torch/test_torch_hierarchical.py tests/tensorflow/test_tf_hierarchical.py $(PYTEST_ARGS)

test-fast: env
	@$(PY) -m pytest -q tests/common $(PYTEST_ARGS)

demo: env
	@TF_USE_LEGACY_KERAS=1 .venv/bin/horovodrun -np $(NP) $(PY) examples/pytorch_mnist1d.py $(ARGS)

# benchmarks/README.md: the emulated-cluster benchmarks (root for network namespaces; about
# 45-60 min on 2 cores), each also runnable alone
bench: env
	@$(PY) benchmarks/bench_collective.py --fresh --selection
	@TF_USE_LEGACY_KERAS=1 $(PY) benchmarks/bench_end_to_end.py --frameworks torch,tf
	@$(PY) benchmarks/bench_convergence.py

clean-env:
	rm -rf .venv
