# jtok-train: the two commands of the README, plus helpers.
.PHONY: setup demo test test-fast test-slow

setup:            ## create .venv and install jtok-train (CPU build of torch)
	bash scripts/setup.sh

demo: setup       ## build the demo data and train tiny MoE + JTok-M on 2 CPU ranks
	bash launch/demo.sh

test: setup       ## the whole test suite (what CI runs)
	.venv/bin/python -m pytest -p no:cacheprovider

test-fast: setup  ## skip the slow end-to-end tests
	.venv/bin/python -m pytest -p no:cacheprovider -m "not slow"
