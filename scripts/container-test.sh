#!/usr/bin/env bash
# Build Dockerfile.gpu's serve and train images with podman and check them, on a machine without
# a GPU, a Docker engine or registry pulls (tests/test_container.py runs it; docs/deploy.md).
#
#   bash scripts/container-test.sh [--bundle DIR]
#
# 1. podman, runc and debootstrap from Debian's packages when missing (as root).
# 2. A minimal Debian bookworm base made once with debootstrap and `podman import`ed
#    (localhost/edgekiln-base:bookworm), given to the build as CUDA_IMAGE: the images must work on
#    any base, since CUDA comes from NVIDIA's wheels.
# 3. The serve and train targets, built with `--format docker` (podman drops HEALTHCHECK
#    otherwise), the host network and the host's CA bundle (pip verifies TLS with it).
# 4. Serve image: the CUDA-library check (scripts/check_gpu_libs.py), uid != 0, no torch.
# 5. Train image: `edgekiln demo` on the CPU, offline, to the end (a bundle.json).
# 6. Serve image on that bundle (or --bundle DIR), mounted read-only: the HEALTHCHECK and
#    /v2/health/ready, `auto` skipping CUDA only for the driver's libcuda.so.1, a tritonclient
#    infer equal to the bundle's golden logits, /v1/classify, and SIGTERM during in-flight
#    requests: every one answered, exit status 0.
# PYTHON (default .venv/bin/python, else python3) runs the client: it needs tritonclient[http]
# and this repository's runtime (the `test` extra). Prints each step's time and the image sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=""
if [ "${1:-}" = "--bundle" ]; then bundle=$(realpath "${2:?--bundle needs a directory}"); fi
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
BASE=localhost/edgekiln-base:bookworm
SERVE=localhost/edgekiln:serve
TRAIN=localhost/edgekiln:train
t0=$SECONDS
step() { echo "== container-test: $* ($((SECONDS - t0)) s)"; }
fail() { echo "container-test: FAILED: $*" >&2; exit 1; }

step "tools"
missing=$(for t in podman runc debootstrap; do command -v "$t" >/dev/null || echo "$t"; done)
if [ -n "$missing" ]; then
  [ "$(id -u)" = 0 ] || fail "needs $(echo $missing) (apt-get install podman runc debootstrap, as root)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi
