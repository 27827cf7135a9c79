# Source this at the start of a GPU run: installs the wheels carried in .whl (diffusers,
# torchao for the comparison rows, nvidia-cudnn-frontend for the fp8_attention rows, pytest,
# and this project built with `pip wheel --no-deps -w .whl .`) into /tmp/site, and points
# Python and Inductor there.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
export PYTHONUNBUFFERED=1
REPO=$(pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
