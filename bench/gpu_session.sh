#!/usr/bin/env bash
# Issue 19's measurements on a lent GPU machine, as one prepared script per device call.
# The device image has torch (CUDA 13) but lacks some of edgekiln's dependencies and onnxruntime-gpu;
# they travel as wheels (.whl/) and as an xz tarball of the onnxruntime-gpu package split in parts
# (.gpuparts/pN, each call's transfer is limited), gathered in /tmp/parts while the machine stays warm.
#
#   bash bench/gpu_session.sh torch   # versions; training throughput; torchrun NCCL at world size 1
#   bash bench/gpu_session.sh ddp     # only edgekiln's training under torchrun
#   bash bench/gpu_session.sh part    # only stash this call's part
#   bash bench/gpu_session.sh ort     # assemble onnxruntime-gpu; CUDA EP inference bench; pytest -m gpu
#   B_SET=distill.mixup=0.4 bash bench/gpu_session.sh distill_ab  # photo sets: adapt + distill, defaults vs one --set
#   bash bench/gpu_session.sh domain  # issue 16's bench/domain_shift.py, one process per benchmark side by side
#                                     # (photo sets from bench/photo_sets.py carried in .gpudata/photosets)
# Every step has its own time limit and its output goes to $OUT/<stage>.log as well.
set -uo pipefail
stage=${1:?torch|part|ort}
OUT=${OUT:-/tmp/out}
log=$OUT/$stage.log
export PYTHONUNBUFFERED=1
mkdir -p /tmp/parts /tmp/site
cp -n .gpuparts/p* /tmp/parts/ 2>/dev/null
ls -la /tmp/parts
[ "$stage" = part ] && exit 0

step() {  # step SECONDS CMD...: run with a limit, keep the log, never stop the script
    local limit=$1; shift
    echo "### [$(date -u +%H:%M:%S)] $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "### rc=${PIPESTATUS[0]}" | tee -a "$log"
}

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
# CUDA 13 user-space libraries come as pip packages beside torch; onnxruntime's CUDA EP looks for them too.
nvlib=$(python3 -c "import glob,os,site;print(':'.join(sorted({os.path.dirname(p) for p in glob.glob(site.getsitepackages()[0]+'/nvidia/**/lib*.so*',recursive=True)})))")
export LD_LIBRARY_PATH=$nvlib:${LD_LIBRARY_PATH:-}
export EDGEKILN_CACHE=/tmp/ekcache

if [ "$stage" = domain ]; then  # its own logs only ($OUT comes back with at most 8 files)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    sets=${SETS:-textures lfw_faces scenes digits}
    for s in $sets; do
        OMP_NUM_THREADS=$((16 / $(echo $sets | wc -w))) timeout "${LIMIT:-530}" python3 bench/domain_shift.py \
            --out /tmp/ds_$s --photo-root .gpudata/photosets --sets $s --seeds 0 1 2 ${BENCH_ARGS:-} >"$OUT/ds_$s.log" 2>&1 &
    done
    wait
    for s in $sets; do cp /tmp/ds_$s/results.json "$OUT/ds_$s.json"; tail -3 "$OUT/ds_$s.log"; done
    exit 0
fi

if [ "$stage" = distill_ab ]; then  # adapt + distill of each photo set with only data.root set, A = defaults, B = $B_SET
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    for s in textures lfw_faces scenes; do for v in a b; do
        printf 'name: %s_%s\nruns_dir: /tmp/ab\ndata: {root: %s}\n' $s $v "$PWD/.gpudata/photosets/$s" >/tmp/ab_${s}_${v}.yaml
        extra=(); [ $v = b ] && extra=(--set "$B_SET")
        ( OMP_NUM_THREADS=2 timeout "${LIMIT:-500}" python3 -m pipeline.cli adapt /tmp/ab_${s}_${v}.yaml &&
          OMP_NUM_THREADS=2 timeout "${LIMIT:-500}" python3 -m pipeline.cli distill /tmp/ab_${s}_${v}.yaml "${extra[@]}" ) >/tmp/ab_${s}_${v}.log 2>&1 &
    done; done
    wait
    python3 - <<'PY' | tee "$OUT/distill_ab.txt"
import glob, json
for f in sorted(glob.glob("/tmp/ab/*/metrics.json")):
    m = json.load(open(f)); t, s = m.get("teacher", {}), m.get("student", {})
    print(f.split("/")[-2], "teacher test", t.get("test_accuracy"), "student test", s.get("test_accuracy"),
          "train s", round(s.get("train_seconds", 0)), s.get("budget"))
PY
    tail -n 3 /tmp/ab_*.log > "$OUT/distill_ab.log"
    exit 0
fi

