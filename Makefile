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

# megatron-core 0.19.2 on Python 3.12 (scripts/setup312.sh): one test per journey whose code path runs Megatron
# APIs that changed between 0.16 and 0.19 (checkpoint layout and loading, the distributed optimizer's sharded
# state, DDP and the optimizer, the 1F1B and interleaved schedules, activation recompute, the MoE router's aux
# loss, inference and export of a trained model), in the configurations users run: bf16 + distributed optimizer,
# sharded tables, EP 2, PP 2 x VPP 2, kill and resume. `make test` (0.16.1) runs everything; this list is what
# CI's time allows on top of it (measured: BENCHMARKS.md, "Test suite"), chosen so that every file of
# jtok_train/compat/ and every checkpoint journey runs on both versions.
MCORE019_TESTS = \
	tests/unit/test_megatron_compat.py tests/unit/test_config.py tests/unit/test_data.py \
	tests/distributed/test_compat.py tests/distributed/test_training.py tests/distributed/test_jtokm_aux.py \
	tests/distributed/test_recompute.py tests/distributed/test_pipeline.py \
	tests/distributed/test_checkpoint.py::test_save_on_2_resume_on_1_and_4 \
	tests/distributed/test_checkpoint.py::test_sharded_tables_save_on_2_resume_on_1_and_4 \
	"tests/distributed/test_checkpoint.py::test_bf16_checkpoints_reshard_2_to_4_and_1[bf16-distopt-sharded]" \
	"tests/distributed/test_checkpoint.py::test_bf16_checkpoints_reshard_2_to_4_and_1[bf16-distopt-sharded-ep2]" \
	tests/distributed/test_checkpoint.py::test_distributed_optimizer_fully_reshardable_4_to_2 \
	tests/distributed/test_checkpoint.py::test_interleaved_checkpoints_reshard_vpp2_to_pp1_and_pp1_to_vpp2 \
	tests/distributed/test_checkpoint.py::test_bad_inputs_give_one_line_errors_and_keep_the_checkpoint \
	tests/distributed/test_checkpoint.py::test_resume_with_the_other_optimizer_is_refused_in_one_line \
	tests/distributed/test_checkpoint.py::test_dp_reshardable_checkpoint_at_another_pipeline_size_is_refused \
	"tests/e2e/test_production_matrix.py::test_kill_and_resume_is_bitwise[bf16-distopt-sharded-ep2-full-recompute-sparse]" \
	"tests/e2e/test_production_matrix.py::test_kill_and_resume_is_bitwise[bf16-ddp-sharded-ep2]" \
	tests/e2e/test_production_matrix.py::test_kill_inside_the_checkpoint_writer_keeps_the_previous_checkpoint \
	"tests/e2e/test_resume.py::test_pp2_sigkill_resumes_exactly[pp2_vpp2]" \
	tests/e2e/test_generate.py::test_cli_generates_text \
	"tests/e2e/test_generate.py::test_cli_other_checkpoints[jtokm_moe_pp2_vpp2]" \
	tests/e2e/test_export.py \
	tests/e2e/test_eval.py::test_loglikelihood_rolling_and_generation_match_the_model
test-mcore019:    ## every Megatron-dependent test on megatron-core 0.19.2 / Python 3.12
	VENV=$$(bash scripts/setup312.sh | tail -1) && $$VENV/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) $(MCORE019_TESTS)
