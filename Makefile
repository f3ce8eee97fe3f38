# jtok-train: the two commands of the README, plus helpers.
.PHONY: setup demo test test-fast test-slow test-mcore019

setup:            ## create .venv and install jtok-train (CPU build of torch)
	bash scripts/setup.sh

demo: setup       ## build the demo data and train tiny MoE + JTok-M on 2 CPU ranks
	bash launch/demo.sh

test:             ## the whole test suite (what CI runs); nothing may be skipped (JTOK_ALLOW_SKIPS=1 allows it)
	bash scripts/setup.sh --test
	.venv/bin/python -m pytest -p no:cacheprovider

test-fast:        ## skip the slow end-to-end tests
	bash scripts/setup.sh --test-fast
	.venv/bin/python -m pytest -p no:cacheprovider -m "not slow"

# megatron-core 0.19.2 on Python 3.12 (scripts/setup312.sh): every test that runs Megatron-Core, slow ones included:
# all of tests/distributed and tests/e2e but the launchers (torchrun/SLURM scripts: their training is the code
# the other e2e tests run), and the unit tests of the compat layer, config, planner, module math and the data
# pipeline (Megatron's indexed datasets). Left to `make test` (0.16.1) only: tests that import no Megatron
# (Triton kernels, host table, table optimizer, scaling and quality analysis) and the DALI loader (an optional
# GPU extra installed in the 0.16.1 venv only).
MCORE019_TESTS = tests/distributed tests/e2e --ignore=tests/e2e/test_launch.py --ignore=tests/e2e/test_slurm.py \
	tests/unit/test_megatron_compat.py tests/unit/test_config.py tests/unit/test_plan.py tests/unit/test_jtok_math.py \
	tests/unit/test_data.py tests/unit/test_data_sources.py
test-mcore019:    ## every Megatron-dependent test on megatron-core 0.19.2 / Python 3.12
	VENV=$$(bash scripts/setup312.sh | tail -1) && $$VENV/bin/python -m pytest -p no:cacheprovider $(MCORE019_TESTS)
