"""jtok-eval / --model jtok: an lm-eval LM over checkpoints trained by the real CLI, checked against the model's
own log-probabilities, the validation loss and jtok-generate; lm-eval's CLI on demo_cloze end to end."""

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
PROMPT = "The for statement"
CLOZE_LIMIT = 12


def _train(args: list[str]) -> None:
    """The checkpoints these tests read, trained on preloaded ranks (the training command line is test_cli's)."""
    from jtok_train.testing.runs import train_run

    train_run(args)


def _cli(module: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def jtokm_run(small_dataset, tmp_path_factory) -> Path:
    """Tiny MoE + JTok-M, 3 steps, saved."""
    run = tmp_path_factory.mktemp("eval") / "run"
    _train(tiny_overrides(small_dataset, str(run), **{"train.save": "true"}))
    return run


class _Req:
    """What lm-eval hands an LM: an object with .args."""

    def __init__(self, *args):
        self.args = args


def _checks(run: str, cloze_limit: int) -> dict:
    import torch

    from jtok_train.evaluation import JTokLM

    torch.set_num_threads(1)
    lm = JTokLM(checkpoint=run, batch_size=3)
    model, tok, L = lm.loaded.model, lm.tok, lm.max_length
    g = torch.Generator().manual_seed(11)

    def own_logprobs(ids: list[int]) -> torch.Tensor:
        """log p(ids[i+1] | ids[:i+1]) for every i: one unpadded sequence, float64 softmax."""
        t = torch.tensor([ids])
        logits = model(t, torch.arange(len(ids))[None], None)[0].double()
        return torch.log_softmax(logits, -1)[:-1].gather(-1, t[0, 1:, None])[:, 0]

    def text(n: int) -> str:
        return tok.decode(torch.randint(1, tok.vocab_size, (n,), generator=g).tolist())

    out: dict = {}
    # 1. loglikelihood = the sum of the model's own log-probs over the continuation (random texts, lengths
    # that make batches of different widths, one request longer than the sequence length: left-truncated)
    reqs = [(text(int(torch.randint(2, 30, (1,), generator=g))), " " + text(int(torch.randint(1, 8, (1,), generator=g))))
            for _ in range(7)]
    reqs.append((text(3 * L), " " + text(4)))
    got = lm.loglikelihood([_Req(c, x) for c, x in reqs])
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        n_spaces = len(ctx) - len(ctx.rstrip())
        whole = tok.encode(ctx + cont)
        n_ctx = len(tok.encode(ctx[: len(ctx) - n_spaces] if n_spaces else ctx))
        n_cont = len(whole) - n_ctx
        window = whole[-(L + 1):]
        lp = own_logprobs(window)[-n_cont:]
        # fp32 model, batched (padded, other widths) vs one sequence: matmul order differs; a sum of
        # <= 10 log-probs of magnitude ~6 in fp32 carries ~1e-5 of rounding
        assert abs(ll - float(lp.sum())) < 1e-4, (ll, float(lp.sum()))
        t = torch.tensor([window])
        am = model(t, torch.arange(t.shape[1])[None], None)[0, :-1].argmax(-1)[-n_cont:]
        assert greedy == bool((am == t[0, 1:][-n_cont:]).all())
    # a continuation that is the model's own greedy choice is greedy
    ctx_ids = tok.encode(text(10))
    t = torch.tensor([ctx_ids])
    nxt = int(model(t, torch.arange(len(ctx_ids))[None], None)[0, -1].argmax())
    (_, greedy), = lm._loglikelihood_tokens([(("", ""), ctx_ids, [nxt])])
    assert greedy
    out["ll_checked"] = len(reqs)

    # 2. loglikelihood_rolling = -(number of tokens) x the validation loss over the same tokens: the
    # trainer's loss (Megatron's cross entropy from labels, mean over the positions) on the samples the
    # validation set makes of [eod] + document cut into seq_length windows
    # (documents of whole windows: the validation set cuts every seq_length tokens, lm-eval's last window
    # takes as much left context as fits; the two agree when the document is a multiple of seq_length)
    source = tok.encode(Path(json.__file__).read_text())      # real text the tokenizer was not trained on
    for n_windows in (1, 3):
        n = n_windows * L
        offset = next(o for o in range(0, 2000, 7) if tok.encode(tok.decode(source[o: o + n])) == source[o: o + n])
        ids = source[offset: offset + n]
        doc = tok.decode(ids)
        seq = [tok.eod] + ids
        losses = []
        for k in range(0, len(ids), L):
            labels = torch.tensor([seq[k + 1: k + L + 1]])
            tokens = torch.tensor([seq[k: k + labels.shape[1]]])
            per_token = model(tokens, torch.arange(tokens.shape[1])[None], None, labels=labels).float()
            losses.append(per_token.sum())
        valid_loss = float(torch.stack(losses).sum()) / len(ids)
        (rolling,) = lm.loglikelihood_rolling([_Req(doc)])
        # fp32 sums over up to 3 x 64 tokens: rounding ~1e-6 relative
        assert abs(-rolling / len(ids) - valid_loss) < 1e-5 * max(1.0, valid_loss), (rolling, valid_loss)
        out[f"rolling_{n_windows}"] = (-rolling / len(ids), valid_loss)

    # 3. generate_until (greedy, KV cache), batched: the same text as one prompt at a time
    prompts = [PROMPT, text(6), text(6)]
    reqs3 = [_Req(p, {"until": [], "max_gen_toks": 12}) for p in prompts]
    together = lm.generate_until(reqs3)
    alone = [lm.generate_until([r])[0] for r in reqs3]
    assert together == alone
    out["generated"] = together[0]
    # until cuts the text at the first stop string
    if len(together[0]) > 2:
        stop = together[0][1:3]
        (cut,) = lm.generate_until([_Req(PROMPT, {"until": [stop], "max_gen_toks": 12})])
        assert cut == together[0].split(stop)[0]

    # 4. demo_cloze's first documents scored directly: the accuracy lm-eval must report
    rows = [json.loads(line) for line in (Path(__file__).resolve().parents[2] / "jtok_train" / "evaluation" / "tasks" /
                                          "demo_cloze" / "demo_cloze.jsonl").read_text().splitlines()[:cloze_limit]]
    correct = 0
    for r in rows:
        scores = []
        for choice in r["choices"]:
            whole = tok.encode(r["context"] + " " + choice)
            n_ctx = len(tok.encode(r["context"]))
            window = whole[-(L + 1):]
            scores.append(float(own_logprobs(window)[-(len(whole) - n_ctx):].sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == r["label"])
    out["cloze_acc"] = correct / len(rows)
    return out


@pytest.fixture(scope="module")
def checks(jtokm_run) -> dict:
    return run_distributed(_checks, 1, str(jtokm_run), CLOZE_LIMIT, timeout=400, threads_per_rank=1)[0]


def test_loglikelihood_rolling_and_generation_match_the_model(checks):
    assert checks["ll_checked"] == 8
    assert set(checks) >= {"rolling_1", "rolling_3", "generated"}


def test_generate_until_equals_jtok_generate(jtokm_run, checks):
    proc = _cli("jtok_train.cli.generate", f"checkpoint={jtokm_run}", f"prompt={PROMPT}", "max_new_tokens=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == PROMPT + checks["generated"] + "\n"


@pytest.mark.slow
def test_lm_eval_cli_and_jtok_eval_on_demo_cloze(jtokm_run, checks, tmp_path):
    """The stock `lm_eval --model jtok` (no jtok-train import: the installed .pth registers the model),
    jtok-lm-eval (which adds the task directory itself) and jtok-eval: all report the accuracy of the direct
    scoring."""
    from jtok_train.evaluation import TASKS_DIR

    common = ["--model", "jtok", "--model_args", f"checkpoint={jtokm_run}", "--tasks", "demo_cloze",
              "--limit", str(CLOZE_LIMIT), "--batch_size", "4"]
    for name, proc in [
            ("stock", _cli("lm_eval", *common, "--include_path", str(TASKS_DIR),
                           "--output_path", str(tmp_path / "stock"))),
            ("jtok-lm-eval", _cli("jtok_train.evaluation.harness", *common,
                                  "--output_path", str(tmp_path / "jtok-lm-eval")))]:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "demo_cloze" in proc.stdout and "acc" in proc.stdout
        (res_file,) = list((tmp_path / name).rglob("results_*.json"))
        acc = json.loads(res_file.read_text())["results"]["demo_cloze"]["acc,none"]
        assert acc == pytest.approx(checks["cloze_acc"], abs=1e-12), name

    proc = _cli("jtok_train.cli.eval", f"checkpoint={jtokm_run}", "tasks=demo_cloze", f"limit={CLOZE_LIMIT}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = jtokm_run / "eval" / "step_0000003" / f"demo_cloze_limit{CLOZE_LIMIT}.json"
    assert f"results: {out}" in proc.stdout and "acc_norm" in proc.stdout
    res = json.loads(out.read_text())
    assert res["results"]["demo_cloze"]["acc,none"] == pytest.approx(checks["cloze_acc"], abs=1e-12)
    assert res["jtok"]["step"] == 3 and res["jtok"]["jtok"] == "jtokm"


def _samples(out_dir: Path) -> dict[int, list[float]]:
    """doc id -> the log-likelihood of each choice, from lm-eval's --log_samples file."""
    (f,) = list(out_dir.rglob("samples_demo_cloze_*.jsonl"))
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    return {r["doc_id"]: [float(x[0]) for x in r["filtered_resps"]] for r in rows}


@pytest.mark.slow
def test_stock_lm_eval_hf_on_the_export_scores_like_jtok(small_dataset, tmp_path):
    """The plain `lm_eval --model hf` (no jtok-train import) on jtok-export's output: every choice's
    log-likelihood equals `lm_eval --model jtok`'s on the checkpoint within 1e-4 (the exported logits are within 1e-5 of
    Megatron's, tests/e2e/test_export.py; a continuation sums up to ~50 tokens), so the accuracies are the same.
    Sequences of 256 tokens, so that lm-eval's HF model (which refuses a continuation longer than the model) takes
    every demo_cloze item."""
    jtokm_run = tmp_path / "run"
    _train(tiny_overrides(small_dataset, str(jtokm_run), **{"train.save": "true", "model.seq_length": 256}))
    hf_dir = tmp_path / "hf"
    proc = _cli("jtok_train.cli.export", f"checkpoint={jtokm_run}", f"out={hf_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    common = ["--tasks", "demo_cloze", "--limit", str(CLOZE_LIMIT), "--batch_size", "4", "--log_samples"]
    from jtok_train.evaluation import TASKS_DIR

    stock = _cli("lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
                 "--device", "cpu", "--include_path", str(TASKS_DIR), "--output_path", str(tmp_path / "stock"), *common)
    assert stock.returncode == 0, stock.stderr[-3000:]
    ours = _cli("lm_eval", "--model", "jtok", "--model_args", f"checkpoint={jtokm_run}",
                "--include_path", str(TASKS_DIR), "--output_path", str(tmp_path / "jtok"), *common)
    assert ours.returncode == 0, ours.stderr[-3000:]
    a, b = _samples(tmp_path / "stock"), _samples(tmp_path / "jtok")
    assert sorted(a) == sorted(b) == list(range(CLOZE_LIMIT))
    worst = max(abs(x - y) for d in a for x, y in zip(a[d], b[d]))
    assert worst <= 1e-4, worst
    acc = [json.loads(next((tmp_path / d).rglob("results_*.json")).read_text())["results"]["demo_cloze"]
           for d in ("stock", "jtok")]
    assert acc[0]["acc,none"] == acc[1]["acc,none"] and acc[0]["acc_norm,none"] == acc[1]["acc_norm,none"]


def test_bad_input_one_line_exit_2(jtokm_run, tmp_path, capsys):
    from jtok_train.cli.eval import main

    cases = [
        (["tasks=demo_cloze"], "checkpoint= is missing"),
        ([f"checkpoint={jtokm_run}"], "tasks= is missing"),
        ([f"checkpoint={jtokm_run}", "tasks=demo_cloze", "batch_sise=4"], "did you mean batch_size"),
        ([f"checkpoint={jtokm_run}", "tasks=demo_cloze", "limit=-1"], "limit=-1 is invalid"),
        ([f"checkpoint={jtokm_run}", "tasks=demo_cloze", "tables=disk"], "tables=disk is invalid"),
        ([f"checkpoint={jtokm_run}", "tasks=demo_clozee"], "unknown task 'demo_clozee' (did you mean demo_cloze"),
        ([f"checkpoint={tmp_path / 'nowhere'}", "tasks=demo_cloze"], "does not exist"),
    ]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")          # e.g. a Hugging Face directory: not a jtok-train checkpoint
    cases.append(([f"checkpoint={foreign}", "tasks=demo_cloze"], "is neither a checkpoint directory"))
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, (argv, err)


def test_stock_tasks_are_indexed_only_when_asked_for(jtokm_run):
    """demo_cloze resolves without lm-eval's index of its ~15,000 stock task files (seconds in every evaluating
    process); a stock name still resolves, through the full index (which the bad-name cases above built too)."""
    from jtok_train.evaluation.harness import resolve_tasks

    assert set(resolve_tasks(["demo_cloze"]).all_tasks) == {"demo_cloze"}
    both = resolve_tasks(["demo_cloze", "arc_easy"])
    assert {"demo_cloze", "arc_easy", "hellaswag"} <= set(both.all_tasks)


@pytest.mark.slow
def test_tokenizer_mismatch_one_line(jtokm_run, tmp_path):
    from jtok_train.data.tokenizer import train_tokenizer

    other = tmp_path / "other.json"
    train_tokenizer(["another corpus entirely, with other words " * 50, "and more text here " * 40], 300, other)
    proc = _cli("jtok_train.cli.eval", f"checkpoint={jtokm_run}", "tasks=demo_cloze", "limit=2", f"tokenizer={other}")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "differs from the checkpoint's own" in err[0], proc.stderr[-2000:]


def _held_out_vs_megatron(prefix: str, tokenizer: str, cache: str) -> dict:
    from jtok_train.data.datasets import build_datasets
    from jtok_train.data.tokenizer import load_tokenizer
    from jtok_train.evaluation.demo_cloze import held_out_documents

    tok = load_tokenizer(tokenizer)
    _, valid = build_datasets([prefix], tok, seq_length=64, seed=1, train_samples=8, valid_samples=8,
                              split="80,20,0", cache_dir=cache)
    ds = valid.datasets[0] if hasattr(valid, "datasets") else valid
    megatron = [tok.decode([int(t) for t in ds.dataset[int(i)] if int(t) != tok.eod]) for i in ds.indices]
    return {"ours": held_out_documents(prefix, tokenizer, "80,20,0"), "megatron": megatron,
            "first_valid_doc": int(ds.indices[0]), "num_docs": len(ds.dataset)}


def test_demo_cloze_is_built_from_the_validation_documents(small_dataset, tmp_path):
    """The held-out documents are exactly those Megatron's GPTDataset gives the validation split (a 20% split:
    the small test corpus has few documents); items are
    passages of them whose right ending follows the context, wrong endings from other documents."""
    from jtok_train.evaluation.demo_cloze import build_items

    res = run_distributed(_held_out_vs_megatron, 1, small_dataset["prefix"], small_dataset["tokenizer"],
                          str(tmp_path / "cache"), timeout=300)[0]
    assert res["ours"] == res["megatron"] and res["ours"]
    assert res["first_valid_doc"] == round(0.8 * res["num_docs"])
    docs = res["ours"]
    items = build_items(docs, num_items=5, context_words=10, answer_words=3, seed=1)
    assert items == build_items(docs, num_items=5, context_words=10, answer_words=3, seed=1)   # deterministic
    joined = [" ".join(d.split()) for d in docs]
    for it in items:
        assert len(it["choices"]) == 4 and 0 <= it["label"] < 4 and len(set(it["choices"])) == 4
        right = it["context"] + " " + it["choices"][it["label"]]
        owner = [i for i, d in enumerate(joined) if right in d]
        assert owner, it
        for j, wrong in enumerate(it["choices"]):
            if j != it["label"]:
                assert any(wrong in d for i, d in enumerate(joined) if i not in owner), (it, wrong)
