# Three-part variant of ../shared/gpu/setup.sh (the working tree plus a 60 MiB part exceeds a call's 64 MiB).
set -e
mkdir -p /tmp/parts
cp .gpu/q02 /tmp/parts/
cd /tmp/parts && cat q00 q01 q02 > b.tar && rm -rf /tmp/b /tmp/site && mkdir -p /tmp/b /tmp/site && tar -xf b.tar -C /tmp/b
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/b/*.whl 2>&1 | grep -vi warn || true
tar -xJf /tmp/b/vllm-trim.tar.xz -C /tmp/site
cd - >/dev/null
echo "vLLM ready"
