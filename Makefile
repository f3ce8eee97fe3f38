# jtok-train: the two commands of the README, plus helpers.
.PHONY: setup demo test test-fast test-slow test-mcore019

setup:            ## create .venv and install jtok-train (CPU build of torch)
	bash scripts/setup.sh

demo: setup       ## build the demo data and train tiny MoE + JTok-M on 2 CPU ranks
	bash launch/demo.sh

test: setup       ## the whole test suite (what CI runs)
	.venv/bin/python -m pytest -p no:cacheprovider

test-fast: setup  ## skip the slow end-to-end tests
	.venv/bin/python -m pytest -p no:cacheprovider -m "not slow"

# megatron-core 0.19.2 on Python 3.12 (scripts/setup312.sh): the checkpoint, training, sharded-table, recompute,
# resume, generation, compat and config tests (their fast part; `make test` runs everything on 0.16.1)
MCORE019_TESTS = tests/distributed/test_checkpoint.py tests/distributed/test_training.py \
	tests/distributed/test_sharded_table.py tests/distributed/test_recompute.py tests/e2e/test_resume.py \
	tests/e2e/test_generate.py tests/unit/test_megatron_compat.py tests/unit/test_config.py
test-mcore019:    ## the suite's core on megatron-core 0.19.2 / Python 3.12
	VENV=$$(bash scripts/setup312.sh | tail -1) && $$VENV/bin/python -m pytest -p no:cacheprovider -m "not slow" $(MCORE019_TESTS)
