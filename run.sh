#!/usr/bin/env bash
# The two set-up commands of the README:
#   ./run.sh main   install, prepare Fashion-MNIST, train, then sample from the result
#   ./run.sh test   install, then run the tests (what CI runs)
#   ./run.sh lock   re-resolve constraints.txt: the newest versions pyproject.toml allows, in a scratch venv
#   ./run.sh jax-extra   the jax extra `main` installs for this machine's accelerator (cuda12, tpu; empty: CPU)
# Extra arguments after `main` go to `ddpm-eqx train` (e.g. --set training.num_train_steps=500).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

# The jax extra for this machine's accelerator, which `main` installs besides the package: cuda12 where
# nvidia-smi lists an NVIDIA GPU (CUDA 12 wheels, drivers >= 525), tpu on a TPU VM that shows /dev/accel*,
# nothing on a CPU (plain jax only runs there: without the plugin a GPU goes unused). DDPM_EQX_JAX_EXTRA sets
# it instead (e.g. cuda13 for a CUDA 13 driver, tpu where the VM shows no /dev/accel*, empty for the CPU).
jax_extra() {
  if [ -n "${DDPM_EQX_JAX_EXTRA+set}" ]; then
    echo "$DDPM_EQX_JAX_EXTRA"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo cuda12
  elif compgen -G "/dev/accel*" >/dev/null; then
    echo tpu
  fi
}

install() {  # $1: a jax extra to install too (cuda12, tpu, ...), or nothing
  local extra=()
  if [ -n "${1:-}" ]; then extra=("jax[$1]"); fi
  if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
  # [prepare] brings TensorFlow, which TFDS needs to prepare built-in datasets (reading does not).
  # constraints.txt holds the versions the tests last passed with, so an upstream release cannot change
  # a run (or break CI) between two installs; DDPM_EQX_UNPINNED=1 installs the newest allowed instead.
  local pins=(-c constraints.txt)
  if [ -n "${DDPM_EQX_UNPINNED:-}" ]; then pins=(); fi
  # uv installs the same versions as pip in a quarter of the time (26 s against 1:41 into a fresh venv; 47 s with
  # --compile-bytecode, below); where uv cannot be installed, pip does it. editable_mode=compat: a path in a .pth
  # rather than setuptools' import hook, which type checkers cannot follow (mypy on a user's script found no
  # ddpm_eqx, so no types).
  if "$VENV/bin/pip" install -q uv "${pins[@]}" 2>/dev/null; then
    # --compile-bytecode (pip's default, not uv's): the venv's modules are compiled once here, not by the first
    # process to import them, nor by every process where PYTHONDONTWRITEBYTECODE is set (~3 s a process here).
    "$VENV/bin/python" -m uv pip install -q --python "$VENV/bin/python" -e ".[prepare,test]" --compile-bytecode \
      --config-setting editable_mode=compat ${extra[@]+"${extra[@]}"} ${pins[@]+"${pins[@]}"}
  else
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e ".[prepare,test]" --config-settings editable_mode=compat \
      ${extra[@]+"${extra[@]}"} ${pins[@]+"${pins[@]}"}
  fi
}

link_offline_archives() {
  # TFDS's manual-dir convention: archives here are used instead of downloading. In a folder of fashion_mnist's
  # own (ddpm-eqx reads downloads/manual/<name>/ first): MNIST's archives have the same file names. Links an
  # earlier run.sh made in downloads/manual/ itself are moved there.
  local data_dir=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
  local shared=../shared/data/fashion_mnist
  if [ -d "$shared" ]; then
    mkdir -p "$data_dir/downloads/manual/fashion_mnist"
    for f in "$shared"/*.gz; do
      local old="$data_dir/downloads/manual/$(basename "$f")"
      if [ -L "$old" ] && [ "$(realpath "$old")" = "$(realpath "$f")" ]; then rm "$old"; fi
      ln -sf "$(realpath "$f")" "$data_dir/downloads/manual/fashion_mnist/"
    done
  fi
}

case "${1:-}" in
  main)
    shift
    extra=$(jax_extra)
    if [ -n "$extra" ]; then echo "installing jax[$extra] for this machine's accelerator (DDPM_EQX_JAX_EXTRA overrides)"; fi
    install "$extra"
    link_offline_archives
    if "$VENV/bin/python" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" 2>/dev/null; then
      config=configs/fashion_mnist.py      # an accelerator: the seed's config
    else
      config=configs/fashion_mnist_cpu.py  # CPU only: 9-40 minutes on 2 cores, by CPU (README)
    fi
    # The run folder: runs/fashion_mnist, or the --workdir among the extra arguments (sampled from below too).
    workdir=runs/fashion_mnist
    args=("$@")
    for i in "${!args[@]}"; do
      case "${args[$i]}" in
        --workdir) workdir=${args[$((i + 1))]:-$workdir} ;;
        --workdir=*) workdir=${args[$i]#--workdir=} ;;
      esac
    done
    "$VENV/bin/ddpm-eqx" train --config "$config" --workdir "$workdir" "$@"
    # DDIM's default steps: 100, or all of a model's timesteps when it has fewer (e.g. --set ddpm.timesteps=50).
    "$VENV/bin/ddpm-eqx" sample --ckpt "$workdir" --num 64 --sampler ddim --out "$workdir/final_samples.png"
    ;;
  test)
    install
    "$VENV/bin/mypy"
    "$VENV/bin/python" -m pytest -q
    ;;
  jax-extra)  # what `main` would install besides the package (see jax_extra)
    echo "$(jax_extra)"
    ;;
  lock)
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    VENV=$scratch/venv DDPM_EQX_UNPINNED=1 install
    {
      echo "# The versions ./run.sh installs (-c): resolved by \`./run.sh lock\` on $(date -u +%Y-%m-%d),"
      echo "# Python $("$scratch/venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -s) $(uname -m). After a relock, run ./run.sh test."
      "$scratch/venv/bin/pip" freeze --exclude-editable | grep -v '^-e '
    } > constraints.txt.new
    mv constraints.txt.new constraints.txt
    echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
    ;;
  *)
    echo "usage: ./run.sh main [train flags...] | ./run.sh test | ./run.sh lock | ./run.sh jax-extra" >&2
    exit 2
    ;;
esac
