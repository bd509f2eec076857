#!/usr/bin/env bash
# The issue's accelerator figures, on a machine that reaches no package registry: this workplace's device
# machines (an H200; Python 3.12 with jax, equinox, optax, orbax-checkpoint, typer and CUDA preinstalled,
# no grain, TFDS or the rest) are lent for ~15 minutes and cannot run `./run.sh main`'s install.
#
#   benchmarks/device_kit.sh missing   what the kit carries: ddpm-eqx's dependencies (as installed in .venv) that
#                                   benchmarks/device_image_packages.txt does not list
#   benchmarks/device_kit.sh pack   here (the project's .venv, a registry, Fashion-MNIST's archives): wheels of
#                                   what the device image lacks and the prepared fashion_mnist train split,
#                                   into .device_kit/ (git-ignored, ~52 MiB; the device tool carries 64 MiB)
#   benchmarks/device_kit.sh run    there, from the repository root, with .device_kit carried: installs the
#                                   wheels beside the image's packages, then `bench_train.py` (bf16, batch 1024,
#                                   the seed's fashion_mnist config: the issue's steps/s and MFU), a short
#                                   `ddpm-eqx train` on the real data (`data_wait`: does the host keep up?)
#                                   and `ddpm-eqx sample` from it; figures and logs into $OUT
#
# The device's JAX is the image's (0.11.x when last read), not constraints.txt's 0.10.2: env.txt records it.
# tests/test_packaging.py checks `missing`. Settings, e.g. for a dry run on a CPU in a venv holding only the
# image's packages (how the kit was tried, benchmarks/RESULTS.md): PYTHON, KIT (the kit's folder), KIT_SITE,
# KIT_BATCH, KIT_STEPS, KIT_BENCH_ARGS, KIT_SET (more --set for both runs), DEVICE_PYTHON (the wheels' Python).
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.device_kit}
IMAGE=benchmarks/device_image_packages.txt
# Left out of the kit besides the image's packages: wandb (the kit's runs log with wandb.mode=disabled, which
# never imports it) and tbb (the caching malloc is for XLA:CPU only), with whatever only they need.
NOT_CARRIED="wandb tbb"

fail() { echo "device_kit: $*" >&2; exit 1; }

missing() {  # the installed ddpm-eqx's dependency closure, less the image's packages and NOT_CARRIED: name==version
  "${PYTHON:-.venv/bin/python}" - "$IMAGE" $NOT_CARRIED <<'EOF'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement


def norm(name: str) -> str:  # names compared as pip does (PEP 503)
    return re.sub(r"[-_.]+", "-", name).lower()


image = {norm(line.strip()) for line in open(sys.argv[1]) if line.strip() and not line.startswith("#")}
skip = {norm(n) for n in sys.argv[2:]}
found: dict[str, str] = {}
todo = ["ddpm-eqx"]
while todo:
    name = norm(todo.pop())
    if name in found or name in skip:
        continue
    dist = md.distribution(name)  # not installed: a missing dependency of this venv, which is an error
    found[name] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
for name in sorted(set(found) - image - {"ddpm-eqx"}):
    print(f"{name}=={found[name]}")
EOF
}

