"""GPU kernels: :class:`TorchBackend`, the :class:`~distspatial.kernels.backend.KernelBackend` on PyTorch. No Ray.

Why PyTorch (and not CuPy)
--------------------------
* One code path for every device: the same tensor code runs on ``cuda`` and on torch's ``cpu`` device, so the
  GPU backend's logic (grid build, window gathering, segmented top-k, CSR assembly, k-means reductions) is
  tested in CI, which has no GPU, against the CPU backend. CuPy code can only be imported where CUDA is.
* The fused k-means pass is a Triton kernel; Triton ships with every CUDA build of PyTorch on Linux (no nvcc or
  CUDA toolkit needed on the nodes), and its interpreter (``TRITON_INTERPRET=1``) runs the same kernel on CPU
  tensors, so that kernel is tested without a GPU too (where ``triton`` is installed).
* PyTorch brings the GPU building blocks this needs (sort, topk, cumsum, index_add, repeat_interleave,
  cuBLAS) and a caching allocator; one dependency, installed with ``pip install 'distspatial[gpu]'``.

What runs where
---------------
* **k-means** (``kmeans_assign_sums``, ``lloyd_state``): one pass per iteration. On CUDA with Triton: one fused
  kernel reads each point once, computes its distances to all centres, writes its label, and reduces
  per-block partial sums, counts and inertia (for ``k * (d + 1) <= 128`` and ``d <= 3``; otherwise the sums
  are a second ``index_add_`` pass). Elsewhere: tiles of rows, a ``(tile, k)`` distance block, ``argmin``,
  ``bincount``/``index_add_``. Labels, sums and counts stay on the device; a step moves ``O(k d)`` numbers to
  the host.
* **kNN, radius, box** for ``d <= 3``: a uniform grid built on the device (cell size for about
  ``points_per_cell`` points per cell over the partition's box), points sorted by cell id, a cell-start array.
  A query gathers the points of a window of cells (each row of cells is one contiguous range of the sorted
  points), computes exact distances, and takes a segmented top-k (two stable sorts). The answer is certified:
  the k-th distance must not exceed the distance from the query to the window's boundary; the other queries
  retry with a window twice as wide, until the window covers the grid. Radius and box queries gather the cells
  covering their ball's / box's bounding box and filter exactly.
* ``d > 3``: brute-force tiles (exact elementwise distances in float64, the BLAS form in float32), running
  top-k merged across tiles.

Exactness
---------
* ``dtype="float64"`` (default): distances are ``sum_t (x_t - y_t)**2`` added in dimension order (separate
  multiply and add, no FMA contraction: Triton is called with ``enable_fp_fusion=False``), so k-means labels
  equal the CPU backend's (lowest index on exact ties) and kNN/radius/box answers equal it up to the order of
  equal distances. Sums and inertia agree to rounding (different order of additions).
* ``dtype="float32"``: coordinates are shifted to the partition's lower corner (in float64) and rounded to
  float32, distances computed in float32. Returned distances are within about ``4e-7 * (extent of the
  partition + distance)`` of the float64 ones; a label or a neighbour can differ from the float64 answer only
  where two candidates' float64 distances are that close. Sums are accumulated in float32 per block of 1024
  points and in float64 across blocks.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np

from .kmeans_kernels import check_centers

try:
    import torch

    HAVE_TORCH = True
except ImportError:  # pragma: no cover - the module is only imported when torch is wanted
    torch = None  # type: ignore[assignment]
    HAVE_TORCH = False

from .backend import AssignLloydState, KernelBackend, PreparedPoints, _as_boxes, _empty_csr

__all__ = ["HAVE_TORCH", "TorchBackend", "TorchPrepared", "TorchLloydState", "triton_status", "torch_knn_bruteforce"]

#: Target mean points per grid cell.
_POINTS_PER_CELL = 4
#: Most cells of one grid.
_MAX_CELLS = 1 << 24
#: Candidate (query, point) pairs processed at once (memory: about 40 bytes each).
_PAIR_BUDGET = 1 << 24
#: Rows per tile of the eager k-means pass.
_KM_TILE = 1 << 18
#: Points per program of the Triton k-means kernel.
_TRITON_BLOCK = 1024
#: Fuse per-cluster sums into the Triton kernel up to this many partial values per block.
_TRITON_FUSE_MAX = 128


def _require_torch() -> None:
    if not HAVE_TORCH:
        raise ImportError("TorchBackend needs PyTorch: pip install 'distspatial[gpu]'")


# --------------------------------------------------------------------------------------------------------------
# Triton kernel (built lazily: TRITON_INTERPRET is read when the kernel is defined)
# --------------------------------------------------------------------------------------------------------------


def _build_triton_kernels() -> Any:
    """Define the Triton kernels now (reads ``TRITON_INTERPRET``); returns a namespace or raises ImportError."""
    import triton
    import triton.language as tl

    @triton.jit
    def kmeans_pass(
        X,  # (n, D) points, row-major, compute dtype
        C,  # (k, D) centres, compute dtype
        LAB,  # (n,) int32 out
        PART,  # (programs, K_FUSE * (D + 1) + 1) float64 out: per centre count, D sums; then inertia
        n,
        k,
        D: tl.constexpr,
        K_FUSE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x0 = tl.load(X + offs * D, mask=mask, other=0.0)
        if D >= 2:
            x1 = tl.load(X + offs * D + 1, mask=mask, other=0.0)
        if D >= 3:
            x2 = tl.load(X + offs * D + 2, mask=mask, other=0.0)
        best = tl.full([BLOCK], float("inf"), x0.dtype)
        lab = tl.zeros([BLOCK], dtype=tl.int32)
        for j in range(k):
            diff = x0 - tl.load(C + j * D)
            acc = diff * diff
            if D >= 2:
                diff = x1 - tl.load(C + j * D + 1)
                acc = acc + diff * diff
            if D >= 3:
                diff = x2 - tl.load(C + j * D + 2)
                acc = acc + diff * diff
            upd = acc < best  # strict: the lowest index wins exact ties
            best = tl.where(upd, acc, best)
            lab = tl.where(upd, j, lab)
        tl.store(LAB + offs, lab, mask=mask)
        W: tl.constexpr = K_FUSE * (D + 1) + 1
        base = PART + pid.to(tl.int64) * W
        best = tl.where(mask, best, 0.0)
        tl.store(base + K_FUSE * (D + 1), tl.sum(best.to(tl.float64), axis=0))
        for j in tl.static_range(K_FUSE):
            sel = (lab == j) & mask
            tl.store(base + j * (D + 1), tl.sum(sel.to(tl.int32), axis=0).to(tl.float64))
            tl.store(base + j * (D + 1) + 1, tl.sum(tl.where(sel, x0, 0.0), axis=0).to(tl.float64))
            if D >= 2:
                tl.store(base + j * (D + 1) + 2, tl.sum(tl.where(sel, x1, 0.0), axis=0).to(tl.float64))
            if D >= 3:
                tl.store(base + j * (D + 1) + 3, tl.sum(tl.where(sel, x2, 0.0), axis=0).to(tl.float64))

    class _K:
        pass

    ns = _K()
    ns.kmeans_pass = kmeans_pass
    ns.interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return ns


@functools.lru_cache(maxsize=1)
def _triton_kernels() -> Any:
    try:
        return _build_triton_kernels()
    except Exception:  # no triton, or a triton that cannot build here
        return None


def triton_status() -> str:
    """``"compiled"``, ``"interpreter"`` or ``"unavailable"``: how the fused k-means kernel would run."""
    ns = _triton_kernels()
    if ns is None:
        return "unavailable"
    return "interpreter" if ns.interpret else "compiled"


# --------------------------------------------------------------------------------------------------------------
# prepared partition and grid
# --------------------------------------------------------------------------------------------------------------


class _Grid:
    """Sorted-cell structure over a partition (d <= 3), all tensors on the backend's device."""

    def __init__(self, X: torch.Tensor, points_per_cell: int) -> None:
        n, d = X.shape
        dev = X.device
        Xd = X.double()
        lo = Xd.min(dim=0).values
        hi = Xd.max(dim=0).values
        ext = (hi - lo).cpu().numpy()
        active = ext > 0
        cells = max(1, min(_MAX_CELLS, n // max(1, points_per_cell)))
        G = np.ones(d, dtype=np.int64)
        if active.any():
            w0 = float(np.prod(ext[active]) / cells) ** (1.0 / int(active.sum()))
            G[active] = np.maximum(1, np.ceil(ext[active] / w0)).astype(np.int64)
            while int(np.prod(G)) > _MAX_CELLS:
                G[active] = np.maximum(1, G[active] // 2)
        w = np.where(active, ext / G, 1.0)
        self.d = d
        self.G = G
        self.lo = lo
        self.lo_np = lo.cpu().numpy()
        self.w = torch.as_tensor(w, dtype=torch.float64, device=dev)
        self.w_np = w
        self.Gt = torch.as_tensor(G, device=dev)
        # rounding of the cell computation, as a distance: points may sit up to this far on the wrong side
        self.margin = 1e-10 * float(np.abs(self.lo_np).max() + np.abs(hi.cpu().numpy()).max() + ext.max() + 1e-300)
        cell = self.cells_of(Xd)
        lin = self.linear(cell)
        lin_sorted, order = torch.sort(lin, stable=True)
        ncell = int(np.prod(G))
        counts = torch.bincount(lin_sorted, minlength=ncell)
        self.start = torch.zeros(ncell + 1, dtype=torch.int64, device=dev)
        torch.cumsum(counts, 0, out=self.start[1:])
        self.perm = order  # sorted position -> row of the partition
        self.Xs = X[order].contiguous()

    def cells_of(self, Y: torch.Tensor) -> torch.Tensor:
        """(m, d) int64 cells of float64 coordinates (clamped to the grid)."""
        c = torch.floor((Y - self.lo) / self.w)
        c = torch.minimum(torch.clamp(c, min=0.0), (self.Gt - 1).double())
        return c.long()

    def cell_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inclusive cell ranges covering the coordinate boxes [lo, hi] (with a one-cell guard for rounding)."""
        a = torch.floor((lo - self.lo) / self.w) - 1.0
        b = torch.floor((hi - self.lo) / self.w) + 1.0
        top = (self.Gt - 1).double()
        a = torch.minimum(torch.clamp(a, min=0.0), top)
        b = torch.minimum(torch.clamp(b, min=0.0), top)
        return a.long(), b.long()

    def linear(self, cell: torch.Tensor) -> torch.Tensor:
        lin = cell[:, self.d - 1].clone()
        for t in range(self.d - 2, -1, -1):
            lin *= int(self.G[t])
            lin += cell[:, t]
        return lin

    def window_rows(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of cells of the windows [a, b] (inclusive, (m, d)): one contiguous range of sorted points each.

        Returns ``(query of each row (r,), range start (r,), range stop (r,))``, rows grouped by query in order.
        """
        m, d = a.shape
        dev = a.device
        ext = b - a + 1
        if d == 1:
            nrows = torch.ones(m, dtype=torch.int64, device=dev)
        else:
            nrows = ext[:, 1:].prod(dim=1)
        q = torch.repeat_interleave(torch.arange(m, device=dev), nrows)
        first = torch.cumsum(nrows, 0) - nrows
        rem = torch.arange(q.numel(), device=dev) - first[q]
        base = a[q, 0].clone()
        mult = int(self.G[0])
        for t in range(1, d):
            e = ext[q, t]
            off = rem % e
            rem = rem // e
            base += (a[q, t] + off) * mult
            mult *= int(self.G[t])
        stop = base + (b[q, 0] - a[q, 0]) + 1
        return q, self.start[base], self.start[stop]


def _expand(q_rows: torch.Tensor, rs: torch.Tensor, re: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate pairs (query, sorted position) of row ranges."""
    lens = re - rs
    row = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens
    pos = torch.arange(row.numel(), device=lens.device) - first[row] + rs[row]
    return q_rows[row], pos


def _chunks_by_pairs(q_rows: torch.Tensor, lens: torch.Tensor, m: int, budget: int) -> list[tuple[int, int, int, int]]:
    """Split queries (and their rows, grouped by query) into chunks of about ``budget`` candidate pairs.

    Returns ``(q0, q1, r0, r1)`` per chunk.
    """
    per_q = torch.zeros(m, dtype=torch.int64, device=lens.device).index_add_(0, q_rows, lens)
    rows_per_q = torch.bincount(q_rows, minlength=m)
    cq = torch.cumsum(per_q, 0).cpu().numpy()
    cr = np.concatenate([[0], torch.cumsum(rows_per_q, 0).cpu().numpy()])
    out = []
    q0 = 0
    while q0 < m:
        base = cq[q0 - 1] if q0 else 0
        q1 = int(np.searchsorted(cq, base + budget, side="right"))
        q1 = max(q1, q0 + 1)
        q1 = min(q1, m)
        out.append((q0, q1, int(cr[q0]), int(cr[q1])))
        q0 = q1
    return out


class TorchPrepared(PreparedPoints):
    """A partition on the device: points (shifted by ``origin`` in float32 mode) and, for d <= 3, a grid."""

    backend_name = "torch"

    def __init__(self, backend: TorchBackend, points: np.ndarray) -> None:
        super().__init__(np.ascontiguousarray(points, dtype=np.float64))
        self.backend = backend
        if backend.dtype == torch.float32 and self.n:
            self.origin = self.points.min(axis=0)
        else:
            self.origin = np.zeros(self.d)
        host = self.points - self.origin if backend.dtype == torch.float32 else self.points
        self.X = torch.as_tensor(np.ascontiguousarray(host)).to(device=backend.device, dtype=backend.dtype)
        self._grid: _Grid | None = None

    @property
    def grid(self) -> _Grid:
        if self._grid is None:
            self._grid = _Grid(self.X, self.backend.points_per_cell)
        return self._grid

    def to_local(self, Y: np.ndarray) -> torch.Tensor:
        """Host float64 coordinates -> device tensor in this partition's frame and the compute dtype."""
        Y = np.asarray(Y, dtype=np.float64)
        if self.backend.dtype == torch.float32:
            Y = Y - self.origin
        return torch.as_tensor(np.ascontiguousarray(Y)).to(device=self.backend.device, dtype=self.backend.dtype)


# --------------------------------------------------------------------------------------------------------------
# distance helpers
# --------------------------------------------------------------------------------------------------------------


def _sqdist_pairs(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Row-wise exact squared distances of matching rows (dimension order, separate multiply and add)."""
    diff = A[:, 0] - B[:, 0]
    out = diff * diff
    for t in range(1, A.shape[1]):
        diff = A[:, t] - B[:, t]
        out = out + diff * diff
    return out


def _sqdist_tile(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(ma, mb) exact squared distances (dimension order)."""
    diff = A[:, 0:1] - B[:, 0][None, :]
    out = diff * diff
    for t in range(1, A.shape[1]):
        diff = A[:, t : t + 1] - B[:, t][None, :]
        out += diff * diff
    return out


def _sqdist_tile_mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(ma, mb) squared distances by the BLAS form ``||a||^2 - 2 a.b + ||b||^2`` (float32 fast path)."""
    an = (A * A).sum(1, keepdim=True)
    bn = (B * B).sum(1)[None, :]
    out = torch.addmm(an + bn, A, B.T, alpha=-2.0)
    return out.clamp_(min=0.0)


def torch_knn_bruteforce(
    X: torch.Tensor, Q: torch.Tensor, k: int, exact: bool = True, q_tile: int = 4096, p_tile: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force kNN on tensors: ``(squared distances (m, k), rows (m, k))``, tiled over both sides.

    ``exact``: elementwise distances (dimension order) instead of the BLAS form. Also the baseline of
    ``benchmarks/bench_kernels.py`` (``exact=False`` is the usual cdist + topk).
    """
    n = X.shape[0]
    m = Q.shape[0]
    kk = min(k, n)
    dev = X.device
    out_d = torch.full((m, k), float("inf"), dtype=X.dtype, device=dev)
    out_i = torch.full((m, k), -1, dtype=torch.int64, device=dev)
    if n == 0 or m == 0:
        return out_d, out_i
    f = _sqdist_tile if exact else _sqdist_tile_mm
    for q0 in range(0, m, q_tile):
        q1 = min(q0 + q_tile, m)
        Qt = Q[q0:q1]
        bd = None
        bi = None
        for p0 in range(0, n, p_tile):
            p1 = min(p0 + p_tile, n)
            D = f(Qt, X[p0:p1])
            idx = torch.arange(p0, p1, device=dev).expand(q1 - q0, -1)
            if bd is not None:
                D = torch.cat([bd, D], dim=1)
                idx = torch.cat([bi, idx], dim=1)
            t = min(kk, D.shape[1])
            bd, sel = torch.topk(D, t, dim=1, largest=False, sorted=True)
            bi = torch.gather(idx, 1, sel)
        out_d[q0:q1, :kk] = bd[:, :kk]
        out_i[q0:q1, :kk] = bi[:, :kk]
    return out_d, out_i


# --------------------------------------------------------------------------------------------------------------
# backend
# --------------------------------------------------------------------------------------------------------------


class TorchLloydState(AssignLloydState):
    """Lloyd state on the device: labels stay there between steps (``labels`` copies them to the host)."""

    def __init__(self, backend: TorchBackend, prepared: TorchPrepared) -> None:
        super().__init__(backend, prepared)
        self._lab_dev: torch.Tensor | None = None
        self._lab_host_stale = False

    @property
    def labels(self) -> np.ndarray:  # type: ignore[override]
        if self._lab_host_stale:
            self._labels_host = self._lab_dev.cpu().numpy().astype(np.int32, copy=False)
            self._lab_host_stale = False
        return self._labels_host

    @labels.setter
    def labels(self, value: np.ndarray) -> None:
        self._labels_host = value

    def step(self, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
        C = check_centers(centers, self.d)
        backend: TorchBackend = self.backend  # type: ignore[assignment]
        lab, sums, counts, inertia = backend.assign_device(self.prepared, C)
        if self._lab_dev is None or self._C is None or self._C.shape[0] != C.shape[0]:
            changed = self.n
        else:
            changed = int((lab != self._lab_dev).sum().item())
        self._lab_dev = lab
        self._lab_host_stale = True
        self._C = C.copy()
        return sums, counts, inertia, changed


class TorchBackend(KernelBackend):
    """Kernels on PyTorch tensors (see the module docstring).

    Args:
        device: a torch device string (``"cuda"``, ``"cuda:1"``, or ``"cpu"`` to run the same code on the CPU).
        dtype: ``"float64"`` (exact, default) or ``"float32"`` (faster; documented tolerance).
        threads: unused on CUDA (kept for the common constructor signature).
        use_triton: the fused Triton k-means kernel: ``None`` = on CUDA when available, ``True``/``False`` to force
            (``True`` on the CPU device needs ``TRITON_INTERPRET=1``, for tests).
        points_per_cell: target mean occupancy of the kNN grid's cells.
    """

    name = "torch"

    def __init__(
        self,
        device: str = "cuda",
        dtype: str = "float64",
        threads: int = 1,
        use_triton: bool | None = None,
        points_per_cell: int = _POINTS_PER_CELL,
    ) -> None:
        _require_torch()
        if dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
        self.device = str(torch.device(device))
        self.dtype = torch.float64 if dtype == "float64" else torch.float32
        self.threads = threads
        self.points_per_cell = int(points_per_cell)
        on_cuda = torch.device(device).type == "cuda"
        if use_triton is None:
            use_triton = on_cuda and triton_status() == "compiled"
        elif use_triton:
            status = triton_status()
            if status == "unavailable" or (on_cuda and status != "compiled") or (not on_cuda and status != "interpreter"):
                raise RuntimeError(
                    f"use_triton=True on {self.device}: triton is {status}; on the CPU device it needs "
                    "TRITON_INTERPRET=1 set before the first use"
                )
        self.use_triton = bool(use_triton)

    def prepare(self, points: np.ndarray, tree: Any = None) -> TorchPrepared:
        return TorchPrepared(self, points)

    def _prep(self, points: Any) -> TorchPrepared:  # type: ignore[override]
        if isinstance(points, TorchPrepared) and points.backend is self:
            return points
        if isinstance(points, PreparedPoints):
            points = points.points
        return self.prepare(points)

    def synchronize(self) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- k-means -------------------------------------------------------------------------------------------
    def assign_device(
        self, prepared: TorchPrepared, centers: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, float]:
        """One pass: ``(labels on the device (n,) int32, sums (k, d), counts (k,), inertia)``."""
        P = prepared
        C = np.ascontiguousarray(centers, dtype=np.float64)
        k, d = C.shape
        if d != P.d:
            raise ValueError(f"centers must have shape (k, {P.d}), got {C.shape}")
        if P.n == 0:
            lab = torch.empty(0, dtype=torch.int32, device=self.device)
            return lab, np.zeros((k, d)), np.zeros(k, dtype=np.int64), 0.0
        Cd = P.to_local(C)
        if self.use_triton and d <= 3:
            lab, sums, counts, inertia = self._assign_triton(P, Cd, k)
        else:
            lab, sums, counts, inertia = self._assign_eager(P, Cd, k)
        sums = sums.cpu().numpy()
        counts = counts.cpu().numpy().astype(np.int64)
        if self.dtype == torch.float32:
            sums = sums + counts[:, None] * P.origin[None, :]
        return lab, sums, counts, float(inertia)

    def _assign_eager(self, P: TorchPrepared, Cd: torch.Tensor, k: int) -> tuple[Any, Any, Any, Any]:
        X = P.X
        n, d = X.shape
        lab = torch.empty(n, dtype=torch.int32, device=self.device)
        sums = torch.zeros((k, d), dtype=torch.float64, device=self.device)
        counts = torch.zeros(k, dtype=torch.int64, device=self.device)
        inertia = torch.zeros((), dtype=torch.float64, device=self.device)
        tile = max(1024, _KM_TILE // max(1, k // 16))
        for s in range(0, n, tile):
            x = X[s : s + tile]
            D = _sqdist_tile(x, Cd)
            best, j = torch.min(D, dim=1)  # first index of the minimum on ties
            lab[s : s + tile] = j.to(torch.int32)
            counts += torch.bincount(j, minlength=k)
            sums.index_add_(0, j, x.double())
            inertia += best.double().sum()
        return lab, sums, counts, inertia

    def _assign_triton(self, P: TorchPrepared, Cd: torch.Tensor, k: int) -> tuple[Any, Any, Any, Any]:
        ns = _triton_kernels()
        X = P.X
        n, d = X.shape
        k_fuse = k if k * (d + 1) <= _TRITON_FUSE_MAX else 0
        programs = -(-n // _TRITON_BLOCK)
        width = k_fuse * (d + 1) + 1
        lab = torch.empty(n, dtype=torch.int32, device=self.device)
        part = torch.empty((programs, width), dtype=torch.float64, device=self.device)
        kwargs: dict[str, Any] = {}
        if not ns.interpret:
            kwargs = {"num_warps": 4, "enable_fp_fusion": False}
        ns.kmeans_pass[(programs,)](X, Cd.contiguous(), lab, part, n, k, D=d, K_FUSE=k_fuse,
                                    BLOCK=_TRITON_BLOCK, **kwargs)
        tot = part.sum(dim=0)
        inertia = tot[-1]
        if k_fuse:
            kd = tot[:-1].view(k, d + 1)
            counts = kd[:, 0].round().to(torch.int64)
            sums = kd[:, 1:]
        else:
            j = lab.long()
            counts = torch.bincount(j, minlength=k)
            sums = torch.zeros((k, d), dtype=torch.float64, device=self.device).index_add_(0, j, X.double())
        return lab, sums, counts, inertia

    def kmeans_assign_sums(
        self, points: Any, centers: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        lab, sums, counts, inertia = self.assign_device(self._prep(points), centers)
        return lab.cpu().numpy().astype(np.int32, copy=False), sums, counts, inertia

    def nearest_center(self, points: Any, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        P = self._prep(points)
        C = np.ascontiguousarray(centers, dtype=np.float64)
        if P.n == 0:
            return np.empty(0, dtype=np.int32), np.empty(0)
        Cd = P.to_local(C)
        labs, d2s = [], []
        tile = max(1024, _KM_TILE // max(1, C.shape[0] // 16))
        for s in range(0, P.n, tile):
            best, j = torch.min(_sqdist_tile(P.X[s : s + tile], Cd), dim=1)
            labs.append(j.to(torch.int32))
            d2s.append(best.double())
        return torch.cat(labs).cpu().numpy(), torch.cat(d2s).cpu().numpy()

    def lloyd_state(self, points: Any) -> TorchLloydState:
        return TorchLloydState(self, self._prep(points))

    # -- kNN ------------------------------------------------------------------------------------------------
    def knn(
        self, points: Any, queries: np.ndarray, k: int, bound: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        P = self._prep(points)
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        Qh = np.atleast_2d(np.asarray(queries, dtype=np.float64))
        m = len(Qh)
        if m == 0 or P.n == 0:
            return np.full((m, k), np.inf), np.full((m, k), -1, dtype=np.int64)
        if Qh.shape[1] != P.d:
            raise ValueError(f"queries must be (m, {P.d}), got {Qh.shape}")
        d2, rows = self.knn_device(P, Qh, k, bound)
        dist = np.sqrt(d2.double().cpu().numpy())  # numpy: correctly rounded (torch's CPU sqrt is not)
        rows = rows.cpu().numpy()
        if bound is not None:
            ub = np.nextafter(np.asarray(bound, dtype=np.float64), np.inf)
            out = dist > ub[:, None]
            dist[out] = np.inf
            rows[out] = -1
        return dist, rows

    def knn_device(
        self, P: TorchPrepared, Qh: np.ndarray, k: int, bound: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(squared distances (m, k) compute dtype, rows (m, k) int64)`` on the device; ``inf``/``-1`` pads."""
        Q = P.to_local(Qh)
        if P.d > 3:
            return torch_knn_bruteforce(P.X, Q, k, exact=self.dtype == torch.float64)
        g = P.grid
        m = Q.shape[0]
        dev = Q.device
        out_d = torch.full((m, k), float("inf"), dtype=self.dtype, device=dev)
        out_i = torch.full((m, k), -1, dtype=torch.int64, device=dev)
        Qd = Q.double()
        qcell = g.cells_of(Qd)
        bnd = None if bound is None else torch.as_tensor(np.asarray(bound, dtype=np.float64), device=dev)
        d_eff = g.d
        R = max(1, math.ceil((k / (max(1, self.points_per_cell) * _unit_ball(d_eff))) ** (1.0 / d_eff)))
        todo = torch.arange(m, device=dev)
        Gmax = int(g.G.max())
        while todo.numel():
            c = qcell[todo]
            a = torch.clamp(c - R, min=0)
            b = torch.minimum(c + R, g.Gt - 1)
            d_sel, i_sel, cnt = self._knn_window(P, Q[todo], a, b, k)
            # certified radius: distance from the query to the nearest window face that has points beyond it
            qd = Qd[todo]
            low_face = g.lo + a.double() * g.w
            high_face = g.lo + (b + 1).double() * g.w
            inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
            dl = torch.where(a > 0, qd - low_face, inf)
            dh = torch.where(b < g.Gt - 1, high_face - qd, inf)
            rc = torch.minimum(dl, dh).min(dim=1).values - g.margin
            kth = torch.sqrt(d_sel[:, k - 1].double())  # inf when fewer than k candidates
            done = kth <= rc
            if bnd is not None:
                done |= bnd[todo] <= rc
            if R >= Gmax:
                done[:] = True  # the window is the whole grid
            idx = todo[done]
            out_d[idx] = d_sel[done]
            out_i[idx] = i_sel[done]
            todo = todo[~done]
            R *= 2
        return out_d, out_i

    def _knn_window(
        self, P: TorchPrepared, Q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact k nearest among the points of each query's window: ``(d2 (m, k), rows (m, k), counts (m,))``."""
        g = P.grid
        m = Q.shape[0]
        dev = Q.device
        out_d = torch.full((m, k), float("inf"), dtype=self.dtype, device=dev)
        out_i = torch.full((m, k), -1, dtype=torch.int64, device=dev)
        counts = torch.zeros(m, dtype=torch.int64, device=dev)
        q_rows, rs, re = g.window_rows(a, b)
        for q0, q1, r0, r1 in _chunks_by_pairs(q_rows, re - rs, m, _PAIR_BUDGET):
            qc, pos = _expand(q_rows[r0:r1], rs[r0:r1], re[r0:r1])
            if qc.numel() == 0:
                continue
            d2 = _sqdist_pairs(g.Xs[pos], Q[qc])
            # segmented top-k: pairs are grouped by query; order by distance within each query
            o = torch.sort(d2, stable=True).indices
            o = o[torch.sort(qc[o], stable=True).indices]
            qs = qc[o]
            cnt = torch.bincount(qs - q0, minlength=q1 - q0)
            first = torch.cumsum(cnt, 0) - cnt
            kk = torch.arange(k, device=dev)
            take = first[:, None] + kk[None, :]
            valid = kk[None, :] < cnt[:, None]
            take = torch.where(valid, take, torch.zeros_like(take))
            sel = o[take]
            dd = torch.where(valid, d2[sel], torch.full_like(d2[sel], float("inf")))
            ii = torch.where(valid, g.perm[pos[sel]], torch.full_like(sel, -1))
            out_d[q0:q1] = dd
            out_i[q0:q1] = ii
            counts[q0:q1] = cnt
        return out_d, out_i, counts

    # -- radius / box -----------------------------------------------------------------------------------------
    def _window_filter(self, P: TorchPrepared, blo: np.ndarray, bhi: np.ndarray, keep_fn: Any) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the points in the cells covering the boxes [blo, bhi] that pass ``keep_fn(q, pts)``; CSR."""
        g = P.grid
        dev = P.X.device
        m = len(blo)
        a, b = g.cell_range(torch.as_tensor(blo, device=dev), torch.as_tensor(bhi, device=dev))
        q_rows, rs, re = g.window_rows(a, b)
        qs, rows = [], []
        for q0, q1, r0, r1 in _chunks_by_pairs(q_rows, re - rs, m, _PAIR_BUDGET):
            qc, pos = _expand(q_rows[r0:r1], rs[r0:r1], re[r0:r1])
            if qc.numel() == 0:
                continue
            keep = keep_fn(qc, g.Xs[pos])
            qs.append(qc[keep])
            rows.append(g.perm[pos[keep]])
        return _csr(qs, rows, m, P.n, dev)

    def radius(self, points: Any, centers: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        P = self._prep(points)
        Ch = np.atleast_2d(np.asarray(centers, dtype=np.float64))
        m = len(Ch)
        r = np.broadcast_to(np.asarray(radii, dtype=np.float64), (m,)).copy()
        if m == 0 or P.n == 0:
            return _empty_csr(m)
        Cq = P.to_local(Ch)
        r2 = torch.as_tensor(r * r, device=Cq.device, dtype=self.dtype)
        if P.d > 3:
            return self._brute_filter(P, m, lambda q0, q1, D: D <= r2[q0:q1, None], Cq)
        return self._window_filter(
            P, Ch - r[:, None], Ch + r[:, None], lambda qc, pts: _sqdist_pairs(pts, Cq[qc]) <= r2[qc]
        )

    def box(self, points: Any, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        P = self._prep(points)
        lo, hi = _as_boxes(lo, hi, P.d)
        m = len(lo)
        if m == 0 or P.n == 0:
            return _empty_csr(m)
        dev = P.X.device
        # compare in float64 on the original coordinates (exact in both dtypes)
        lo_t = torch.as_tensor(lo, device=dev)
        hi_t = torch.as_tensor(hi, device=dev)
        org = torch.as_tensor(P.origin, device=dev)

        def inside(qc: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
            p = pts.double() + org if self.dtype == torch.float32 else pts
            return ((p >= lo_t[qc]) & (p <= hi_t[qc])).all(dim=1)

        if P.d > 3:
            qs, rows = [], []
            for q in range(m):  # boxes in high dimension: one mask per box
                hit = torch.nonzero(inside(torch.full((P.n,), q, device=dev), P.X)).flatten()
                qs.append(torch.full_like(hit, q))
                rows.append(hit)
            return _csr(qs, rows, m, P.n, dev)
        return self._window_filter(P, lo, hi, inside)

    def _brute_filter(self, P: TorchPrepared, m: int, keep: Any, Cq: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        qs, rows = [], []
        q_tile = 1024
        for q0 in range(0, m, q_tile):
            q1 = min(q0 + q_tile, m)
            for p0 in range(0, P.n, 1 << 16):
                D = _sqdist_tile(Cq[q0:q1], P.X[p0 : p0 + (1 << 16)])
                qi, pi = torch.nonzero(keep(q0, q1, D), as_tuple=True)
                qs.append(qi + q0)
                rows.append(pi + p0)
        return _csr(qs, rows, m, P.n, P.X.device)

    def distance_tile(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        A = torch.as_tensor(np.atleast_2d(np.asarray(a, dtype=np.float64))).to(self.device, self.dtype)
        B = torch.as_tensor(np.atleast_2d(np.asarray(b, dtype=np.float64))).to(self.device, self.dtype)
        if self.dtype == torch.float32:  # shift to a common origin before the float32 arithmetic
            org = torch.minimum(A.min(0).values, B.min(0).values) if len(A) and len(B) else 0.0
            A, B = A - org, B - org
        return _sqdist_tile(A, B).double().cpu().numpy()


def _csr(qs: list, rows: list, m: int, n: int, dev: Any) -> tuple[np.ndarray, np.ndarray]:
    """(query, row) pairs to CSR with rows ascending per query."""
    if not qs:
        return _empty_csr(m)
    q = torch.cat(qs)
    r = torch.cat(rows)
    key = torch.sort(q * max(n, 1) + r).values
    q = key // max(n, 1)
    r = key - q * max(n, 1)
    offsets = torch.zeros(m + 1, dtype=torch.int64, device=dev)
    torch.cumsum(torch.bincount(q, minlength=m), 0, out=offsets[1:])
    return offsets.cpu().numpy(), r.cpu().numpy()


def _unit_ball(d: int) -> float:
    return math.pi ** (d / 2) / math.gamma(d / 2 + 1)
