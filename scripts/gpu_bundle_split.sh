#!/usr/bin/env bash
# Re-split the offline vLLM bundle (../shared/gpu/build-bundle -> .gpu/p00 .gpu/p01) into three ~40 MiB
# parts .gpu/q00..q02: with this repository's working tree (~12 MiB, the bundled model) a 60 MiB part
# exceeds the device tool's 64 MiB per call. Then send them in calls back to back:
#   carry [".gpu/q00"]   mkdir -p /tmp/parts && cp .gpu/q00 /tmp/parts/
#   carry [".gpu/q01"]   cp .gpu/q01 /tmp/parts/
#   carry [".gpu/q02"]   cp .gpu/q02 /tmp/parts/ && bash scripts/gpu_session.sh setup
# (optionally FlashInfer's wheels, for the cells that keep vLLM's defaults: carry [".gpu/fi"] and run setup
# in that call instead), then scripts/gpu_session.sh findings | suite | campaign.
set -euo pipefail
cd "$(dirname "$0")/.."
cat .gpu/p00 .gpu/p01 > /tmp/bundle.tar
split -b 40m -d /tmp/bundle.tar .gpu/q
rm /tmp/bundle.tar
ls -la .gpu/q0*
