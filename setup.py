"""Only what pyproject.toml cannot say: the start-up hook phi3_jax_lm_eval.pth goes to the root
of the installed tree (site-packages), where Python reads .pth files (see phi3_jax_lm_eval.py)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "phi3_jax_lm_eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
