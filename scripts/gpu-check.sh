#!/usr/bin/env bash
# The GPU path, checked in one run: the device, the fixture parity tests on the GPU backend
# (forward, attention, loss, the four official training steps, mixed precision), every command
# through the real binary compared with the CPU, then the speed against PyTorch when it is there.
#
#   scripts/gpu-check.sh [--no-bench] [wgpu|vulkan]
#                                          build (target/<backend>/) and check; default wgpu;
#                                          --no-bench: the tests only (what .ci/run runs)
#   scripts/gpu-check.sh --bundle DIR [wgpu|vulkan]
#                                          build here, then pack the binary, the parity tests, the
#                                          fixtures and this script into DIR/gpu-check.tar.xz
#                                          (~45 MB) for a GPU machine without cargo or network
#   tar xJf gpu-check.tar.xz -C /tmp/g && /tmp/g/gpu-check.sh [wgpu|vulkan]
#                                          on that machine: parity, a short training run and the
#                                          speed, with the packed files
#
# Any Vulkan device works, software Vulkan included (Debian: apt-get install mesa-vulkan-drivers
# libvulkan1, which gives lavapipe). Prints a summary; the log is in $GPU_CHECK_OUT (default
# target/gpu-check/).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bundle=""
bench=1
while [[ "${1:-}" == --* ]]; do
    case "$1" in
        --bundle) bundle="$2"; shift 2 ;;
        --no-bench) bench=0; shift ;;
        *) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
    esac
done
backend="${1:-wgpu}"
case "$backend" in
    wgpu | vulkan) ;;
    *) echo "gpu-check: unknown backend '$backend' (wgpu or vulkan)" >&2; exit 2 ;;
esac
# The Vulkan loader and Mesa want a runtime directory; a container often has none.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

if [[ -f "$here/dino" ]]; then
    # A packed bundle: the binaries are beside this script, the fixtures in ./fixtures.
    root="$here"
    dino="$here/dino"
    parity=("$here"/parity-*)
    export DINO_REFERENCE_DIR="$here/fixtures/dino-reference"
    export DINO_RESNET_REFERENCE_DIR="$here/fixtures/resnet-reference"
