#!/usr/bin/env bash
# cibuildwheel's before-all in the manylinux_2_28 container (AlmaLinux 8): CUDA $COMFY_SAGE_CUDA (e.g. 13.0)
# from NVIDIA's RHEL 8 repository, only nvcc and the runtime headers, at /usr/local/cuda.
set -euo pipefail
version=${COMFY_SAGE_CUDA:?set COMFY_SAGE_CUDA to the CUDA toolkit version, e.g. 13.0}
repo_arch=$(uname -m)
[ "$repo_arch" = aarch64 ] && repo_arch=sbsa
dnf install -y dnf-plugins-core
dnf config-manager --add-repo "https://developer.download.nvidia.com/compute/cuda/repos/rhel8/${repo_arch}/cuda-rhel8.repo"
suffix=${version/./-}
dnf install -y "cuda-nvcc-${suffix}" "cuda-cudart-devel-${suffix}" "cuda-cccl-${suffix}"
ln -sfn "/usr/local/cuda-${version}" /usr/local/cuda
/usr/local/cuda/bin/nvcc --version
