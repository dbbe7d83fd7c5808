# One device call: bench.router on the llama3-8b shape under several front settings.
# Each argument is "tag:--flag,--flag,value[:VAR=value,VAR=value]" (the optional third
# part: environment for that run only). COMMIT names the tree's commit in the records.
pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH KVSERVE_COMMIT=${COMMIT}
A="--device cuda --model llama3-8b-shape --concurrency 64 --requests 512 --max-tokens 64 --out $OUT"
for spec in "$@"; do
  tag=${spec%%:*}; rest=${spec#*:}; flags=${rest%%:*}; envs=""
  [ "$rest" != "$flags" ] && envs=${rest#*:}
  echo "== $tag: $flags ${envs}"
  env ${envs//,/ } python -m bench.router $A --tag $tag ${flags//,/ } 2>&1 | grep -v "requests:" | grep "^{" | cut -c1-400
done
