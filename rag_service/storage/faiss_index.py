"""One collection's FAISS index under a chosen type: exact, HNSW or IVF.

A collection's *index spec* names the type and its parameters, as text kept
in the catalog (``flat``, ``hnsw:m=32,ef_search=64``, ``ivfpq:nlist=1024``):

- ``flat``: exact inner product over every vector (the default).
- ``hnsw``: a graph, ``m`` links per node.  HNSW cannot remove vectors, so a
  deleted chunk becomes a *tombstone*: excluded from every search by an
  ``IDSelector`` until the index is rebuilt (``needs_compaction``).
- ``ivf``: vectors clustered into ``nlist`` lists, ``nprobe`` searched.
- ``ivfpq``: the same with vectors compressed to ``m`` codes of ``nbits``;
  the best ``rerank * k`` candidates are rescored exactly by the caller from
  the catalog's float vectors (``rerank=0`` keeps the compressed scores).

IVF types need training: until a collection holds ``train_min`` vectors they
stay exact (a flat index) and train themselves from those vectors once there
are enough.  Whatever the type, ``ids()`` is exactly the set of live chunk ids
and a search never returns an id outside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import numpy.typing as npt

from rag_service.errors import InvalidRequest

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "ivf", "ivfpq"]
INDEX_KINDS: tuple[str, ...] = get_args(IndexKind)

#: Every parameter each kind takes, with its default and its allowed range.
PARAMS: dict[str, dict[str, tuple[int, int, int]]] = {
    "flat": {},
    "hnsw": {
        "m": (32, 4, 128),
        "ef_construction": (80, 8, 2048),
        "ef_search": (128, 8, 4096),
    },
    "ivf": {"nlist": (1024, 1, 65536), "nprobe": (16, 1, 65536)},
    "ivfpq": {
        "nlist": (1024, 1, 65536),
        "nprobe": (16, 1, 65536),
        "m": (48, 1, 384),
        "nbits": (8, 4, 12),
        "rerank": (8, 0, 64),
    },
}

#: Tombstones above this share of live vectors (and at least ``_TOMBSTONES_MIN``) ask for a rebuild.
_TOMBSTONE_SHARE = 0.2
_TOMBSTONES_MIN = 1024


def _faiss() -> Any:
    import faiss

    return faiss


@dataclass(frozen=True)
class IndexSpec:
    """A FAISS index type with its parameters; text form ``kind:key=value,...``."""

    kind: IndexKind = "flat"
    params: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> IndexSpec:
        """The spec written as ``text``; ``InvalidRequest`` saying what is wrong."""
        kind, _, rest = text.strip().lower().partition(":")
        if kind not in INDEX_KINDS:
            raise InvalidRequest(
                f"unknown index type {kind!r}: use one of {', '.join(INDEX_KINDS)}"
                " (e.g. 'hnsw:m=32,ef_search=64')"
            )
        allowed = PARAMS[kind]
        values = {name: default for name, (default, _, _) in allowed.items()}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            name, eq, raw = item.partition("=")
            name = name.strip()
            if name not in allowed:
                known = ", ".join(allowed) or "none"
                raise InvalidRequest(
                    f"index type {kind!r} has no parameter {name!r} (parameters: {known})"
                )
            if not eq:
                raise InvalidRequest(f"index parameter {name!r} needs a value: {name}=N")
            try:
                value = int(raw)
            except ValueError:
                raise InvalidRequest(
                    f"index parameter {name!r} needs an integer, got {raw!r}"
                ) from None
            _, low, high = allowed[name]
            if not low <= value <= high:
                raise InvalidRequest(f"index parameter {name}={value} is outside {low}..{high}")
            values[name] = value
        if "nprobe" in values and values["nprobe"] > values["nlist"]:
            raise InvalidRequest(f"nprobe={values['nprobe']} exceeds nlist={values['nlist']}")
        return cls(cast(IndexKind, kind), tuple(values.items()))

    def __str__(self) -> str:
        if not self.params:
            return self.kind
        return f"{self.kind}:" + ",".join(f"{k}={v}" for k, v in self.params)

    def get(self, name: str) -> int:
        return dict(self.params)[name]

    def check(self, dim: int) -> IndexSpec:
        """``self`` if it fits vectors of ``dim`` dimensions, else ``InvalidRequest``."""
        if self.kind == "ivfpq" and dim % self.get("m"):
            raise InvalidRequest(
                f"ivfpq m={self.get('m')} must divide the vector dimension {dim}"
                " (e.g. m=48 or m=96 for 384 dimensions)"
            )
        return self

    def same_structure(self, other: IndexSpec) -> bool:
        """True when only search-time parameters differ (no rebuild needed)."""
        search_time = {"ef_search", "nprobe", "rerank"}
        mine = {k: v for k, v in self.params if k not in search_time}
        theirs = {k: v for k, v in other.params if k not in search_time}
        return self.kind == other.kind and mine == theirs

    @property
    def train_min(self) -> int:
        """Vectors an IVF type needs before it trains (0: no training)."""
        if self.kind == "ivf":
            return 39 * self.get("nlist")
        if self.kind == "ivfpq":
            return 39 * max(self.get("nlist"), 1 << self.get("nbits"))
        return 0

    @property
    def rerank(self) -> int:
        """How many candidates per result the caller rescores exactly (0: none)."""
        return self.get("rerank") if self.kind == "ivfpq" else 0


FLAT = IndexSpec()


@dataclass
class FaissIndex:
    """A collection's vectors under one spec, with the set of live ids kept beside them."""

    spec: IndexSpec
    dim: int
    index: Any = None
    live: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    tombstones: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = self._empty(trained=False)

    # -- structure -------------------------------------------------------------

    @property
    def active_kind(self) -> IndexKind:
        """The type actually searched: an IVF type is ``flat`` until trained."""
        faiss = _faiss()
        if isinstance(self.index, faiss.IndexIVF):
            return self.spec.kind
        inner = faiss.downcast_index(self.index.index)
        return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"

    def _empty(self, *, trained: bool) -> Any:
        faiss = _faiss()
        ip = faiss.METRIC_INNER_PRODUCT
        spec, d = self.spec, self.dim
        if spec.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(d, spec.get("m"), ip)
            inner.hnsw.efConstruction = spec.get("ef_construction")
            return faiss.IndexIDMap2(inner)
        if spec.kind in ("ivf", "ivfpq") and trained:
            quantizer = faiss.IndexFlatIP(d)
            if spec.kind == "ivf":
                return faiss.IndexIVFFlat(quantizer, d, spec.get("nlist"), ip)
            return faiss.IndexIVFPQ(
                quantizer, d, spec.get("nlist"), spec.get("m"), spec.get("nbits"), ip
            )
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))

    @property
    def ntotal(self) -> int:
        return len(self.live)

    def ids(self) -> npt.NDArray[np.int64]:
        """Live chunk ids, ascending."""
        return self.live

    def memory_bytes(self) -> int:
        """Bytes the serialized index takes (what a snapshot weighs)."""
        return int(_faiss().serialize_index(self.index).nbytes)

    # -- changes ---------------------------------------------------------------

    def add(self, ids: npt.NDArray[np.int64], vecs: npt.NDArray[np.float32]) -> None:
        """Add vectors under their chunk ids (ids not already live)."""
        if not len(ids):
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids)
        ordered = np.sort(ids)
        if not len(self.live) or ordered[0] > self.live[-1]:  # the usual case: newer chunks
            self.live = np.concatenate([self.live, ordered])
        else:
            self.live = np.union1d(self.live, ordered)

    def remove(self, ids: npt.NDArray[np.int64]) -> int:
        """Remove live ids; HNSW keeps them as tombstones.  Returns how many went."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        at = np.searchsorted(self.live, wanted)
        held = at < len(self.live)
        held[held] = self.live[at[held]] == wanted[held]
        gone, at = wanted[held], at[held]
        if not len(gone):
            return 0
        if self.active_kind == "hnsw":
            self.tombstones = np.union1d(self.tombstones, gone)
        else:
            self.index.remove_ids(_faiss().IDSelectorBatch(gone))
        self.live = np.delete(self.live, at)
        return len(gone)

    @property
    def needs_compaction(self) -> bool:
        """Tombstones have piled up: rebuilding would drop them."""
        n = len(self.tombstones)
        return n >= _TOMBSTONES_MIN and n > _TOMBSTONE_SHARE * max(1, self.ntotal)

    @property
    def needs_training(self) -> bool:
        """An IVF type, still exact, now holding enough vectors to train."""
        return (
            self.spec.train_min > 0
            and self.active_kind == "flat"
            and (self.ntotal >= self.spec.train_min)
        )

    def train(self) -> None:
        """Turn a still-exact IVF index into the real thing, from its own vectors."""
        faiss = _faiss()
        ids = np.asarray(faiss.vector_to_array(self.index.id_map), dtype=np.int64)
        vecs = faiss.downcast_index(self.index.index).reconstruct_n(0, len(ids))
        self.index = self.build(self.spec, self.dim, ids, vecs).index

    @classmethod
    def build(
        cls,
        spec: IndexSpec,
        dim: int,
        ids: npt.NDArray[np.int64],
        vecs: npt.NDArray[np.float32],
    ) -> FaissIndex:
        """A fresh index of ``spec`` over the given vectors (trained if there are enough)."""
        out = cls(spec, dim)
        if spec.train_min and len(ids) >= spec.train_min:
            out.index = out._empty(trained=True)
            # A sample is enough for k-means; more only costs time.
            cap = max(spec.train_min, 64 * spec.get("nlist"))
            rng = np.random.default_rng(0)
            sample = vecs if len(vecs) <= cap else vecs[rng.choice(len(vecs), cap, replace=False)]
            out.index.train(np.ascontiguousarray(sample, dtype=np.float32))
        for start in range(0, len(ids), 65536):
            out.add(ids[start : start + 65536], vecs[start : start + 65536])
        return out

    # -- searching -------------------------------------------------------------

    def search(
        self, query: npt.NDArray[np.float32], k: int, *, exhaustive: bool = False
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Up to ``k`` live ids nearest ``query`` (one row) by inner product, best first.

        Approximate types may find fewer than ``k`` (a small ``nprobe``, a
        graph cut off by tombstones); then, or with ``exhaustive``, the search
        covers every vector, so a caller paging through results misses none.
        IVF-PQ scores are approximate; see ``IndexSpec.rerank``.
        """
        k = min(k, self.ntotal)
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        if not exhaustive:
            scores, ids = self.index.search(q, k, params=self._params(exhaustive=False, k=k))
            found = ids[0] >= 0
            if int(found.sum()) >= k:
                return ids[0], scores[0]
        if self.active_kind == "hnsw":
            return self._exact_hnsw(q, k)
        scores, ids = self.index.search(q, k, params=self._params(exhaustive=True, k=k))
        found = ids[0] >= 0
        return ids[0][found], scores[0][found]

    def _exact_hnsw(
        self, q: npt.NDArray[np.float32], k: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Exact search of the vectors an HNSW graph keeps beside it, tombstones dropped."""
        faiss = _faiss()
        storage = faiss.downcast_index(faiss.downcast_index(self.index.index).storage)
        scores, rows = storage.search(q, min(k + len(self.tombstones), storage.ntotal))
        id_map = faiss.vector_to_array(self.index.id_map)
        found = rows[0] >= 0
        labels = id_map[rows[0][found]].astype(np.int64)
        keep = ~np.isin(labels, self.tombstones)
        return labels[keep][:k], scores[0][found][keep][:k]

    def _params(self, *, exhaustive: bool, k: int) -> Any:
        faiss = _faiss()
        kind = self.active_kind
        if kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.spec.get("ef_search"), k)
            if len(self.tombstones):
                params.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.tombstones))
            return params
        if kind in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF()
            nlist = self.spec.get("nlist")
            params.nprobe = nlist if exhaustive else min(self.spec.get("nprobe"), nlist)
            return params
        return None

    # -- files -----------------------------------------------------------------

    def write(self, path: Path) -> None:
        """Serialize the index to ``path`` (the caller makes it atomic)."""
        _faiss().write_index(self.index, str(path))

    @classmethod
    def read(cls, path: Path, spec: IndexSpec, dim: int) -> FaissIndex | None:
        """The index in ``path`` if it is of ``spec``'s structure and ``dim``, else None.

        Ids of an HNSW snapshot include tombstones (they are not written
        apart): the catch-up after loading finds them missing from the
        catalog and tombstones them again.
        """
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            log.warning("unreadable snapshot path=%s; rebuilding", path)
            return None
        if index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            log.warning("snapshot dim or metric differs path=%s; rebuilding", path)
            return None
        out = cls(spec, dim, index=index)
        if not out._matches_spec():
            log.info("snapshot is of another index type path=%s spec=%s; rebuilding", path, spec)
            return None
        ids = out._stored_ids()
        if len(np.unique(ids)) != len(ids):
            log.warning("snapshot holds duplicate ids path=%s; rebuilding", path)
            return None
        out.live = np.sort(ids)
        return out

    def _stored_ids(self) -> npt.NDArray[np.int64]:
        faiss = _faiss()
        if isinstance(self.index, faiss.IndexIVF):
            inv = self.index.invlists
            parts = [
                np.array(faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)), dtype=np.int64)
                for i in range(inv.nlist)
                if inv.list_size(i)
            ]
            return np.concatenate(parts) if parts else np.empty(0, np.int64)
        if self.index.ntotal == 0:
            return np.empty(0, np.int64)
        return np.asarray(faiss.vector_to_array(self.index.id_map), dtype=np.int64)

    def _matches_spec(self) -> bool:
        faiss, spec, index = _faiss(), self.spec, self.index
        if isinstance(index, faiss.IndexIVFPQ):
            return (
                spec.kind == "ivfpq"
                and index.nlist == spec.get("nlist")
                and spec.get("m") == index.pq.M
                and index.pq.nbits == spec.get("nbits")
            )
        if isinstance(index, faiss.IndexIVFFlat):
            return spec.kind == "ivf" and index.nlist == spec.get("nlist")
        if not isinstance(index, faiss.IndexIDMap2):
            return False
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSWFlat):
            return spec.kind == "hnsw" and inner.hnsw.nb_neighbors(1) == spec.get("m")
        # An untrained IVF collection is held exactly until it has enough vectors.
        return isinstance(inner, faiss.IndexFlatIP) and (
            spec.kind == "flat" or (spec.train_min > 0 and index.ntotal < spec.train_min)
        )
