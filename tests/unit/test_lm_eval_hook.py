"""The stock `lm_eval` command knows `--model jtok` without importing jtok-train first: the installed
jtok-train-lm-eval.pth registers a lazy placeholder when lm_eval.models is imported (jtok_train/_lm_eval_hook.py).
The end-to-end run of `python -m lm_eval --model jtok` is tests/e2e/test_eval.py."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")


@pytest.mark.e2e
def test_installed_pth_registers_jtok_lazily_in_a_fresh_interpreter():
    pth = Path(sysconfig.get_paths()["purelib"]) / "jtok-train-lm-eval.pth"
    assert pth.is_file(), f"{pth} is missing: reinstall jtok-train (pip install -e .)"
    line = pth.read_text()
    assert line.startswith("import ") and "import jtok_train._lm_eval_hook" in line and line.count("\n") == 1
    proc = _py("import json, sys\n"
               "from lm_eval.api.registry import get_model, model_registry\n"
               "hf = get_model('hf')\n"                      # lm-eval's own models are all still there
               "before = {m for m in ('torch', 'megatron.core', 'jtok_train.evaluation') if m in sys.modules}\n"
               "known = 'jtok' in model_registry\n"
               "cls = get_model('jtok')\n"
               "print(json.dumps([sorted(before), known, cls.__module__ + ':' + cls.__name__, hf.__name__]))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, known, cls, hf = json.loads(proc.stdout.splitlines()[-1])
    assert known and cls == "jtok_train.evaluation.lm:JTokLM" and hf == "HFLM"
    # registered as a placeholder: none of jtok-train's evaluation code (nor Megatron) ran before get_model
    assert "jtok_train.evaluation" not in before and "megatron.core" not in before, before


@pytest.mark.e2e
def test_importing_jtok_evaluation_first_still_works():
    proc = _py("import jtok_train.evaluation, lm_eval.models\n"
               "from lm_eval.api.registry import get_model\n"
               "print(get_model('jtok').__name__, get_model('hf').__name__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["JTokLM", "HFLM"]


@pytest.mark.e2e
def test_the_wheel_carries_the_pth(tmp_path):
    """A non-editable install gets the same file: it is in the wheel, and in its RECORD (so uninstall removes it)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = tmp_path.glob("jtok_train-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        record = z.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
        assert "import jtok_train._lm_eval_hook" in z.read("jtok-train-lm-eval.pth").decode()
    assert "jtok_train/_lm_eval_hook.py" in names
    assert "jtok-train-lm-eval.pth," in record


def test_a_missing_package_leaves_the_interpreter_quiet(tmp_path):
    """The .pth line of an editable install whose source tree has moved away: no traceback at start-up."""
    import site

    line = (Path(sysconfig.get_paths()["purelib"]) / "jtok-train-lm-eval.pth").read_text()
    (tmp_path / "x.pth").write_text(line)
    proc = _py(f"import sys; sys.modules['jtok_train'] = None; import site; site.addsitedir({str(tmp_path)!r}); "
               "print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok" and proc.stderr == "", proc.stderr