else
    root="$(cd "$here/.." && pwd)"
    cd "$root"
    export CARGO_TARGET_DIR="$root/target/$backend"
    features="dino-cli/$backend,dino-fixtures/$backend"
    packages=(-p dino-model -p dino-train -p dino-cli)
    cargo=(cargo)
    if [[ "$backend" == vulkan ]]; then
        # burn's SPIR-V compiler (cubecl-spirv 0.11.3) emits invalid shared memory where the driver
        # lacks explicit workgroup layouts (lavapipe): build with a copy of the crate patched by
        # scripts/cubecl-spirv-shared-memory.patch. The patch entry changes Cargo.lock's
        # cubecl-spirv source; the lock is put back when the script ends.
        cargo fetch -q
        spirv="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cubecl-spirv-0.11.3 | head -1)"
        patched="$CARGO_TARGET_DIR/cubecl-spirv-0.11.3-patched"
        if [[ ! -f "$patched/.patched" ]]; then
            rm -rf "$patched" && mkdir -p "$CARGO_TARGET_DIR" && cp -r "$spirv" "$patched"
            patch -d "$patched" -p1 <"$here/cubecl-spirv-shared-memory.patch"
            touch "$patched/.patched"
        fi
        cp Cargo.lock "$CARGO_TARGET_DIR/Cargo.lock.main"
        trap 'cp "$CARGO_TARGET_DIR/Cargo.lock.main" "$root/Cargo.lock"' EXIT
        cargo=(cargo --config "patch.crates-io.cubecl-spirv.path=\"$patched\"")
    fi
    echo "== build (--features $features, into $CARGO_TARGET_DIR)"
    "${cargo[@]}" build --release -p dino-cli --features "dino-cli/$backend"
    "${cargo[@]}" test --release --no-run "${packages[@]}" --features "$features" 2>&1 | tail -3
    dino="$CARGO_TARGET_DIR/release/dino"
    mapfile -t parity < <("${cargo[@]}" test --release --no-run "${packages[@]}" --features "$features" \
        --test parity --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
fi

if [[ -n "$bundle" ]]; then
    pack="$(mktemp -d)"
    mkdir -p "$pack/fixtures" "$bundle"
    strip -o "$pack/dino" "$dino"
    for t in "${parity[@]}"; do
        strip -o "$pack/$(basename "$t")" "$t"
    done
    cp -r "$root/fixtures/dino-reference" "$root/fixtures/resnet-reference" "$pack/fixtures/"
    cp "$root/scripts/gpu-check.sh" "$pack/"
    for r in "$root/shared/bench/torch_reference.py" "$root/../shared/bench/torch_reference.py"; do
        [[ -f "$r" ]] && cp "$r" "$pack/" && break
    done
    tar cJf "$bundle/gpu-check.tar.xz" -C "$pack" .
    rm -rf "$pack"
    ls -la "$bundle/gpu-check.tar.xz"
    echo "packed: on the GPU machine, tar xJf gpu-check.tar.xz -C DIR && DIR/gpu-check.sh $backend"
    exit 0
fi

out="${GPU_CHECK_OUT:-$root/target/gpu-check}"
mkdir -p "$out"
log="$out/gpu-check.log"
: >"$log"
step() { echo "== $*" | tee -a "$log"; }

step "device"
{
    date -u
    uname -srm
    grep -m1 "model name" /proc/cpuinfo || true
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    command -v vulkaninfo >/dev/null && vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverInfo|apiVersion"
    "$dino" --version
} 2>&1 | tee -a "$log"

# Autotuning times every candidate kernel of each new shape, in each process; the tests check
# arithmetic, not speed, and software Vulkan is slow: the least tuning for them.
tests_env=(env DINO_TEST_DEVICE="$backend" CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}")

step "parity on $backend (DINO_TEST_DEVICE=$backend)"
for t in "${parity[@]}"; do
    "${tests_env[@]}" "$t" --test-threads 1 --nocapture 2>&1 | tee -a "$log" | grep -E "rel err|^test |test result"
done

if [[ -z "${DINO_REFERENCE_DIR:-}" ]]; then
    step "every command on $backend, compared with the CPU (dino-cli/tests/devices.rs)"
    "${tests_env[@]}" "${cargo[@]}" test --release -p dino-cli --features "dino-cli/$backend,dino-fixtures/$backend" \
        --test devices -- --include-ignored --nocapture 2>&1 | tee -a "$log" | grep -E "rel err|^test |test result"
else
    step "a short training run on $backend (the built-in dataset)"
    "$dino" train --device "$backend" --epochs 2 --output "$out/run" 2>&1 | tee -a "$log" | tail -5
fi

if [[ $bench == 0 ]]; then
    step "done (no benchmarks): $log"
    exit 0
fi
step "speed: dino bench --device $backend --preset official_s16 --batch 64"
bench=(--preset official_s16 --batch 64 --steps 6)
if [[ "${GPU_CHECK_QUICK:-}" == 1 ]]; then
    bench=(--preset small28 --batch 16 --steps 2) # software Vulkan: a smoke test, not a measurement
fi
"$dino" bench --device "$backend" "${bench[@]}" 2>&1 | tee -a "$log" "$out/bench-dino.json"
for precision in f16; do
    # Mixed precision: the training step as `dino train --precision` runs it.
    "$dino" bench --device "$backend" "${bench[@]}" --precision "$precision" 2>&1 | tee -a "$log" "$out/bench-dino-$precision.json"
done
reference=""
for r in "$root/torch_reference.py" "$root/shared/bench/torch_reference.py" "$root/../shared/bench/torch_reference.py"; do
    [[ -f "$r" ]] && reference="$r" && break
done
if command -v nvidia-smi >/dev/null && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null &&
    [[ -n "$reference" ]]; then
    step "speed: torch_reference.py --device cuda (fp16 autocast + SDPA, the official default --use_fp16)"
    python3 "$reference" --device cuda "${bench[@]}" --amp fp16 --sdpa 2>&1 | tee -a "$log" "$out/bench-torch.json"
    python3 "$reference" --device cuda "${bench[@]}" 2>&1 | tee -a "$log" "$out/bench-torch-f32.json"
else
    step "speed: no CUDA PyTorch here (or no torch_reference.py): dino's figures only"
fi
step "done: $log"
