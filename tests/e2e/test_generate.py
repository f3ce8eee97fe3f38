"""jtok-generate: a checkpoint trained by the real CLI, then generation with Megatron's KV cache and the JTok
tables in host memory, checked against full recompute and against resident tables."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jtok_train.testing import run_distributed
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
PROMPT = "The for statement"


def _train(args: list[str], nproc: int = 1) -> None:
    """The checkpoints these tests read, trained on preloaded ranks (the training command line is test_cli's)."""
    from jtok_train.testing.runs import train_run

    train_run(args, nproc)


def _generate_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jtok_train.cli.generate", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def jtokm_run(small_dataset, tmp_path_factory) -> Path:
    """Tiny MoE + JTok-M, 3 steps, saved (replicated tables, 2 data-parallel ranks)."""
    run = tmp_path_factory.mktemp("gen") / "run"
    _train(tiny_overrides(small_dataset, str(run), **{"train.save": "true"}), 2)
    return run


# -- in one spawned process: load, generate, compare ---------------------------------------------------------
def _checks(run: str) -> dict:
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    from jtok_train.inference import HostTokenTable, SamplingParams, bytes_per_token, filter_logits, generate
    from jtok_train.inference import load_for_inference

    torch.set_num_threads(1)
    host = load_for_inference(run, tables="host")
    dev = load_for_inference(run, tables="device")
    assert isinstance(host.provider, HostTokenTable) and not isinstance(dev.provider, HostTokenTable)
    cfg = host.cfg
    V, L, n_e, d = cfg.model.vocab_size, cfg.model.num_layers, cfg.jtok.num_sets, cfg.model.hidden_size

    # the weights are the trained ones, read straight from the checkpoint files
    raw = {"module.output_layer.weight": torch.empty(V, d), "module.token_table.weight": torch.empty(V, L, n_e, d)}
    dcp_load(raw, storage_reader=FileSystemReader(str(host.path)))
    assert torch.equal(host.unwrapped.output_layer.weight, raw["module.output_layer.weight"])
    assert torch.equal(host.provider.table, raw["module.token_table.weight"])
    assert torch.equal(dev.provider.weight, raw["module.token_table.weight"])

    out: dict = {}
    g = torch.Generator().manual_seed(7)
    for trial in range(3):                     # fresh random prompts of different lengths
        prompt = torch.randint(0, V, (1, 5 + 4 * trial), generator=g)
        n = 12
        cached = generate(host.model, prompt, n, provider=host.provider, return_logits=True)
        full = generate(host.model, prompt, n, use_cache=False, provider=host.provider, return_logits=True)
        resident = generate(dev.model, prompt, n, provider=dev.provider, return_logits=True)
        assert torch.equal(cached.tokens, full.tokens), (trial, cached.tokens, full.tokens)
        assert torch.equal(cached.tokens, resident.tokens), (trial, cached.tokens, resident.tokens)
        for a, b, c in zip(cached.step_logits, full.step_logits, resident.step_logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(a, c, rtol=0, atol=0)
        assert cached.tokens.shape == (1, prompt.shape[1] + n) and cached.decode_steps == n - 1
        # bytes: the prompt's unique ids at prefill, then one id per decode step, each L * n_e * d floats
        row = bytes_per_token(L, n_e, d, torch.float32)
        assert row == L * n_e * d * 4
        expected = (prompt.unique().numel() + (n - 1)) * row
        assert cached.transfer["bytes_to_device"] == expected, (cached.transfer, expected)
        assert cached.transfer["lookups"] == n

    prompt = torch.randint(0, V, (1, 6), generator=g)
    greedy = generate(host.model, prompt, 16, provider=host.provider)
    p = SamplingParams(temperature=1.0, top_k=100, top_p=0.95, seed=3)
    s1 = generate(host.model, prompt, 16, p, provider=host.provider)
    s2 = generate(dev.model, prompt, 16, p, provider=dev.provider)
    s3 = generate(host.model, prompt, 16, SamplingParams(temperature=1.0, top_k=100, top_p=0.95, seed=4),
                  provider=host.provider)
    assert torch.equal(s1.tokens, s2.tokens)             # the same seed: the same draws
    assert not torch.equal(s1.tokens, greedy.tokens)     # sampling from a near-uniform model is not argmax
    assert not torch.equal(s1.tokens, s3.tokens)         # another seed, other draws

    # the filters against a direct reference on random logits
    for _ in range(5):
        logits = torch.randn(3, 50, generator=g) * 3
        k = int(torch.randint(1, 50, (1,), generator=g))
        kept = torch.isfinite(filter_logits(logits, top_k=k))
        assert (kept.sum(-1) == k).all()
        top_p = float(torch.rand(1, generator=g)) * 0.9 + 0.05
        kept = torch.isfinite(filter_logits(logits, top_p=top_p))
        for r in range(3):
            probs = torch.softmax(logits[r], -1)
            order = torch.argsort(probs, descending=True)
            need = int((torch.cumsum(probs[order], 0) < top_p).sum()) + 1   # smallest prefix reaching top_p
            ref = torch.zeros(50, dtype=torch.bool)
            ref[order[:need]] = True
            assert torch.equal(kept[r], ref), (r, top_p)
    from jtok_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    ids = tok.encode(PROMPT)
    res = generate(host.model, torch.tensor([ids]), 12, provider=host.provider, vocab_limit=tok.vocab_size)
    out["greedy_text"] = PROMPT + tok.decode(res.tokens[0, len(ids):].tolist())
    out["ok"] = True
    return out


@pytest.fixture(scope="module")
def checks(jtokm_run) -> dict:
    return run_distributed(_checks, 1, str(jtokm_run), timeout=300, threads_per_rank=1)[0]


@pytest.mark.check
def test_cache_matches_recompute_host_matches_device_and_sampling_is_seeded(checks):
    assert checks["ok"]


def test_cli_generates_text(jtokm_run, checks):
    proc = _generate_cli(f"checkpoint={jtokm_run / 'checkpoints' / 'step_0000003'}", f"prompt={PROMPT}", "max_new_tokens=12", "stats=true",
                         "stop_at_eod=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout.rstrip("\n")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert "decode" in proc.stderr and "tokens/s" in proc.stderr and "bytes of table rows per token" in proc.stderr
    # the command prints what the API generated (greedy) in another process
    assert text == checks["greedy_text"]


def test_cli_bad_input_exits_2_with_one_line(jtokm_run, tmp_path, capsys):
    from jtok_train.cli.generate import main

    # argument errors are caught before anything heavy is imported
    assert main([f"checkpoint={jtokm_run}", "prompt="]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main([f"checkpoint={jtokm_run}", f"prompt={PROMPT}", "temprature=1"]) == 2
    assert main([f"checkpoint={jtokm_run}", f"prompt={PROMPT}", "top_p=0"]) == 2
    assert main([f"checkpoint={jtokm_run}", f"prompt={PROMPT}", "tables=gpu"]) == 2
    # a missing checkpoint, a directory that is not one (refused before any heavy import)
    assert main([f"checkpoint={tmp_path / 'nothing'}", f"prompt={PROMPT}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([f"checkpoint={tmp_path}", f"prompt={PROMPT}"]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err
    # a corrupted checkpoint, through the real command: exit 2, one line, no traceback
    bad = tmp_path / "bad"
    shutil.copytree(jtokm_run / "checkpoints", bad / "checkpoints")
    shard = next((bad / "checkpoints" / "step_0000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = _generate_cli(f"checkpoint={bad}", f"prompt={PROMPT}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "truncated" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _loaded_vs_raw(run: str, out: str) -> dict:
    """Every tensor of the model load_for_inference built (world size 1) against the checkpoint's raw contents
    (its global tensors, read by torch.distributed.checkpoint without any model), bitwise."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from jtok_train.inference import load_for_inference
    from jtok_train.tables.init import row_permutation

    loaded = load_for_inference(run, tables="device")
    dcp_to_torch_save(str(loaded.path), out)
    raw = {k: v for k, v in torch.load(out, weights_only=False).items() if torch.is_tensor(v)}
    model = loaded.unwrapped
    sharded = model.sharded_state_dict(prefix="module.")
    apply_factories(sharded)
    compared = []
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor) or "token_table" in sh.key:
            continue
        pre = sh.prepend_axis_num
        index = tuple(sh.global_offset[:pre]) + tuple(slice(o, o + n) for o, n in zip(sh.global_offset[pre:],
                                                                                      sh.local_shape))
        want = raw[sh.key][index].reshape(sh.data.shape)
        assert torch.equal(sh.data, want.to(sh.data.dtype)), sh.key
        compared.append(sh.key)
    table = getattr(model, "token_table", None)
    if table is not None:
        cfg = loaded.cfg
        if "module.token_table.shard" in raw:     # stored in permuted row order: row q is token perm[q]
            perm = row_permutation(cfg.model.vocab_size, cfg.jtok.table_seed)
            want = torch.empty_like(raw["module.token_table.shard"])
            want[perm] = raw["module.token_table.shard"]
        else:
            want = raw["module.token_table.weight"]
        assert torch.equal(table.weight.detach(), want.to(table.weight.dtype))
        compared.append("token_table")
    return {"compared": compared, "experts": any("experts.experts" in k for k in compared)}


def _loaded_and_generated(run: str, out: str) -> dict:
    """_loaded_vs_raw, and the greedy text of the API with host tables, device tables and without the KV cache
    (the command line's generation, here in one process)."""
    import torch

    from jtok_train.data.tokenizer import load_tokenizer
    from jtok_train.inference import generate, load_for_inference

    res = _loaded_vs_raw(run, out)
    texts = {}
    for tables, cache in (("host", True), ("device", True), ("device", False)):
        m = load_for_inference(run, tables=tables)
        tok = load_tokenizer(m.cfg.data.tokenizer)
        ids = tok.encode(PROMPT)
        g = generate(m.model, torch.tensor([ids]), 10, use_cache=cache, provider=m.provider,
                     vocab_limit=tok.vocab_size)
        texts[f"{tables}{'' if cache else '_nocache'}"] = PROMPT + tok.decode(g.tokens[0, len(ids):].tolist())
    res["texts"] = texts
    return res


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jtok_dense_sharded_2ranks", "jtokm_moe_ep2", "jtokm_moe_pp2_vpp2", "backbone_dense"])
def test_cli_other_checkpoints(small_dataset, tmp_path, kind):
    """Checkpoints saved on 2 ranks (dense JTok with tables sharded over them; MoE + JTok-M with experts split
    over them; MoE + JTok-M, 4 layers in 2 pipeline stages of 2 interleaved model chunks each, every chunk with
    its layers' sharded tables) load at world size 1; the backbone alone generates too. The command line
    (host tables) prints what the API generates with host tables, device tables and without the KV cache."""
    run = tmp_path / "run"
    save = {"train.save": "true"}
    if kind == "jtokm_moe_pp2_vpp2":
        o, n = tiny_overrides(small_dataset, str(run), **save, **{
            "parallel.embedding": "sharded", "parallel.pipeline_model_parallel_size": 2,
            "parallel.virtual_pipeline_model_parallel_size": 2, "model.num_layers": 4}), 2
    elif kind == "backbone_dense":
        o, n = tiny_overrides(small_dataset, str(run), dense=True, jtok="none", **save), 1
    elif kind == "jtokm_moe_ep2":
        o, n = tiny_overrides(small_dataset, str(run), **save, **{"parallel": "ep2"}), 2
    else:
        o, n = tiny_overrides(small_dataset, str(run), dense=True, jtok="jtok", **save, **{
            "parallel.embedding": "sharded", "jtok.scale_init": 0.5}), 2
    _train(o, n)
    proc = _generate_cli(f"checkpoint={run}", f"prompt={PROMPT}", "max_new_tokens=10", "stop_at_eod=false",
                         "stats=true", "tables=host")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(PROMPT)
    got = run_distributed(_loaded_and_generated, 1, str(run), str(tmp_path / "raw.pt"), timeout=600)[0]
    assert got["texts"] == {k: proc.stdout.rstrip("\n") for k in ("host", "device", "device_nocache")}, \
        (got["texts"], proc.stdout)
    assert len(got["compared"]) > 10
    assert ("token_table" in got["compared"]) == (kind != "backbone_dense")
    assert got["experts"] == kind.startswith("jtokm_moe")
