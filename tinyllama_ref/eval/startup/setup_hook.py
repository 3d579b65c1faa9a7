"""A build step (setup.cfg's cmdclass): build_py that also puts the lm-eval start-up hook at the top of
site-packages, tinyllama-ref-lm-eval.pth and the module it imports (see _tinyllama_ref_lm_eval.py for why).

setuptools loads this file by its path at build time, so it imports nothing of tinyllama_ref.
"""

import os

from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ("tinyllama-ref-lm-eval.pth", "_tinyllama_ref_lm_eval.py")


class build_py(_build_py):
    def run(self):
        super().run()
        # A wheel holds build_lib as it is. An editable wheel does not: setuptools' editable_wheel writes the
        # files that stay non-editable straight into the unpacked wheel, which is the install command's
        # install_lib there (editable_wheel._configure_build). data_files cannot do this: they land under
        # .data/data, and editable_wheel skips them altogether.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        for name in FILES:
            self.copy_file(os.path.join(HERE, name), os.path.join(target, name))

    def get_outputs(self, include_bytecode=True):
        ours = [] if self.editable_mode else [os.path.join(self.build_lib, name) for name in FILES]
        return super().get_outputs(include_bytecode) + ours
