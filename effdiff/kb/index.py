"""faiss indexes for the knowledge base's keys: built from a factory string, read memory-mapped.

The index only proposes a short list of candidates from compressed codes (PQ after PCA or OPQ, with
or without IVF); the store re-ranks that list exactly from the float16 keys on disk. So the index
can be small and coarse: what it must do is keep the true nearest neighbour in its short list.

What faiss does not do and is written here: translating faiss's training-size failures into one
line that names a smaller index; dropping the PCA eigenvector matrix that faiss keeps after training
(d_in x d_in floats: 1 GiB at SD1.5's 16,384-d keys, never used again once the projection is made);
and the bytes-per-entry accounting.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effdiff.artifacts import atomic_path
from effdiff.errors import EffdiffError

DEFAULT_FACTORY = "PCA256,IVF256,PQ16"


def _faiss() -> Any:
    import faiss

    return faiss


@dataclass(frozen=True)
class IndexInfo:
    """What the KB manifest records about an index."""

    factory: str
    dim: int
    ntotal: int
    code_bytes: int  # compressed bytes per entry (faiss sa_code_size)
    id_bytes: int  # 8 for IVF (its inverted lists store int64 ids), 0 for flat code arrays
    file_bytes: int  # the index file on disk
    nprobe: int  # IVF lists visited per query (0: not an IVF index)
    shortlist: int  # candidates re-ranked exactly from the float16 keys
    train_points: int
    note: str = ""

    @property
    def entry_bytes(self) -> int:
        """Bytes per entry in RAM once the index is resident: its code and, for IVF, its id."""
        return self.code_bytes + self.id_bytes

    @property
    def fixed_bytes(self) -> int:
        """Transforms, codebooks and coarse centroids: independent of the number of entries."""
        return max(0, self.file_bytes - self.ntotal * self.entry_bytes)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IndexInfo:
        return cls(**data)


def _suggest(n: int) -> str:
    """A factory string that trains on `n` points: PQ with 4-bit codes needs 16, PCA needs its width."""
    if n < 16:
        return "Flat (exact, uncompressed)"
    width = min(64, 2 ** int(math.log2(n)))
    return f"PCA{width},PQ{min(width, 8)}x4"


def _components(index: Any) -> Iterator[Any]:
    """The index and, for a pre-transform chain, its transforms and inner index (downcast)."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    yield index
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            yield faiss.downcast_VectorTransform(index.chain.at(i))
        yield from _components(index.index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf is not index:
        yield faiss.downcast_index(ivf)


@contextlib.contextmanager
def _quiet_training(index: Any) -> Iterator[None]:
    """faiss prints one WARNING line per sub-quantizer when there are fewer than 39 points per centroid;
    the build reports that once instead. Polysemous training (the index factory's default for PQ) only
    serves Hamming-filtered search, which this store does not use, and costs most of the training time."""
    faiss = _faiss()
    for part in _components(index):
        if isinstance(part, faiss.IndexPQ | faiss.IndexIVFPQ):
            part.do_polysemous_training = False
            part.pq.cp.min_points_per_centroid = 1
        if isinstance(part, faiss.IndexIVF):
            part.cp.min_points_per_centroid = 1
        if isinstance(part, faiss.OPQMatrix):
            part.verbose = False
    yield


def _training_note(index: Any, n: int) -> str:
    """One line when a k-means in the index has fewer than faiss's recommended 39 points per centroid."""
    faiss = _faiss()
    wants = []
    for part in _components(index):
        if isinstance(part, faiss.IndexIVF):
            wants.append(39 * part.nlist)
        if isinstance(part, faiss.IndexPQ | faiss.IndexIVFPQ):
            wants.append(39 * part.pq.ksub)
    need = max(wants, default=0)
    if n < need:
        return f"trained on {n} points; faiss recommends at least {need} for this index"
    return ""


def train_index(factory: str, sample: np.ndarray, what: str = "keys") -> tuple[Any, str]:
    """An untrained index from `factory` trained on `sample` (n, d) float32; EffdiffError in one line
    when the string is malformed, does not fit the dimension, or needs more training points."""
    faiss = _faiss()
    n, dim = sample.shape
    if not isinstance(factory, str) or not factory.strip():
        raise EffdiffError("the index factory string is empty; e.g. PCA256,IVF256,PQ16")
    if re.search(r"(^|,)IDMap", factory):
        raise EffdiffError(f"index {factory!r}: IDMap is not supported (entries are numbered in order)")
    try:
        index = faiss.index_factory(dim, factory)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].split("Error: ")[-1]
        raise EffdiffError(f"bad index factory string {factory!r} for {dim}-d {what}: {reason}") from None
    if index.metric_type != faiss.METRIC_L2:
        raise EffdiffError(f"index {factory!r}: only L2 indexes are supported")
    with _quiet_training(index):
        try:
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        except RuntimeError as exc:
            text = str(exc)
            if "training points" in text or "cannot output" in text or "nx >= " in text:
                raise EffdiffError(
                    f"index {factory!r} needs more training points than the {n} entries of this "
                    f"knowledge base; build more entries or pass a smaller index, e.g. --index "
                    f"'{_suggest(n)}'"
                ) from None
            reason = text.strip().splitlines()[-1].split("Error: ")[-1]
            raise EffdiffError(f"index {factory!r} failed to train on {what}: {reason}") from None
    for part in _components(index):
        if isinstance(part, faiss.PCAMatrix):
            part.PCAMat.clear()  # eigenvectors (d_in x d_in); the projection A, b is all search needs
    return index, _training_note(index, n)


