#!/usr/bin/env bash
# Downloads, into .whl/ (git ignores it), the wheels that the lent GPU machine lacks for sfgrpo, for its
# Python 3.12 on x86-64: the packages setup.py needs that its image does not hold, and theirs. jax, flax,
# optax, orbax-checkpoint, einops, transformers, numpy, pillow and matplotlib are the image's own (jax 0.11
# with its CUDA plugin, too large to carry). launch/device_credit.sh installs these with --no-deps.
#
#   bash launch/device_wheels.sh        # here, with network; then carry .whl in the device call
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
python=${PYTHON:-python3}
# Pinned to the versions this project's CPU environment runs and tests with.
binary=(
  ml-collections==1.1.0 tensorflow-datasets==4.9.10 array-record==0.8.6 grain==0.2.18
  tensorboardX==2.6.5 dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9
  docstring-parser==0.18.0 tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2 portpicker==1.6.0
  googleapis-common-protos==1.76.0
)
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$dest" "${binary[@]}"
# promise (a tensorflow-datasets dependency) is published as source only: build its pure-Python wheel here.
"$python" -m pip wheel --quiet --no-deps -w "$dest" promise==2.3
echo "wheels in $dest ($(du -sh "$dest" | cut -f1)):"
ls "$dest"
