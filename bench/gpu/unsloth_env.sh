# Sourced by the GPU scripts with Unsloth rows, after setting OUT: makes $OUT, keeps the hub offline, and puts
# Unsloth's carried folder (UNSLOTH_SITE, default .unsloth_site; ../shared/anchors/unsloth_site.sh builds it) and
# this checkout on the path.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH=${UNSLOTH_SITE:-$PWD/.unsloth_site}:$PWD
