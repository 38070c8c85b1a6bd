#!/bin/sh
# Wheels of relay and of every dependency pyproject.toml pins, uvloop (the "fast" extra)
# included: pip resolves the pins from pyproject.toml itself, so the image has no second
# list of versions to drift from it. The Dockerfile's build stage runs this, and so does
# tests/packaging/test_image_layout.py.
#   usage: build-wheels.sh SOURCE_DIR WHEEL_DIR      (PYTHON: the interpreter, python3)
set -eu
source_dir=${1:?usage: build-wheels.sh SOURCE_DIR WHEEL_DIR}
wheel_dir=${2:?usage: build-wheels.sh SOURCE_DIR WHEEL_DIR}
"${PYTHON:-python3}" -m pip wheel --wheel-dir "$wheel_dir" "${source_dir}[fast]"
