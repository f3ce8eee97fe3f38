# jtok-train: the two commands of the README, plus helpers.
.PHONY: setup demo check test test-fast test-mcore019 docs

setup:            ## create .venv and install jtok-train (CPU build of torch)
	bash scripts/setup.sh

demo: setup       ## build the demo data and train tiny MoE + JTok-M on 2 CPU ranks
	bash launch/demo.sh

test:             ## the whole test suite (what CI runs): make check's tests, then the rest; nothing may be skipped
	bash scripts/setup.sh --test
	bash scripts/test.sh $(PYTEST_ARGS)

check:            ## the fast tier, after every edit (at most 3 min): unit tests + one 2-rank smoke per room
	bash scripts/setup.sh --test-fast
	.venv/bin/python -m pytest -p no:cacheprovider -m check $(PYTEST_ARGS)

test-fast: check  ## the old name of `make check`

docs:             ## the documentation site (docs/, mkdocs.yml) into site/; strict: a broken link or reference fails
	bash scripts/setup.sh --docs
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir site

# megatron-core 0.19.2 on Python 3.12 (scripts/setup312.sh): one test per journey whose code path runs Megatron
# APIs that changed between 0.16 and 0.19 (checkpoint layout and loading, the distributed optimizer's sharded
# state, DDP and the optimizer, the 1F1B and interleaved schedules, activation recompute, the MoE router's aux
# loss, inference and export of a trained model), in the configurations users run: bf16 + distributed optimizer,
# sharded tables, EP 2, PP 2 x VPP 2, kill and resume. `make test` (0.16.1) runs everything; this list is what
# CI's time allows on top of it (measured: BENCHMARKS.md, "Test suite"): every file of jtok_train/compat/ and
# each checkpoint journey once on 0.19 (a second test of the same journey and version-independent variants,
# e.g. other world sizes of a reshard, run on 0.16.1 only).
MCORE019_TESTS = \
	tests/unit/test_megatron_compat.py tests/unit/test_config.py tests/unit/test_data.py \
	tests/distributed/test_compat.py tests/distributed/test_jtokm_aux.py \
	tests/distributed/test_training.py::test_jtok_none_is_megatron_gptmodel_bitwise \
	tests/distributed/test_training.py::test_bf16_tracks_fp32_weights_and_learns_as_much \
	"tests/distributed/test_recompute.py::test_recompute_gives_bitwise_the_same_training[jtokm-extra0]" \
	tests/distributed/test_pipeline.py::test_interleaved_stages_and_full_recompute_with_pp2 \
	"tests/distributed/test_checkpoint.py::test_bf16_checkpoints_reshard_2_to_4_and_1[bf16-distopt-sharded-ep2]" \
	tests/distributed/test_checkpoint.py::test_distributed_optimizer_fully_reshardable_4_to_2 \
	tests/distributed/test_checkpoint.py::test_bad_inputs_give_one_line_errors_and_keep_the_checkpoint \
	tests/distributed/test_checkpoint.py::test_resume_with_the_other_optimizer_is_refused_in_one_line \
	tests/distributed/test_checkpoint.py::test_dp_reshardable_checkpoint_at_another_pipeline_size_is_refused \
	"tests/e2e/test_production_matrix.py::test_kill_and_resume_is_bitwise[bf16-distopt-sharded-ep2-full-recompute-sparse]" \
	tests/e2e/test_production_matrix.py::test_kill_inside_the_checkpoint_writer_keeps_the_previous_checkpoint \
	"tests/e2e/test_resume.py::test_pp2_sigkill_resumes_exactly[pp2_vpp2]" \
	tests/e2e/test_generate.py::test_cli_generates_text \
	"tests/e2e/test_export.py::test_exported_model_matches_megatron[moe_jtokm]" \
	tests/e2e/test_export.py::test_export_bad_input_one_line \
	tests/e2e/test_eval.py::test_loglikelihood_rolling_and_generation_match_the_model \
	tests/distributed/test_hot_rows.py::test_resume_with_another_hot_row_count_and_world_size \
	"tests/distributed/test_scale_lr.py::test_own_scale_lr_resumes_bitwise_in_production_config_and_a_change_is_refused[scales]"
test-mcore019:    ## every Megatron-dependent test on megatron-core 0.19.2 / Python 3.12
	VENV=$$(bash scripts/setup312.sh | tail -1) && $$VENV/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) $(MCORE019_TESTS)
