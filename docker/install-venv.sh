#!/bin/sh
# A virtual environment with relay and its pinned dependencies from the wheels of
# build-wheels.sh and from nothing else (--no-index: no registry is asked, so what runs is
# exactly what was built). The Dockerfile's runtime stage runs this, and so does
# tests/packaging/test_image_layout.py; so can a host that runs relay under systemd.
#   usage: install-venv.sh VENV_DIR WHEEL_DIR        (PYTHON: the interpreter, python3)
set -eu
venv_dir=${1:?usage: install-venv.sh VENV_DIR WHEEL_DIR}
wheel_dir=${2:?usage: install-venv.sh VENV_DIR WHEEL_DIR}
"${PYTHON:-python3}" -m venv "$venv_dir"
"$venv_dir/bin/python" -m pip install --no-cache-dir --no-index --find-links "$wheel_dir" \
    "relay[fast]"
