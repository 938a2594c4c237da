#!/usr/bin/env bash
# The wheels scripts/gpu_proof.py needs on a GPU machine that has torch and transformers but not
# diffusers, torchao or the small packages flux-day imports, written to .whl/ (git-ignored; carried
# to the device with the working tree). About 30 MB; see README, "GPU proof".
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
download() { python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$@"; }
download diffusers==0.42.1 importlib_metadata==8.7.0 zipp==3.23.0
# torchao 0.18.0 is the release flux-day pins (its own check accepts torch >= 2.11); 0.17.0 was built
# against torch 2.11 and is the fallback the device command installs if 0.18.0 does not import.
download torchao==0.18.0
download torchao==0.17.0
download requests==2.34.2 urllib3==2.5.0 idna==3.10 certifi==2025.8.3
download --platform any --implementation py --python-version 3.12 charset_normalizer==3.4.3
for python in 3.11 3.12 3.13; do  # Pillow 13 has no wheel for 3.10, and flux-day needs 3.11+
    download --python-version "$python" --platform manylinux_2_28_x86_64 pillow==13.0.0
done
du -sh .whl && ls .whl