def add_in_chunks(index: Any, rows: np.ndarray, chunk: int = 65536) -> None:
    """Add float16 rows (a memory map) in float32 chunks, so RAM holds one chunk at a time."""
    for start in range(0, len(rows), chunk):
        index.add(np.ascontiguousarray(rows[start : start + chunk], dtype=np.float32))


# Up to this many queries a search runs on one OpenMP thread: waking faiss's thread pool costs more than
# the search itself (a single lookup on the reference KB: 16 ms with 2 threads on 2 busy cores, 0.2 ms
# with 1).
FEW_QUERIES = 8


@contextlib.contextmanager
def search_threads(queries: int) -> Iterator[None]:
    """One faiss thread for a few queries, faiss's own choice for batches; restored afterwards."""
    if queries > FEW_QUERIES:
        yield
        return
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def set_nprobe(index: Any, nprobe: int) -> int:
    """Set IVF lists visited per query; returns the value set (0 for non-IVF indexes)."""
    ivf = _faiss().try_extract_index_ivf(index)
    if ivf is None:
        return 0
    ivf.nprobe = max(1, min(int(nprobe), ivf.nlist))
    return int(ivf.nprobe)


def describe(
    index: Any, factory: str, path: Path, nprobe: int, shortlist: int, n_train: int, note: str
) -> IndexInfo:
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    return IndexInfo(
        factory=factory,
        dim=int(index.d),
        ntotal=int(index.ntotal),
        # IVF lists store the PQ code and an id; sa_code_size would add the list number to the code
        code_bytes=int(ivf.code_size if ivf is not None else index.sa_code_size()),
        id_bytes=8 if ivf is not None else 0,
        file_bytes=Path(path).stat().st_size,
        nprobe=set_nprobe(index, nprobe),
        shortlist=int(shortlist),
        train_points=int(n_train),
        note=note,
    )


def write_index(index: Any, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        _faiss().write_index(index, str(tmp))


def read_index_mmap(path: Path) -> Any:
    """Read-only and memory-mapped: codes and inverted lists stay in the page cache, not the heap."""
    faiss = _faiss()
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].split("Error: ")[-1]
        raise EffdiffError(f"cannot read the faiss index {path}: {reason}") from None
