"""The wheel's build step for relay's one C module, the DATA byte scanner.

`pip install .` and the container image's wheel get `relay/_wirescan.c` compiled into the
wheel (which is then tagged for this interpreter and platform), so an installed relay runs
the scanner `make` builds for a checkout. Without a C compiler, or with
RELAY_PURE_PYTHON=1, the wheel stays pure Python and `relay.wire` uses its Python twin: the
same answers, slower. Editable installs (`make`) leave the module to the Makefile.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = "relay/_wirescan.c"


class ScannerBuildHook(BuildHookInterface[BuilderConfig]):
    PLUGIN_NAME = "custom"
    _scratch = ""  # where the module was compiled, removed once the wheel is written

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        if os.environ.get("RELAY_PURE_PYTHON") == "1":
            self.app.display_info("RELAY_PURE_PYTHON=1: the DATA scanner stays in Python")
            return
        compiler = shlex.split(os.environ.get("CC", "cc"))  # "ccache gcc" is a compiler too
        if not compiler or shutil.which(compiler[0]) is None:
            self.app.display_warning("no C compiler: the DATA scanner stays in Python")
            return
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        self._scratch = tempfile.mkdtemp(prefix="relay-wirescan-")
        built = Path(self._scratch) / f"_wirescan{suffix}"
        command = [
            *compiler,
            "-O3",
            "-Wall",
            "-shared",
            "-fPIC",
            f"-I{sysconfig.get_paths()['include']}",
            str(Path(self.root) / SOURCE),
            "-o",
            str(built),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.app.display_warning(
                f"{SOURCE} did not compile, the DATA scanner stays in Python:\n{done.stderr}"
            )
            return
        build_data["force_include"][str(built)] = f"relay/_wirescan{suffix}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
