"""llamactl: run llama.cpp's llama-server on NVIDIA GPUs — estimate, place, launch, track, proxy."""

__version__ = "0.1.0"
DIST_NAME = "llamactl-gpu"  # `llamactl` on PyPI is another project (LlamaDeploy's CLI)
