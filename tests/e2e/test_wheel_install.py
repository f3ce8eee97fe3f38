"""A plain (non-editable) install of jtok-train's wheel runs jtok-train: the Hydra configs are package data
(jtok_train/configs/), found with no repository around and no JTOK_CONFIG_DIR; JTOK_CONFIG_DIR and Hydra's
--config-dir still point it at the user's own configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "jtok_train" / "configs"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel, installed without dependencies into a fresh venv that sees this venv's dependencies (a .pth
    naming its site-packages: none of its .pth files run, so not the editable install of the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("jtok_train-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_jtok_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           "-q", str(whl)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("JTOK_CONFIG_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    work = tmp / "elsewhere"          # outside the repository: nothing found relative to the working directory
    work.mkdir()
    return {"whl": whl, "venv": venv, "py": py, "site": Path(site), "env": env, "cwd": work}


def _run(inst: dict, *cmd: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=300, cwd=inst["cwd"],
                          env={**inst["env"], **env})


def test_wheel_records_the_configs(installed):
    with zipfile.ZipFile(installed["whl"]) as z:
        record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()
    listed = {line.split(",")[0] for line in record.splitlines()}
    shipped = {f"jtok_train/configs/{p.relative_to(CONFIGS).as_posix()}" for p in CONFIGS.rglob("*.yaml")}
    assert "jtok_train/configs/config.yaml" in shipped and "jtok_train/configs/model/tiny.yaml" in shipped
    assert shipped <= listed, sorted(shipped - listed)


def test_installed_package_finds_its_configs(installed):
    proc = _run(installed, str(installed["py"]), "-c",
                "import jtok_train\nfrom jtok_train.config import compose, config_dir\n"
                "print(jtok_train.__file__)\nprint(config_dir())\nprint(compose(['model=tiny_dense']).model.name)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkg, cdir, name = proc.stdout.splitlines()[-3:]
    site = installed["site"].resolve()
    assert Path(pkg).resolve().is_relative_to(site), pkg           # the wheel's copy, not the repository's
    assert Path(cdir).resolve() == site / "jtok_train" / "configs"
    assert name == "tiny_dense"


def test_jtok_train_composes_tiny_from_the_wheel(installed):
    proc = _run(installed, str(installed["venv"] / "bin" / "jtok-train"), "model=tiny", "jtok=none", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    tiny = yaml.safe_load((CONFIGS / "model" / "tiny.yaml").read_text())
    assert cfg["model"]["name"] == "tiny" and cfg["model"]["num_layers"] == 4 == tiny["num_layers"]
    assert cfg["model"]["hidden_size"] == tiny["hidden_size"] and cfg["model"]["num_experts"] == tiny["num_experts"]
    assert cfg["jtok"]["variant"] == "none"


def test_own_configs_by_config_dir_and_env(installed, tmp_path):
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    model = yaml.safe_load((CONFIGS / "model" / "tiny.yaml").read_text())
    (mine / "model" / "mine.yaml").write_text(yaml.safe_dump({**model, "name": "mine", "num_layers": 2}))
    exe = str(installed["venv"] / "bin" / "jtok-train")
    # --config-dir: searched first, the package's configs still there for every other group
    proc = _run(installed, exe, "--config-dir", str(mine), "model=mine", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["name"] == "mine" and cfg["model"]["num_layers"] == 2 and cfg["jtok"]["variant"] == "jtokm"
    # JTOK_CONFIG_DIR: replaces the package's configs (a copy of them, edited)
    copy = tmp_path / "copy"
    shutil.copytree(CONFIGS, copy)
    (copy / "model" / "tiny.yaml").write_text(yaml.safe_dump({**model, "num_layers": 3}))
    proc = _run(installed, exe, "model=tiny", "--cfg", "job", JTOK_CONFIG_DIR=str(copy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load(proc.stdout)["model"]["num_layers"] == 3
    proc = _run(installed, exe, "model=tiny", "--cfg", "job", JTOK_CONFIG_DIR=str(mine))   # no config.yaml
    assert proc.returncode != 0 and str(mine) in proc.stderr and "JTOK_CONFIG_DIR" in proc.stderr, proc.stderr[-2000:]
