#!/usr/bin/env bash
# One prepared check for a lent GPU machine (one H100/H200, 16 cores; about 5-8 minutes).
#
#   1. installs what is missing from carried wheels in .whl/ (never from the network),
#   2. writes phantom slides, tiles them (224 px at 0.5 µm/px) and labels the tiles from the
#      truth masks,
#   3. for resnet18 and resnet50 in bf16: data pipeline tiles/s (one process and per worker),
#      training images/s on real tiles and on synthetic in-memory tensors, and their ratio
#      (target: at least 0.85),
#   4. a short real `histocsc train` (resnet18, bf16-mixed, 2 epochs) and `load_trained`,
#   5. encoders (random weights, never downloaded): ViT-S/16, -B/16, -L/16 feature extraction
#      tiles/s (fp32, bf16), and a full-size UNI in its authors' layout (a random .safetensors)
#      through `histocsc features` and a frozen-encoder head `train` on the phantom cohort.
#
# Figures are printed and written to $OUT (device tool) or $RESULTS (default /tmp/gpu-check).
#
# Wheels: the GPU image has torch, torchvision, lightning, torchmetrics, opencv, scikit-image,
# tifffile, typer, rich, pyyaml; it lacks pydantic, albumentations, openslide, imagecodecs and
# their needs. On a machine with network access, from the repo root:
#     bash scripts/gpu_check.sh --fetch-wheels     # fills .whl/ (python 3.12, manylinux x86-64)
# then carry `.whl` (ignored by git) with the run:  bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions albumentations albucore
        simsimd stringzilla openslide-python openslide-bin imagecodecs timm safetensors h5py
        huggingface-hub)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # pin each wheel to the version installed here, so the carried set matches the project
    specs=$($PY - "${WHEELS[@]}" <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
EOF
)
    mkdir -p .whl
    plats=()
    for n in 17 24 27 28 31 34 35; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
    for spec in $specs; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${plats[@]}" --platform manylinux2014_x86_64 \
            --platform any -d .whl "$spec"
    done
    ls -la .whl
    exit 0
fi

RESULTS=${OUT:-/tmp/gpu-check}
WORK=${WORK:-/tmp/gpu-check-work}
# knobs for a dry run elsewhere (e.g. on a CPU: REQUIRE_GPU=0 PRECISION=32-true PHANTOM_SIZE=2048
# TILE_PX=64 BATCH=16 STEPS=2 EPOCHS=1)
SIZE=${PHANTOM_SIZE:-4096}; TILE=${TILE_PX:-224}; PREC=${PRECISION:-bf16-mixed}
BATCH=${BATCH:-256}; STEPS=${STEPS:-60}; EPOCHS=${EPOCHS:-2}; REQUIRE_GPU=${REQUIRE_GPU:-1}
mkdir -p "$RESULTS" "$WORK"
log() { echo "== $(date +%H:%M:%S) $*"; }

# 1. dependencies: only what is missing, only from .whl/
missing=$($PY - <<'EOF'
import importlib.util as u
need = {"pydantic": "pydantic", "albumentations": "albumentations", "openslide": "openslide-python",
        "imagecodecs": "imagecodecs", "lightning": "lightning", "torchmetrics": "torchmetrics",
        "torchvision": "torchvision", "cv2": "opencv-python-headless", "tifffile": "tifffile",
        "skimage": "scikit-image", "typer": "typer", "rich": "rich", "yaml": "pyyaml"}
print(" ".join(v for k, v in need.items() if u.find_spec(k) is None))
EOF
)
if [[ -n "$missing" ]]; then
    log "missing: $missing"
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "error: missing packages and no .whl/ carried (see the top of this script)" >&2
        exit 2
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L || true
$PY -c "import torch, lightning, albumentations as A; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'lightning', lightning.__version__, 'albumentations', \
A.__version__); assert torch.cuda.is_available() or '$REQUIRE_GPU' == '0', 'no CUDA device'"
WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))

