"""Makes the stock ``lm_eval`` command (and lm-eval's Python API) know ``--model jtok``.

lm-eval 0.4 fills its model registry from a fixed table when ``lm_eval.models`` is imported and reads no package
entry points, so an installed package cannot add a model name to it. jtok-train's wheel therefore ships a
one-line ``jtok-train-lm-eval.pth`` (written by ``setup.py``) that imports this module at interpreter start-up.
It imports nothing heavy: it puts one finder on ``sys.meta_path`` that does nothing until ``lm_eval.models`` is
imported, and then registers ``jtok`` as a lazy placeholder (``jtok_train.evaluation.lm:JTokLM``, the way
lm-eval registers its own models), so torch, Megatron and jtok-train's evaluation code load only when
``--model jtok`` is asked for. Checked on lm-eval 0.4.13 (``lm_eval.api.registry.model_registry``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

MODEL_NAME = "jtok"
TARGET = "jtok_train.evaluation.lm:JTokLM"


def register() -> None:
    """Add ``jtok`` to lm-eval's model registry unless something (``import jtok_train.evaluation``) did."""
    # lazy: cost (lm_eval, 0.1 s: this module runs at every interpreter's start-up, before lm_eval is asked for)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _RegisterAfterLmEvalModels(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``lm_eval.models`` is being imported it lets the other finders find it and
    runs :func:`register` right after the module has run (it has filled the registry then)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # once, and so that the lookup below does not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            try:
                register()
            except Exception as e:  # lm-eval changed its registry: say so, never break lm_eval itself
                print(f"jtok-train: could not register lm-eval model '{MODEL_NAME}' ({e}); "
                      "use jtok-lm-eval instead of lm_eval", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterLmEvalModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLmEvalModels())


install()
