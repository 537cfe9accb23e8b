#!/usr/bin/env bash
# Every test, from an environment that holds the runtime requirements: installs what the tests need (the
# test-only packages, transformers 4.57.6 into .transformers4/ beside the environment), fetches the
# publishers' files into a cache outside the repository, lints, then runs both pytest passes.
#     python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -r requirements.txt
#     bash tests/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt -r tests/requirements.txt
# --upgrade: a second run replaces the folder instead of warning that it exists
python -m pip install -q --upgrade --no-deps --target .transformers4 -r tests/requirements-transformers4.txt
python tests/fetch_real_files.py
python -m ruff check --select F,E9 .
# Two workers, each test module whole on one (its module fixtures built once), the modules with slow tests
# first (tests/conftest.py), one torch thread each (torch's default, a thread per core, would have 4
# threads contend for 2 cores).
export OMP_NUM_THREADS=1
workers="-n 2 --dist loadfile --no-loadscope-reorder"
# the whole suite against transformers 5 (today's release)
python -m pytest -q $workers tests
# the model and tokenizer parity modules again, against transformers 4.57.6
PYTHONPATH=.transformers4 python -m pytest -q $workers tests/test_model.py tests/test_data.py tests/test_bpe.py
