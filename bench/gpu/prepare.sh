#!/usr/bin/env bash
# Prepare, on a machine with network (a CPU is enough), what bench/gpu/run.sh needs on the GPU
# machine beyond its image (python3, torch, accelerate, transformers, peft, safetensors, numpy,
# scipy, scikit-learn, tensorboard, rich, tqdm): the wheels in .whl/ (git-ignored, so it must be
# carried), then a check that the working tree plus .whl/ stays under the 64 MiB carry limit.
#
#   bash bench/gpu/prepare.sh     # then: run tool, command "bash bench/gpu/run.sh", carry [".whl"]
#
# Versions are those the tests pass with here. run.sh installs only the wheels whose package the
# image lacks (bench/gpu/install.py), and tries the older diffusers when the newer one does not
# import with the image's huggingface_hub.
set -eu
cd "$(dirname "$0")/../.."
DEST=.whl
LIMIT=$((64 * 1024 * 1024))
WHEELS=(
    diffusers==0.42.1 diffusers==0.35.1   # the matrix's tiny Wan (part 1); pure Python
    importlib_metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0 pillow==13.0.0   # diffusers' imports
    requests==2.34.2 urllib3==2.8.0 idna==3.20 charset_normalizer==3.5.3 certifi==2026.10.19.post1
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0   # part 1 runs pytest
)
mkdir -p "$DEST"
for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEST" "$w"
done
# What travels: the files git would copy (tracked + untracked, not ignored) plus the carried .whl/.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
whl=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
total=$((tree + whl))
printf 'working tree %.1f MiB + %s %.1f MiB = %.1f MiB of the 64 MiB limit\n' \
    "$(echo "$tree / 1048576" | bc -l)" "$DEST" "$(echo "$whl / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt "$LIMIT" ]; then
    echo "over the carry limit: drop wheels from $DEST or large untracked files" >&2
    exit 1
fi
git check-ignore -q "$DEST" && echo "carry: [\"$DEST\"] (git-ignored, so the run tool must be told to carry it)"
