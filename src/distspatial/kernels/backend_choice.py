"""Choosing a node's kernel backend from ``NodeConfig.device``: the CPU backend
(:class:`~distspatial.kernels.backend.CpuBackend`) or the PyTorch one (:mod:`distspatial.kernels.gpu_kernels`).
A module of its own so that the backends' base module never imports a backend built on it."""

from __future__ import annotations

from typing import Any

from .backend import DEVICES, CpuBackend, GpuUnavailableError, KernelBackend, cuda_available

__all__ = ["get_backend"]


def get_backend(device: str = "cpu", threads: int = 1, **options: Any) -> KernelBackend:
    """The kernel backend for ``device`` (``NodeConfig.device``): ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``),
    ``"auto"`` (cuda when PyTorch sees a GPU here, else cpu).

    ``options`` go to the backend's constructor (``CpuBackend(presorted_queries=...)``,
    ``TorchBackend(dtype="float32")``). ``"cuda"`` without a usable GPU raises :class:`GpuUnavailableError`
    saying how to fix it.
    """
    if not isinstance(device, str):
        raise ValueError(f"device must be a string, one of {DEVICES}, got {device!r}")
    base = device.split(":", 1)[0]
    if base not in DEVICES or (base != "cuda" and ":" in device):
        raise ValueError(f"device must be one of {DEVICES} (or 'cuda:N'), got {device!r}")
    if base == "auto":
        base, device = ("cuda", "cuda") if cuda_available() else ("cpu", "cpu")
    if base == "cpu":
        return CpuBackend(threads=threads, **options)
    try:
        import torch
    except ImportError:
        raise GpuUnavailableError(
            "device='cuda' needs PyTorch with CUDA on every node: pip install 'distspatial[gpu]' (a CUDA build of "
            "torch), or use NodeConfig.with_device('auto') / 'cpu'"
        ) from None
    if not torch.cuda.is_available():
        raise GpuUnavailableError(
            f"device={device!r}: PyTorch {torch.__version__} sees no CUDA device on this node (CPU-only build, no "
            "GPU or no driver). Install a CUDA build of torch where there is a GPU, or use "
            "NodeConfig.with_device('auto') to fall back to the CPU"
        )
    if ":" in device and int(device.split(":", 1)[1]) >= torch.cuda.device_count():
        raise GpuUnavailableError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    from .gpu_kernels import TorchBackend

    return TorchBackend(device=device, threads=threads, **options)

