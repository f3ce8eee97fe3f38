"""jtok-export: checkpoints trained by the real CLI (dense + JTok, MoE + JTok-M) as Hugging Face directories;
AutoModelForCausalLM(trust_remote_code) gives Megatron's logits and jtok-generate's greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jtok_train.testing import run_distributed
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _train(args: list[str]) -> None:
    """The checkpoints these tests read, trained on preloaded ranks (the training command line is test_cli's)."""
    from jtok_train.testing.runs import train_run

    train_run(args)


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jtok_train.cli.export", *args], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(small_dataset, tmp_path_factory) -> dict[str, Path]:
    """MoE + JTok-M and dense + JTok (its scale starts at 0.5, so the gate is no identity), 3 steps each."""
    root = tmp_path_factory.mktemp("export")
    out = {"moe_jtokm": root / "moe", "dense_jtok": root / "dense"}
    _train(tiny_overrides(small_dataset, str(out["moe_jtokm"]), **{"train.save": "true"}))
    _train(tiny_overrides(small_dataset, str(out["dense_jtok"]), dense=True, jtok="jtok",
                          **{"train.save": "true", "jtok.scale_init": "0.5"}))
    return out


def _megatron_logits(lm, ids):
    import torch

    b, s = ids.shape
    return lm.model(ids, torch.arange(s)[None].expand(b, s), None).float()


def _compare(run: str, hf_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jtok_train.data.tokenizer import load_tokenizer
    from jtok_train.inference import generate, load_for_inference

    torch.set_num_threads(1)
    lm = load_for_inference(run, tables="host", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    V, seq = lm.cfg.model.vocab_size, lm.cfg.model.seq_length
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    with torch.no_grad():
        for b, s in ((1, 7), (3, seq)):                  # fresh random ids, up to the full sequence length
            ids = torch.randint(0, V, (b, s), generator=g)
            ref = lm.model(ids, torch.arange(s)[None].expand(b, s), None).float()
            got = hf(ids).logits
            assert got.shape == ref.shape
            # fp32 both sides, the same operations up to the grouping of the attention matmuls and of the
            # residual sums: rounding only (seen: 1.2e-7 here; 4.8e-6 on the demo checkpoint, logits up to ~15)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
            worst = max(worst, float((got - ref).abs().max()))
    tok = load_tokenizer(lm.cfg.data.tokenizer)
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    text = "The for statement iterates over the items of any sequence"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    out = {"max_abs_logit_diff": worst}
    # greedy generation: what jtok-generate runs (KV cache, stop at end-of-document) == HF generate()
    for trial in range(3):
        prompt = torch.randint(1, V, (1, 4 + 3 * trial), generator=g)
        ref = generate(lm.model, prompt, 16, eos_id=tok.eod, provider=lm.provider, vocab_limit=tok.vocab_size,
                       max_sequence_length=seq).tokens[0].tolist()
        got = hf.generate(prompt, max_new_tokens=16, do_sample=False)[0].tolist()
        if tok.eod in ref[prompt.shape[1]:]:                    # both stop at end-of-document
            ref = ref[: ref.index(tok.eod, prompt.shape[1]) + 1]
        assert got == ref, (trial, got, ref)
    # the JTok tables really act in the exported model (no identity): zeroing them moves the logits
    with torch.no_grad():
        hf.model.token_table.zero_()
        moved = float((hf(ids).logits - _megatron_logits(lm, ids)).abs().max())
    assert moved > 1e-3, moved
    out["jtok_effect"] = moved
    return out


def _megatron_logits(lm, ids):
    import torch

    b, s = ids.shape
    return lm.model(ids, torch.arange(s)[None].expand(b, s), None).float()


# Loads the exported tokenizer by its own class in a fresh interpreter whose stdin is no terminal (a question
# about custom code would read an end of file): the class, the ids of the texts, and any remote-code module imported.
_PLAIN_TOKENIZER = """
import json, sys
from transformers import PreTrainedTokenizerFast
tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
print(json.dumps({"class": type(tok).__name__, "eos": [tok.eos_token, tok.eos_token_id],
                  "ids": [tok(t)["input_ids"] for t in json.loads(sys.argv[2])],
                  "remote": sorted(m for m in sys.modules if m.startswith("transformers_modules"))}))
"""


def _check_plain_tokenizer(hf_dir: Path, tokenizer_path: str) -> None:
    """The exported tokenizer is a plain PreTrainedTokenizerFast: it loads with no remote code and no question,
    and encodes fresh text as the project's tokenizer does."""
    from transformers import PreTrainedTokenizerFast

    from jtok_train.data.tokenizer import EOD_TOKEN, load_tokenizer

    texts = ["Tokens, numbers 12345 and \u00fcn\u00efc\u00f6d\u00e9 \u2014 in one line.",
             "  two leading spaces\nand a newline\tand a tab", "def f(x):\n    return x ** 2  # squares"]
    proc = subprocess.run([sys.executable, "-c", _PLAIN_TOKENIZER, str(hf_dir), json.dumps(texts)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom code" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(tokenizer_path)
    assert got["class"] == PreTrainedTokenizerFast.__name__ and got["remote"] == [], got
    assert got["eos"] == [EOD_TOKEN, tok.eod]
    assert got["ids"] == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("kind", ["moe_jtokm", pytest.param("dense_jtok", marks=pytest.mark.check)])
def test_exported_model_matches_megatron(runs, kind, tmp_path, small_dataset):
    run = runs[kind]
    hf_dir = tmp_path / "hf"
    proc = _export_cli(f"checkpoint={run}", f"out={hf_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_jtok.py", "configuration_jtok.py", "tokenizer.json",
            "generation_config.json"} <= files
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["jtok_variant"] == kind.split("_")[1] and (config["num_experts"] is not None) == kind.startswith("moe")
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        shape = f.get_slice("model.token_table").get_shape()
    assert shape == [config["vocab_size"], config["num_hidden_layers"], config["jtok_num_sets"], config["hidden_size"]]
    _check_plain_tokenizer(hf_dir, small_dataset["tokenizer"])
    res = run_distributed(_compare, 1, str(run), str(hf_dir), timeout=400, threads_per_rank=1)[0]
    assert res["max_abs_logit_diff"] <= 1e-5 and res["jtok_effect"] > 1e-3


def test_export_bad_input_one_line(runs, tmp_path, capsys):
    from jtok_train.cli.export import main

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases = [
        ([f"out={tmp_path / 'a'}"], "checkpoint= is missing"),
        ([f"checkpoint={runs['moe_jtokm']}"], "out= is missing"),
        ([f"checkpoint={runs['moe_jtokm']}", f"out={tmp_path / 'a'}", "overwrit=true"], "did you mean overwrite"),
        ([f"checkpoint={tmp_path / 'none'}", f"out={tmp_path / 'a'}"], "does not exist"),
        ([f"checkpoint={runs['moe_jtokm']}", f"out={full}"], "exists and is not empty"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, (argv, err)