work=$(mktemp -d /tmp/edgekiln-container-test.XXXXXX)
# crun, podman's default runtime on Debian, refuses some cgroup layouts (this machine's among them);
# podman's default rlimits for a container (nofile, nproc) are refused by sandboxes that forbid
# setting another process's rlimits ("runc create failed: error setting rlimit type 7").
cat >"$work/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$work/containers.conf
name=edgekiln-container-test-$$
cleanup() { podman rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

if ! podman image exists "$BASE"; then
  step "debootstrap bookworm minbase -> $BASE"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
    "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -c . | podman import - "$BASE" >/dev/null
  rm -rf "$work/rootfs"
fi

build() {  # target tag
  step "build --target $1"
  podman build --format docker --network=host \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --build-arg CUDA_IMAGE="$BASE" -f Dockerfile.gpu --target "$1" -t "$2" . >"$work/build-$1.log" 2>&1 \
    || { tail -40 "$work/build-$1.log"; fail "build of $1"; }
  grep -h "check_gpu_libs:" "$work/build-$1.log" | tail -1 || true  # absent when the layer was cached
}
build serve "$SERVE"

step "serve image: libraries, user, torch"
podman run --rm --no-healthcheck --network=none --entrypoint python "$SERVE" /opt/edgekiln/share/edgekiln/check_gpu_libs.py \
  || fail "the CUDA provider's libraries do not resolve in the serve image"
uid=$(podman run --rm --no-healthcheck --network=none --entrypoint id "$SERVE" -u)
[ "$uid" != 0 ] || fail "the serve image runs as root"
echo "serve image runs as uid $uid"
out=$(podman run --rm --no-healthcheck --network=none --entrypoint python "$SERVE" -c "import torch" 2>&1) \
  && fail "torch is importable in the serve image"
grep -q "No module named 'torch'" <<<"$out" || fail "import torch failed oddly: $out"
echo "serve image: no torch"

build train "$TRAIN"
step "train image: edgekiln demo on the CPU, offline"
mkdir -p "$work/runs"
podman run --rm --no-healthcheck --network=none -v "$work/runs:/work/runs" "$TRAIN" demo --student-epochs 1 \
  >"$work/demo.log" 2>&1 || { tail -30 "$work/demo.log"; fail "edgekiln demo in the train image"; }
tail -3 "$work/demo.log"
[ -f "$work/runs/demo/bundle/bundle.json" ] || fail "the demo wrote no bundle"

step "serve image on the bundle, read-only"
mkdir -p "$work/bundle"
cp -r "${bundle:-$work/runs/demo/bundle}/." "$work/bundle/"
chmod -R a+rX "$work/bundle"
port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# --max-delay-ms 1500: requests wait in the batcher long enough to be in flight at SIGTERM.
podman run -d --name "$name" -p "127.0.0.1:$port:8000" -v "$work/bundle:/models/bundle:ro" "$SERVE" \
  --backend auto --max-batch 64 --max-delay-ms 1500 >/dev/null
PYTHONPATH=$PWD "$PY" - "$port" "$name" "$work/bundle" <<'EOF' || { podman logs "$name" 2>&1 | tail -30; fail "serving checks"; }
import json, subprocess, sys, threading, time, urllib.request
from pathlib import Path

import numpy as np
import tritonclient.http as triton

import runtime

port, name, bundle_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
url = f"http://127.0.0.1:{port}"
podman = ["podman"]


def get(path):
    with urllib.request.urlopen(url + path, timeout=10) as r:
        return r.status, r.read()


deadline = time.monotonic() + 180
while True:
    try:
        if get("/v2/health/ready")[0] == 200:
            break
    except OSError:
        pass
    if time.monotonic() > deadline or subprocess.run(podman + ["container", "exists", name]).returncode:
        sys.exit("the server did not become ready in 180 s")
    time.sleep(1)
subprocess.run(podman + ["healthcheck", "run", name], check=True)
print("ready; HEALTHCHECK healthy")

meta = json.loads(get("/v2/models/edgekiln")[1])["parameters"]
assert meta["backend"] == "cpu", meta  # no GPU here: auto ends on the CPU
logs = subprocess.run(podman + ["logs", name], capture_output=True, text=True).stdout
logs += subprocess.run(podman + ["logs", name], capture_output=True, text=True).stderr
# With the CUDA libraries preloaded from the wheels, the CUDA provider fails only on the driver.
assert "libcuda.so.1" in logs, logs
assert not any(f"{lib}: cannot open" in logs for lib in ("libcublasLt.so.13", "libcublas.so.13", "libcudart.so.13",
                                                       "libcurand.so.10", "libcudnn.so.9")), logs
print("auto skipped cuda for the driver's libcuda.so.1 only; serving on", meta["backend"], meta["provider"])

b = runtime.read_bundle(bundle_dir)
files, paths, golden, atol = b.golden(b.manifest.default_artifact)  # what the server serves by default
x = runtime.preprocess(paths, b.preprocess)  # the bundle's preprocessing, torch-free
c = triton.InferenceServerClient(f"127.0.0.1:{port}")
inp = triton.InferInput(b.input_name, list(x.shape), "FP32")
inp.set_data_from_numpy(x)
logits = c.infer("edgekiln", [inp]).as_numpy(b.output_name)
diff = float(np.abs(logits - golden).max())
assert diff <= max(atol, 1e-3), diff
print(f"tritonclient infer: {len(x)} golden images, max |logit - golden| {diff:.2e}")

expected = [b.class_names[i] for i in np.argmax(golden, axis=1)]


def classify(i, results):
    req = urllib.request.Request(url + "/v1/classify?top_k=1", data=paths[i % len(paths)].read_bytes(),
                                 headers={"content-type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            results[i] = (r.status, json.loads(r.read())["predictions"][0]["label"])
    except Exception as e:  # noqa: BLE001 - recorded and asserted below
        results[i] = (getattr(e, "code", None), str(e))


one = {}
classify(0, one)
assert one[0] == (200, expected[0]), (one, expected[0])
print(f"/v1/classify: {files[0]} -> '{one[0][1]}', the label of its golden logits")

# SIGTERM while requests wait in the batcher: every one is answered, then the process exits 0.
results = {}
threads = [threading.Thread(target=classify, args=(i, results)) for i in range(8)]
for t in threads:
    t.start()
time.sleep(0.5)
in_flight = sum(t.is_alive() for t in threads)
subprocess.run(podman + ["kill", "--signal", "TERM", name], check=True, capture_output=True)
for t in threads:
    t.join(60)
code = int(subprocess.run(podman + ["wait", name], capture_output=True, text=True, check=True).stdout.strip())
assert in_flight == 8, f"only {in_flight} of 8 requests were still in flight at SIGTERM"
assert [results[i] for i in range(8)] == [(200, expected[i % len(paths)]) for i in range(8)], results
assert code == 0, f"exit status {code} after SIGTERM"
print(f"SIGTERM with {in_flight} requests in flight: all answered 200 with their labels, exit status {code}")
EOF
step "sizes"
for img in "$SERVE" "$TRAIN"; do
  echo "$img: $(podman image inspect --format '{{.Size}}' "$img" | awk '{printf "%.2f GB", $1 / 1e9}')"
done
step "passed"
