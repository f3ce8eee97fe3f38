"""Everything about the package is in pyproject.toml; this file adds one thing setuptools has no key for: a
``.pth`` file at the top of site-packages that lets the stock ``lm_eval`` command find ``--model jtok``
(``jtok_train/_lm_eval_hook.py`` says why and how). It is written for a wheel and for an editable install, and
pip's uninstall removes it with the rest."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "jtok-train-lm-eval.pth"
# one line (site.py runs .pth lines that start with "import"); quiet when the package is gone (an editable
# install whose source tree moved): no traceback at every interpreter start
PTH_LINE = 'import sys; exec("try:\\n import jtok_train._lm_eval_hook\\nexcept ImportError:\\n pass")\n'


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        # an editable install writes the files that are not the package's sources straight into the wheel it
        # builds, whose root is the install command's install_lib (setuptools >= 64, PEP 660)
        root = self.get_finalized_command("install").install_lib if getattr(self, "editable_mode", False) \
            else self.build_lib
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, PTH_NAME), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


setup(cmdclass={"build_py": BuildPyWithPth})
