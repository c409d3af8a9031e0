#!/usr/bin/env bash
# Regenerate requirements/lock.txt: the whole stack (torch pair included) pinned with hashes, for the
# project's machines (x86_64, CPython 3.11). Run after changing dependencies in pyproject.toml.
# pip-tools resolves through pip, so it sees the same indexes as `pip install` here (pip.conf).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv /tmp/anonrisk-piptools && /tmp/anonrisk-piptools/bin/pip install -q "pip-tools==7.6.2"
/tmp/anonrisk-piptools/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras \
  --no-emit-index-url --no-emit-find-links \
  --extra diffusion --extra ray --extra deepspeed --extra slurm --extra test --extra recognizers --extra compel --extra hf \
  -c requirements/cpu.txt -o requirements/lock.txt pyproject.toml
echo "requirements/lock.txt: $(grep -c '^[A-Za-z0-9]' requirements/lock.txt) packages"
