#!/usr/bin/env bash
# Wheels to carry to an accelerator machine that has jax, flax, optax, orbax-checkpoint, numpy, absl,
# etils, pillow and tokenizers but cannot reach a package index, for
# `python -m pargo_jax.benchmarks.accelerator` (docs/guide/accelerators.md). Downloads into .whl/
# (ignored through .git/info/exclude) for CPython 3.12 on manylinux x86_64:
#
#   ml_collections   configs (experiments.base, the model factory)             pure python
#   clu              the training step's metrics (pargo_jax.metrics)           pure python
#   grain, array_record, tensorflow-datasets and the dependencies the machine lacks (portpicker,
#   dm-tree, immutabledict, promise, simple-parsing, docstring-parser, tensorflow-metadata,
#   googleapis-common-protos, termcolor, toml): the input pipeline part         11 MB in all
#
# Each is pinned and downloaded without its dependencies (the machine has the rest: numpy, protobuf,
# pyarrow, psutil, requests, six, wrapt, cloudpickle). promise ships no wheel: it is built here from
# its source (pure python). Checked on CPython 3.12 with jax 0.11.2 + flax 0.12.12. On the machine:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
#
#   launch/device_wheels.sh [--python_version 3.12] [--dest .whl]
set -euo pipefail
py=3.12 dest=.whl
while (($#)); do
  case $1 in
    --python_version) py=$2; shift ;;
    --dest) dest=$2; shift ;;
    *) sed -n '2,18p' "$0" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
WHEELS=(ml_collections==1.1.0 clu==0.0.12 grain==0.2.18 array_record==0.8.6 tensorflow-datasets==4.9.10
        portpicker==1.6.0 dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0
        tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2)
mkdir -p "$dest"
for w in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$w"
done
python3 -m pip wheel -q --no-deps -w "$dest" promise==2.3  # source only on PyPI; pure python
grep -qsx '/.whl/' .git/info/exclude || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
ls -l "$dest"