# 2 + 3. phantom tiles, then throughput per backbone (the phantom is made once, then reused)
bench() {  # backbone batch steps
    log "bench $1 (batch $2, $3 steps, $WORKERS workers, $PREC)"
    timeout 300 $PY scripts/bench_train.py --phantom "$WORK" --phantom-cases 5 \
        --phantom-size "$SIZE" --tile-px "$TILE" --mpp 0.5 --stride-px $((TILE / 3)) \
        --backbone "$1" --batch-size "$2" --steps "$3" --workers "$WORKERS" --precision "$PREC" \
        --json "$RESULTS/bench_$1.json" 2>&1 | grep -v -e '^INFO' -e 'Warning' -e 'warn(' || true
}
bench resnet18 "$BATCH" "$STEPS"
bench resnet50 "$BATCH" $((STEPS * 2 / 3))

# 4. the real command, briefly
log "histocsc train resnet18 ($EPOCHS epochs)"
timeout 240 $PY -m histocsc train --config configs/train.yaml --data "$WORK/prepared" \
    --out "$WORK/run-r18" --set model.backbone=resnet18 --set trainer.max_epochs="$EPOCHS" \
    --set data.batch_size="$BATCH" --set data.num_workers="$WORKERS" \
    --set trainer.precision="$PREC" --set trainer.progress_bar=false \
    2>&1 | grep -v -e '^INFO' -e 'Warning' || true
if [[ -f "$WORK/run-r18/run.json" ]]; then
    cp "$WORK/run-r18/run.json" "$RESULTS/run_resnet18.json"
    $PY - "$WORK/run-r18" <<'EOF'
import json, sys
from histocsc.learn.model import load_trained
model, meta = load_trained(sys.argv[1])
run = json.load(open(f"{sys.argv[1]}/run.json"))
print("load_trained:", meta["backbone"], meta["markers"], meta["tile_px"], meta["mpp"])
print("precision", run["precision"], "epochs", run["timings"]["train_epochs"])
print("test", {m: round(v["auroc"], 3) for m, v in run["test"].items()})
EOF
fi

log "encoders: feature extraction on the GPU"
$PY - <<'EOF' | tee "$RESULTS/encoders.txt"
import time, torch
from histocsc.learn.model import build_model
for name in ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"):
    enc = build_model(f"timm:{name}", 2).encoder.cuda().eval()
    x = torch.randn(128, 3, 224, 224, device="cuda")
    for mode in ("fp32", "bf16"):
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=mode == "bf16"):
            enc(x); torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(5):
                enc(x)
            torch.cuda.synchronize()
        print(f"{name} {mode}: {5 * 128 / (time.perf_counter() - t):,.0f} tiles/s")
EOF
log "encoders: UNI layout end to end (features + frozen head train)"
$PY - "$WORK/uni.safetensors" <<'EOF'
import sys
from safetensors.torch import save_file
from histocsc.learn.tilenet import build_encoder
enc = build_encoder("uni")
save_file({k: v.contiguous() for k, v in enc.body.state_dict().items()}, sys.argv[1])
EOF
$PY -m histocsc features --data "$WORK/prepared" --out "$WORK/features-uni" --encoder uni \
    --weights "$WORK/uni.safetensors" --device cuda --batch 128 | tail -3
$PY -m histocsc train --config configs/train.yaml --data "$WORK/prepared" --out "$WORK/run-uni" \
    --set model.backbone=uni --set model.weights_path="$WORK/uni.safetensors" \
    --set model.freeze=all --set data.features="$WORK/features-uni" --set trainer.max_epochs=3 \
    --set trainer.progress_bar=false --set data.num_workers=0 | tail -4
cp "$WORK/run-uni/run.json" "$RESULTS/run_uni_frozen.json" || true

log "summary"
$PY - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("bench_*.json")):
    b = json.loads(path.read_text())
    print(f"{b['backbone']:>9} on {b['device']} {b['precision']}: pipeline "
          f"{b['pipeline_tiles_per_s_one_process']:,.0f} tiles/s one process, "
          f"{b['pipeline_tiles_per_s_per_worker']:,.0f} per worker x {b['workers']}; train real "
          f"{b['train_images_per_s_real']:,.0f} img/s, synthetic "
          f"{b['train_images_per_s_synthetic']:,.0f} img/s, ratio "
          f"{b['ratio_real_to_synthetic']:.2f}")
EOF