if [ "$stage" = target_ab ]; then  # issue 16: edgekiln adapt + distill with only data.root + data.target per
    # photo set -> dusk; distill A = defaults, B = --set $B_SET on a copy of the same teacher; scored on target_test
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    sets=${SETS:-textures lfw_faces scenes}
    for s in $sets; do
        python3 -c "import sys;from pathlib import Path;sys.path.insert(0,'bench');import domain_shift as d;d.build('$s',Path('/tmp/ds'),Path('.gpudata/photosets'))"
    done
    for seed in ${SEEDS:-0}; do for s in $sets; do
        r=${s}_${seed}
        for v in a b; do
            printf 'name: %s_%s\nruns_dir: /tmp/tab\nseed: %s\ndata: {root: /tmp/ds/data/%s/source, target: /tmp/ds/data/%s/target}\n' $r $v $seed $s $s >/tmp/tab_${r}_${v}.yaml
        done
        ( OMP_NUM_THREADS=2 timeout "${LIMIT:-500}" python3 -m pipeline.cli adapt /tmp/tab_${r}_a.yaml ${ADAPT_SET:+--set "$ADAPT_SET"} &&
          cp -r /tmp/tab/${r}_a /tmp/tab/${r}_b &&
          { OMP_NUM_THREADS=2 timeout "${LIMIT:-500}" python3 -m pipeline.cli distill /tmp/tab_${r}_a.yaml >/tmp/tab_${r}_a.dlog 2>&1 &
            OMP_NUM_THREADS=2 timeout "${LIMIT:-500}" python3 -m pipeline.cli distill /tmp/tab_${r}_b.yaml --set "$B_SET" >/tmp/tab_${r}_b.dlog 2>&1; wait; }
        ) >/tmp/tab_${r}.log 2>&1 &
    done; done
    wait
    python3 bench/score_target.py /tmp/tab | tee "$OUT/target_ab.txt"
    tail -n 4 /tmp/tab_*.log /tmp/tab_*.dlog > "$OUT/target_ab.log"
    exit 0
fi

step 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step 60 python3 -c "import torch,sys;print('python',sys.version.split()[0],'torch',torch.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version(),torch.cuda.get_device_name())"
step 120 python3 -c "from pipeline.data import demo_data_dir;print(demo_data_dir())"

edgekiln_under_torchrun() {  # edgekiln's own training under torchrun, NCCL at world size 1, to its checkpoint
cat >/tmp/ddp.yaml <<EOF
name: gpu-ddp
runs_dir: /tmp/runs
data: {root: /tmp/ekcache/digits-v1, batch_size: 64, num_workers: 8}
model: {name: efficientnet_lite0, weights: default}
adapt: {strategy: finetune, epochs: 3}
distill: {enabled: false}
EOF
step 150 torchrun --standalone --nproc_per_node=1 -m pipeline.cli adapt /tmp/ddp.yaml
step 30 python3 -c "import json;m=json.load(open('/tmp/runs/gpu-ddp/metrics.json'))['teacher'];print('checkpoint ok; test accuracy',m['test_accuracy'],'train s',round(m['train_seconds'],1))"
step 30 ls -la /tmp/runs/gpu-ddp/checkpoints
}

[ "$stage" = ddp ] && edgekiln_under_torchrun

if [ "$stage" = torch ]; then
    step 90 python3 bench/gpu_train.py --device cuda --amp bf16 --channels-last --only a --batch 256 --steps 60
    step 90 python3 bench/gpu_train.py --device cuda --amp fp16 --channels-last --only a --batch 256 --steps 60
    step 90 python3 bench/gpu_train.py --device cuda --amp bf16 --channels-last --only b --workers 12 --steps 40
    step 90 torchrun --standalone --nproc_per_node=1 bench/gpu_train.py --device cuda --amp bf16 --channels-last --ddp --only a --steps 30
    edgekiln_under_torchrun
    step 200 python3 bench/gpu_train.py --device cuda --amp bf16 --channels-last --compile --only a --batch 256 --steps 60
fi

if [ "$stage" = ort ]; then
    step 120 python3 -c "
import lzma, tarfile, glob
parts = sorted(glob.glob('/tmp/parts/p*'))
print('parts', parts)
with open('/tmp/ort.tar.xz', 'wb') as f:
    for p in parts: f.write(open(p, 'rb').read())
tarfile.open('/tmp/ort.tar.xz', 'r:xz').extractall('/tmp/ortsite')"
    export PYTHONPATH=/tmp/ortsite:$PYTHONPATH
    step 60 python3 -c "import torch, onnxruntime as o;print('onnxruntime',o.__version__,o.__file__,o.get_available_providers())"
    mkdir -p /tmp/demo_run/checkpoints && cp .gpuparts/run/split.json /tmp/demo_run/ && cp .gpuparts/run/teacher.safetensors /tmp/demo_run/checkpoints/
    sed -i 's#"/root/.cache/edgekiln/digits-v1"#"/tmp/ekcache/digits-v1"#' /tmp/demo_run/split.json
    step 300 python3 bench/gpu_infer.py --run-dir /tmp/demo_run --iters 300
    step 240 python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py tests/test_runtime_backends.py
fi
