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

# megatron-core 0.19.2 on Python 3.12 (scripts/setup312.sh): every test that runs Megatron-Core code whose
# behaviour can depend on its version, slow ones included: all of tests/distributed and tests/e2e but what runs
# no version-dependent code beyond what the rest already covers (the torchrun/SLURM launchers, the CLI's argument
# handling, the GPU check's dry run, CPU determinism of torch ops, the stock lm-eval HF path on an export, and
# the 20-kill-point resume: the two other kill/resume tests and PP 2's run here), plus the unit tests of the
# compat layer, config, planner, module math and Megatron's indexed datasets. Left to `make test` (0.16.1)
# only: tests that import no Megatron (Triton kernels, host table, table optimizer, layout, scaling and quality
# analysis, data sources) and the DALI loader (an optional GPU extra installed in the 0.16.1 venv only).
MCORE019_TESTS = tests/distributed tests/e2e --ignore=tests/e2e/test_launch.py --ignore=tests/e2e/test_slurm.py \
	--ignore=tests/e2e/test_cli.py --ignore=tests/e2e/test_gpu_check.py --ignore=tests/e2e/test_determinism.py \
	--deselect=tests/e2e/test_resume.py::test_sigkill_at_20_random_points \
	--deselect=tests/e2e/test_eval.py::test_stock_lm_eval_hf_on_the_export_scores_like_jtok \
	tests/unit/test_megatron_compat.py tests/unit/test_config.py tests/unit/test_plan.py tests/unit/test_jtok_math.py \
	tests/unit/test_data.py
test-mcore019:    ## every Megatron-dependent test on megatron-core 0.19.2 / Python 3.12
	VENV=$$(bash scripts/setup312.sh | tail -1) && $$VENV/bin/python -m pytest -p no:cacheprovider $(MCORE019_TESTS)