pack() {
  local py=${PYTHON:-.venv/bin/python} pyver=${DEVICE_PYTHON:-3.12} new=$KIT.new
  [ -x "$py" ] || fail "no $py: run ./run.sh test (or set PYTHON) first"
  rm -rf "$new" && mkdir -p "$new/whl" || fail "cannot write $new"
  local tags=() n
  for n in 17 24 27 28; do tags+=(--platform "manylinux_2_${n}_x86_64"); done
  local pins
  pins=$(missing) || fail "could not list ddpm-eqx's dependencies in $py (is the project installed there?)"
  for pin in $pins; do
    if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        "${tags[@]}" --platform manylinux2014_x86_64 -d "$new/whl" "$pin" 2>/dev/null; then
      # Published as a source archive only (promise): a pure-Python wheel built here serves any Python 3.
      "$py" -m pip wheel -q --no-deps -w "$new/whl" "$pin" || fail "no wheel of $pin for Python $pyver"
    fi
  done
  local data_dir=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets} src
  src=$data_dir/fashion_mnist/3.0.1
  if [ ! -f "$src/dataset_info.json" ]; then
    local manual=../shared/data/fashion_mnist
    [ -d "$manual" ] || fail "fashion_mnist is not prepared in $data_dir and $manual is missing"
    "$py" cli.py data prepare fashion_mnist --data-dir "$data_dir" --manual-dir "$manual" || fail "preparing fashion_mnist failed"
  fi
  mkdir -p "$new/tfds/fashion_mnist/3.0.1"
  # The train split only (the test split is read by `ddpm-eqx eval`, not run there): 37 of the split's 42 MiB.
  cp "$src"/dataset_info.json "$src"/features.json "$src"/*.labels.txt "$src"/fashion_mnist-train.array_record-* \
    "$new/tfds/fashion_mnist/3.0.1/" || fail "copying $src failed"
  rm -rf "$KIT" && mv "$new" "$KIT"
  echo "packed $(ls "$KIT/whl" | wc -l) wheels and fashion_mnist's train split: $(du -sh "$KIT" | cut -f1) in $KIT"
  echo "on the device: run(command=\"bash benchmarks/device_kit.sh run\", carry=[\"$KIT\"], timeout_s=540)"
}

run() {
  local py=${PYTHON:-python3} site=${KIT_SITE:-/tmp/ddpm_eqx_site} out=${OUT:-runs/device_kit}
  local batch=${KIT_BATCH:-1024} steps=${KIT_STEPS:-1500} work
  [ -d "$KIT/whl" ] || fail "no $KIT/whl: run 'benchmarks/device_kit.sh pack' here and carry $KIT"
  mkdir -p "$out" || fail "cannot write $out"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$KIT"/whl/*.whl \
    || fail "installing the wheels into $site failed"
  work=$(mktemp -d)
  # One XLA cache for the three runs: the train run reuses the benchmark's compiled step (same config and batch),
  # after the benchmark has timed its compile cold.
  export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TFDS_DATA_DIR=$(realpath "$KIT/tfds") \
    JAX_COMPILATION_CACHE_DIR=$work/xla
  local sets=(--set training.half_precision=true)
  for s in ${KIT_SET:-}; do sets+=(--set "$s"); done
  { date -u; nvidia-smi -L 2>/dev/null
    "$py" -c "import sys, jax, equinox, optax, grain; print(sys.version.split()[0], 'jax', jax.__version__, 'equinox', \
equinox.__version__, 'optax', optax.__version__, 'grain', grain.__version__); print(jax.devices())"; } > "$out/env.txt" 2>&1
  cat "$out/env.txt"
  echo "== bench_train.py, batch $batch ($(date -u +%T))"
  # shellcheck disable=SC2086  # KIT_BENCH_ARGS: words on purpose
  "$py" benchmarks/bench_train.py --config configs/fashion_mnist.py "${sets[@]}" --batch "$batch" ${KIT_BENCH_ARGS:-} \
    --json > "$out/bench.json" 2> "$out/bench.log" || echo "bench_train.py failed (exit $?): see bench.log"
  tail -n 3 "$out/bench.log"
  "$py" -c "import json, sys; d = json.load(open(sys.argv[1])); print(' '.join(f'{k}={d[k]:.4g}' if isinstance(d[k], float)
else f'{k}={d[k]}' for k in sys.argv[2:] if k in d))" "$out/bench.json" device_kind steps_per_s images_per_s mfu compile_s \
    ddpm1000_compile_s ddpm1000_images_per_s ddim50_images_per_s peak_rss_mib 2>/dev/null
  echo "== ddpm-eqx train, $steps steps at batch $batch ($(date -u +%T))"
  "$py" cli.py train --config configs/fashion_mnist.py --workdir "$work/run" "${sets[@]}" --set wandb.mode=disabled \
    --set "data.batch_size=$batch" --set "training.num_train_steps=$steps" --set "training.save_and_sample_every=$steps" \
    > "$out/train.log" 2>&1 || echo "ddpm-eqx train failed (exit $?): see train.log"
  tail -n 3 "$out/train.log"
  cp "$work/run/metrics.jsonl" "$out/" 2>/dev/null && tail -n 1 "$out/metrics.jsonl"
  echo "== ddpm-eqx sample, DDIM-100, 64 images ($(date -u +%T))"
  "$py" cli.py sample --ckpt "$work/run" --num 64 --sampler ddim --steps 100 --out "$out/samples.png" \
    > "$out/sample.log" 2>&1 || echo "ddpm-eqx sample failed (exit $?): see sample.log"
  tail -n 2 "$out/sample.log"
  rm -rf "$work"
  echo "== in $out: $(ls "$out" | tr '\n' ' ') ($(date -u +%T))"
}

case "${1:-}" in
  missing) missing ;;
  pack) pack ;;
  run) run ;;
  *) fail "usage: benchmarks/device_kit.sh missing|pack|run (see the top of this file)" ;;
esac
