"""The repository's top level as the project card names it, and the seams between its parts: jtok_kernels
(kernels/) stands alone on torch + triton, data/ tracks only its README and recipe, the docker image copies
what the package is built from, the README's Layout section shows the top level."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ["pyproject.toml", "jtok_train", "launch", "kernels", "data", "tests", "docker", "docs", "mkdocs.yml", "README.md"]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


def test_top_level_is_tracked():
    tracked = set(_git("ls-files").stdout.split())
    for name in TOP:
        assert any(f == name or f.startswith(name + "/") for f in tracked), f"{name} is not tracked in git"


def test_data_tracks_its_readme_and_recipe_only():
    for built in ("data/demo/text_document.bin", "data/mine/tokenizer.json", "data/cache/x.npy", "data/web.jsonl"):
        assert _git("check-ignore", "-q", built).returncode == 0, f"{built} would be picked up by git"
    for kept in ("data/README.md", "data/build_demo.sh"):
        assert _git("check-ignore", "-q", kept).returncode == 1, f"{kept} is ignored"
        assert (ROOT / kept).is_file()


@pytest.mark.e2e
def test_kernels_stand_alone_on_torch_and_triton():
    meta = tomllib.loads((ROOT / "kernels" / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "jtok-kernels"
    assert sorted(re.split(r"[<>=; ]", d)[0] for d in meta["dependencies"]) == ["torch", "triton"]
    # imports and runs with jtok-train, Megatron and the config stack unimportable
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"   # jtok-train's lm-eval .pth imports its tiny hook at start-up
        "for m in ('jtok_train', 'megatron', 'hydra', 'omegaconf', 'transformers'): sys.modules[m] = None\n"
        "import torch\n"
        "from jtok_kernels import ops, jtok, jtokm, segment\n"
        "x = torch.randn(6, 8, requires_grad=True)\n"
        "inv = torch.tensor([0, 1, 2, 1, 0, 2])\n"
        "ref = ops.jtok_gate_reference(x, torch.randn(3, 8), inv, torch.full((8,), 0.5), 1e-6)\n"
        "with ops.kernel_backend('triton'):\n"
        "    y = ops.segment_sum(x, inv, 3)\n"
        "torch.testing.assert_close(y, ops.segment_sum_reference(x, inv, 3))\n"
        "assert 'jtok_train' not in {k.split('.')[0] for k, v in sys.modules.items() if v is not None and k not in before}\n"
        "print(ops.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # jtok-train's install carries this very folder (editable: the kernels are edited in place)
    assert Path(proc.stdout.strip()).resolve() == (ROOT / "kernels" / "jtok_kernels" / "ops.py").resolve()


def test_jtok_train_calls_the_kernels_through_one_dispatch_point():
    users = {}
    for f in sorted((ROOT / "jtok_train").rglob("*.py")):
        for m in re.findall(r"^\s*(?:from|import) (jtok_kernels[\w.]*)", f.read_text(), re.M):
            users.setdefault(m, []).append(str(f.relative_to(ROOT)))
    assert set(users) == {"jtok_kernels.ops"}, users


def test_docker_image_copies_what_the_package_is_built_from():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    copied = {src for line in re.findall(r"^COPY (.+)$", dockerfile, re.M) for src in line.split()[:-1]}
    where = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    needed = {"jtok_train"} | {w for w in where if w != "."} | {"launch", "scripts", "pyproject.toml", "setup.py"}
    assert needed <= copied, f"the Dockerfile does not COPY {sorted(needed - copied)}"
    # the Hydra configs are package data (jtok_train/configs/): a plain install carries them
    assert "configs" not in copied and not re.search(r"pip install[^\n]* -e ", dockerfile)
    assert "tomllib" in dockerfile and "pyproject.toml" in dockerfile   # its dependency list is read from pyproject


def test_readme_layout_shows_the_top_level():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 4)]
    for name in TOP:
        assert re.search(rf"^{re.escape(name)}/?\s", layout, re.M), f"README's Layout does not show {name}"


@pytest.mark.e2e
def test_a_run_that_skips_a_test_fails(tmp_path):
    """make test runs everything: a skipped test fails the run (jtok_train.testing.no_skips), unless
    JTOK_ALLOW_SKIPS=1 asks for a partial run."""
    (tmp_path / "none.ini").write_text("[pytest]\n")          # not the project's config: only the plugin
    (tmp_path / "test_x.py").write_text("import pytest\n\ndef test_ok():\n    pass\n\n"
                                        "def test_needs_x():\n    pytest.skip('x is not installed')\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "jtok_train.testing.no_skips",
           "-c", str(tmp_path / "none.ini"), str(tmp_path / "test_x.py")]
    env = {k: v for k, v in os.environ.items() if k != "JTOK_ALLOW_SKIPS"}
    strict = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert strict.returncode == 1, strict.stdout
    assert "1 test(s) skipped, so this run fails" in strict.stdout and "JTOK_ALLOW_SKIPS=1" in strict.stdout
    partial = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env, "JTOK_ALLOW_SKIPS": "1"},
                             cwd=tmp_path)
    assert partial.returncode == 0 and "1 skipped" in partial.stdout, partial.stdout
    (tmp_path / "test_x.py").write_text("def test_ok():\n    pass\n")
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path).returncode == 0
