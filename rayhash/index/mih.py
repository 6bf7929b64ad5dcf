"""Multi-index hashing: exact k-NN and radius search on binary codes by probing hash tables instead of scanning.

Norouzi, Punjani & Fleet, "Fast search in Hamming space with multi-index hashing" (CVPR 2012, TPAMI 2014): split
the code into m substrings of b bits; a code within Hamming distance r of the query is within ⌊r/m⌋ bits of it on
at least one substring. Probing table j with every substring value within f bits of the query's, for f = 0, 1, ...
and j = 0 .. m-1 in turn, has found every code within distance m·f + j once table j is probed at radius f (the
tables before it at f, those after at f - 1). A query is answered exactly once its k-th nearest candidate, by
(distance, rank), is within that bound, whatever the radius each query needs. A code matching several tables is
compared only where it is first met (read off its substring distances, no set), so at most once per query.

Tables: per table the code positions sorted by substring (``perm``), for each value of the substring's top
``dbits`` bits where its codes start (``dirs``, about n/4 slots) and the substring's remaining low bits in sorted
order (``lows``, 16 bits wide up to 16 low bits), bisected within a slot. Beside the codes that is 4 + 2 + ≤1 bytes
per code and table: at 64 bits 2.75x a flat index's memory with 2 tables, 3.6x with 3.

Probe or scan, per query: before probing, a query's work is predicted from the occupancy of its buckets at 0 and 1
flips (:func:`_estimate`) and compared with a scan's cost in the same units, measured once when the tables are built
(:meth:`MultiIndex.calibrate`); a query predicted dearer is left to its caller to scan. A probed query whose work
(probes and candidates, counted in the codes a flat scan compares in the same time) passes ``BUDGET`` scans stops
and is scanned too, so no query costs more than 1 + ``BUDGET`` scans. Nothing depends on earlier batches: the first
batch after loading is searched as every later one.

The kernels are compiled by numba (cached on disk, ``nogil``: a batch is split across threads).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from rayhash.index.types import MIH_MAX_TABLE_BITS as MAX_TABLE_BITS, mih_tables

# Costs in codes a flat scan compares in the same time, measured at 10^6-10^7 codes on 2 cores (a scan 1.1-1.4 ns
# per code): a probe (directory slot, bisection) ~11 ns; a candidate (a random read of its code, first-meeting test,
# distance, top-k insertion) 60-140 ns.
PROBE_COST, CANDIDATE_COST = 8, 64
BUDGET = 0.5  # a query probes until its work reaches half a scan, then is scanned
CALIBRATE_MIN, CALIBRATE_QUERIES = 20_000, 256  # calibrate() times 256 queries, from 20,000 codes up


@intrinsic
def _popcount(typingctx, x):
    """One POPCNT instruction (LLVM ctpop) on a uint64."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@njit(inline="always")
def _bits(words, row, start, nbits):
    """Bits [start, start + nbits) of a code stored as uint64 words; nbits <= 32."""
    w, s = start >> 6, start & 63
    v = words[row, w] >> np.uint64(s)
    if s + nbits > 64:
        v |= words[row, w + 1] << np.uint64(64 - s)
    return v & ((np.uint64(1) << np.uint64(nbits)) - np.uint64(1))


@njit(inline="always")
def _distance(words, a, qw, t):
    d = np.uint64(0)
    for w in range(words.shape[1]):
        d += _popcount(words[a, w] ^ qw[t, w])
    return np.int64(d)


@njit(inline="always")
def _masks_start(f):
    """The first b-bit mask with f ones (the next by Gosper's hack, :func:`_next_mask`)."""
    return (np.uint64(1) << np.uint64(f)) - np.uint64(1)


@njit(inline="always")
def _next_mask(mask, f, limit):
    if f == 0:
        return limit  # one probe: the query's own substring
    u = mask & (~mask + np.uint64(1))
    r = mask + u
    return (((r ^ mask) >> np.uint64(2)) // u) | r


@njit(inline="always")
def _bucket(dirs, lows, j, v, shift, lmask):
    """[lo, hi) of the codes whose table-j substring is v: two bisections of the substring's low bits within the
    directory slot of its high bits."""
    pre = np.int64(v >> shift)
    start, end = np.int64(dirs[j, pre]), np.int64(dirs[j, pre + 1])
    low = v & lmask
    lo, hi = start, end
    while lo < hi:
        mid = (lo + hi) >> 1
        if np.uint64(lows[j, mid]) < low:
            lo = mid + 1
        else:
            hi = mid
    first, hi = lo, end
    while lo < hi:
        mid = (lo + hi) >> 1
        if np.uint64(lows[j, mid]) <= low:
            lo = mid + 1
        else:
            hi = mid
    return first, lo


@njit(inline="always")
def _first_met(words, a, qsubs, j, f, b):
    """Whether probing table j at radius f is where code a is first met: no table before j is within f bits of the
    query, none after it within f - 1."""
    for i in range(qsubs.shape[0]):
        if i != j:
            di = _popcount(_bits(words, a, i * b, b) ^ qsubs[i])
            if di < f or (i < j and di == f):
                return False
    return True


@njit(nogil=True, cache=True)
def _estimate(dirs, lows, shift, lmask, b, nbits, n, qsubs, k, limit_work):
    """Predicted work (scan-code units) of probing one query, from the occupancy of its buckets at 0 and 1 flips.

    Uniform codes put n / 2^b codes in a bucket; what the query's buckets hold beyond that (c0 in its own, c1 one
    flip away, over all tables) are codes near it. When at least k are near, probing ends by level 1 (k near at
    0 flips) or 2: its probes plus those candidates. Otherwise its k-th nearest code is in the background: at the
    radius r where n·P(Binomial(bits, 1/2) ≤ r) reaches what is missing, i.e. probing to level ⌊r / m⌋, each level
    f costing m·C(b, f) probes and their n / 2^b candidates each. Stops counting past ``limit_work``."""
    m = dirs.shape[0]
    c0, c1 = 0.0, 0.0
    for j in range(m):
        lo, hi = _bucket(dirs, lows, j, qsubs[j], shift, lmask)
        c0 += hi - lo
        for i in range(b):
            lo, hi = _bucket(dirs, lows, j, qsubs[j] ^ (np.uint64(1) << np.uint64(i)), shift, lmask)
            c1 += hi - lo
    lam = n / 2.0 ** b
    near0, near1 = max(c0 - m * lam, 0.0), max(c1 - m * b * lam, 0.0)
    missing = k - near0 - near1
    if missing <= 0:
        levels = 1 if near0 >= k else 2
    else:
        r, term, cdf = 0, 0.5 ** nbits, 0.5 ** nbits
        while n * cdf < missing and r < nbits:
            term = term * (nbits - r) / (r + 1)
            cdf += term
            r += 1
        levels = r // m
    work, probes = CANDIDATE_COST * (c0 + c1), 1.0
    for f in range(min(levels, b) + 1):
        work += m * probes * (PROBE_COST + CANDIDATE_COST * lam)
        if work > limit_work:
            break
        probes = probes * (b - f) / (f + 1)
    return work


@njit(nogil=True, cache=True)
def _knn(words, perm, dirs, lows, shift, b, rank, stride, nbits, qw, k, scan_units, budget, out, scanned,
         work_out):
    """Exact top-k by (distance, rank) per query into ``out`` (int64 ``distance * stride + rank``, sorted). Queries
    whose predicted probing work (:func:`_estimate`) exceeds ``scan_units`` (a scan's cost, same units) are not
    probed, and queries that run out of ``budget`` stop: both are flagged in ``scanned`` for the caller to scan.
    ``work_out``: the work each query did."""
    m = perm.shape[0]
    lmask = (np.uint64(1) << np.uint64(shift)) - np.uint64(1)
    limit = np.uint64(1) << np.uint64(b)
    qsubs = np.empty(m, np.uint64)
    for t in range(qw.shape[0]):
        for j in range(m):
            qsubs[j] = _bits(qw, t, j * b, b)
        if _estimate(dirs, lows, shift, lmask, b, nbits, words.shape[0], qsubs, k, scan_units) > scan_units:
            scanned[t] = True
            work_out[t] = 0
            continue
        best = out[t]
        count, work, done, broke = 0, 0, False, False
        for f in range(b + 1):
            for j in range(m):
                mask = _masks_start(f)
                while mask < limit and work <= budget:
                    v = qsubs[j] ^ mask
                    lo, hi = _bucket(dirs, lows, j, v, shift, lmask)
                    work += PROBE_COST + CANDIDATE_COST * (hi - lo)
                    for p in range(lo, hi):
                        a = np.int64(perm[j, p])
                        if not _first_met(words, a, qsubs, j, f, b):
                            continue
                        c = _distance(words, a, qw, t) * stride + rank[a]
                        if count < k:
                            x = count
                            count += 1
                        elif c < best[k - 1]:
                            x = k - 1
                        else:
                            continue
                        while x > 0 and best[x - 1] > c:
                            best[x] = best[x - 1]
                            x -= 1
                        best[x] = c
                    mask = _next_mask(mask, f, limit)
                if mask < limit:  # out of budget inside this table
                    broke = True
                    break
                if count == k and best[k - 1] // stride <= m * f + j:
                    done = True
                    break
            if done or broke:
                break
        scanned[t] = broke  # every level probed (k > reachable codes) is complete too
        work_out[t] = work


@njit(nogil=True, cache=True)
def _range(words, perm, dirs, lows, shift, b, rank, qw, radius):
    """All codes within ``radius`` of each query: (query, distance, rank) arrays, unsorted."""
    m = perm.shape[0]
    lmask = (np.uint64(1) << np.uint64(shift)) - np.uint64(1)
    limit = np.uint64(1) << np.uint64(b)
    qsubs = np.empty(m, np.uint64)
    size, cap = 0, 1024
    qid, dist, ranks = np.empty(cap, np.int64), np.empty(cap, np.int32), np.empty(cap, np.int64)
    for t in range(qw.shape[0]):
        for j in range(m):
            qsubs[j] = _bits(qw, t, j * b, b)
        for f in range(min(b, radius // m) + 1):
            for j in range(m if f < radius // m else radius % m + 1):  # stop at m·f + j = radius
                mask = _masks_start(f)
                while mask < limit:
                    lo, hi = _bucket(dirs, lows, j, qsubs[j] ^ mask, shift, lmask)
                    for p in range(lo, hi):
                        a = np.int64(perm[j, p])
                        if not _first_met(words, a, qsubs, j, f, b):
                            continue
                        d = _distance(words, a, qw, t)
                        if d > radius:
                            continue
                        if size == cap:
                            cap *= 2
                            qid, dist, ranks = _grow(qid, cap), _grow(dist, cap), _grow(ranks, cap)
                        qid[size], dist[size], ranks[size] = t, d, rank[a]
                        size += 1
                    mask = _next_mask(mask, f, limit)
    return qid[:size], dist[:size], ranks[:size]


@njit(inline="always")
def _grow(a, cap):
    out = np.empty(cap, a.dtype)
    out[:a.shape[0]] = a
    return out


@njit(nogil=True, cache=True)
def _substrings(words, start, nbits):
    out = np.empty(words.shape[0], np.uint32)
    for a in range(words.shape[0]):
        out[a] = _bits(words, a, start, nbits)
    return out


def _words(codes: np.ndarray) -> np.ndarray:
    """Packed uint8 codes (n, bytes) as uint64 words (n, ceil(bytes / 8)): a view when the width allows."""
    n, nbytes = codes.shape
    if nbytes % 8 == 0 and codes.flags.c_contiguous:
        return codes.view(np.uint64)
    padded = np.zeros((n, -(-nbytes // 8) * 8), np.uint8)
    padded[:, :nbytes] = codes
    return padded.view(np.uint64)


def _chunks(nq: int, threads: int) -> list[slice]:
    parts = max(1, min(threads, nq // 16))
    edges = np.linspace(0, nq, parts + 1).astype(int)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


class MultiIndex:
    """Multi-index hash tables over packed codes (kept as a view, not copied, when their width is a multiple of 64
    bits). ``rank`` orders ties: results are exact by (distance, rank), as int64 ``distance * stride + rank``."""

    def __init__(self, codes: np.ndarray, rank: np.ndarray, stride: int, tables: int | None = None):
        n, nbytes = codes.shape
        bits = nbytes * 8
        self.m, self.b = mih_tables(bits, n) if not tables else (int(tables), bits // int(tables))
        if not 1 <= self.b <= MAX_TABLE_BITS:
            raise ValueError(f"multi-index hashing: {self.m} tables of {self.b} bits; each table takes 1 to "
                             f"{MAX_TABLE_BITS} of the {bits} bits")
        self.n, self.stride, self.rank = n, int(stride), np.ascontiguousarray(rank, np.int64)
        self.bits, self.codes, self.words = bits, codes, _words(codes)
        self.scan_units = float(n)  # a scan's cost per query in work units: n a priori, measured by calibrate()
        dbits = min(self.b, max(1, int(math.log2(max(n, 4))) - 2))  # directory slots: about n/4
        self.shift = self.b - dbits
        position = np.uint32 if n < 2 ** 32 else np.int64
        self.perm = np.empty((self.m, n), position)
        self.dirs = np.empty((self.m, 2 ** dbits + 1), position)
        self.lows = np.empty((self.m, n), np.uint16 if self.shift <= 16 else np.uint32)
        for j in range(self.m):
            sub = _substrings(self.words, j * self.b, self.b)
            order = np.argsort(sub, kind="stable")
            sub = sub[order]
            self.perm[j] = order
            self.dirs[j] = np.searchsorted(sub >> np.uint32(self.shift), np.arange(2 ** dbits + 1, dtype=np.uint32))
            self.lows[j] = sub & np.uint32((1 << self.shift) - 1)
            del sub, order

    @property
    def nbytes(self) -> int:
        """Memory of the tables (the codes not counted)."""
        return self.perm.nbytes + self.dirs.nbytes + self.lows.nbytes

    def _tables(self):
        return self.words, self.perm, self.dirs, self.lows, self.shift, self.b, self.rank

    def search(self, q: np.ndarray, k: int, threads: int = 1,
               scan_units: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(candidates (nq, k) sorted, scanned (nq,) bool): rows flagged ``scanned`` are left for the caller to
        scan (predicted dearer than a scan, or over budget); k <= n. ``scan_units``: a scan's cost per query in
        work units (default: :attr:`scan_units`, measured by :meth:`calibrate`); each query probes only when its
        predicted work is below it, and stops at ``BUDGET`` of it."""
        return self._search(q, k, threads, self.scan_units if scan_units is None else scan_units)[:2]

    def _search(self, q: np.ndarray, k: int, threads: int, scan_units: float) -> tuple[np.ndarray, ...]:
        qw = _words(np.ascontiguousarray(q))
        out = np.full((len(q), k), np.iinfo(np.int64).max, np.int64)
        scanned = np.zeros(len(q), np.bool_)
        work = np.zeros(len(q), np.int64)
        units = float(min(scan_units, 2.0 ** 62))
        budget = int(min(BUDGET * units, 2 ** 62))

        def run(s: slice) -> None:
            _knn(*self._tables(), self.stride, self.bits, qw[s], k, units, budget, out[s], scanned[s], work[s])

        self._map(run, _chunks(len(q), threads))
        return out, scanned, work

    def calibrate(self, scan: Callable[[np.ndarray], Any], threads: int = 1, k: int = 10) -> float:
        """Measure once what a scan costs in probing-work units: the same sample of the codes (as queries) probed
        (its work counted by the kernel) and scanned, best of two timings each. Sets and returns
        :attr:`scan_units` (kept within 1/8 to 8 times the codes held; below ``CALIBRATE_MIN`` codes the timings
        are noise and the a priori ``n`` stands)."""
        if self.n < CALIBRATE_MIN:
            return self.scan_units
        sample = np.ascontiguousarray(self.codes[np.linspace(0, self.n - 1, CALIBRATE_QUERIES).astype(np.int64)])
        k = min(k, self.n)
        probe_s, scan_s = math.inf, math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            _, _, work = self._search(sample, k, threads, 2.0 * self.n)
            probe_s = min(probe_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            scan(sample)
            scan_s = min(scan_s, time.perf_counter() - t0)
            if scan_s > 0.5:  # a big shard: one timing is long enough to hold
                break
        if work.sum() > 0 and probe_s > 0:
            measured = (scan_s / len(sample)) / (probe_s / float(work.sum()))
            self.scan_units = float(min(8 * self.n, max(self.n / 8, measured)))
        return self.scan_units

    def probe_cost(self, radius: int) -> float:
        """Probes a radius search makes per query, in scan-code units (see :data:`PROBE_COST`)."""
        f, j = divmod(radius, self.m)
        if f > self.b:
            return math.inf
        return PROBE_COST * (self.m * sum(math.comb(self.b, i) for i in range(f)) + (j + 1) * math.comb(self.b, f))

    def range_search(self, q: np.ndarray, radius: int, threads: int = 1) -> tuple[np.ndarray, ...]:
        """All codes within ``radius``: ``(qid, distances, ranks)``, unsorted."""
        qw = _words(np.ascontiguousarray(q))
        chunks = _chunks(len(q), threads)
        parts = self._map(lambda s: _range(*self._tables(), qw[s], int(radius)), chunks)
        qid = np.concatenate([p[0] + s.start for p, s in zip(parts, chunks)])
        return qid, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])

    @staticmethod
    def _map(fn, chunks: list[slice]) -> list:
        if len(chunks) == 1:
            return [fn(chunks[0])]
        with ThreadPoolExecutor(len(chunks)) as pool:
            return list(pool.map(fn, chunks))


def default_threads() -> int:
    """Threads for a batch: FAISS's OpenMP setting (``OMP_NUM_THREADS``; Ray sets it to a task's CPUs), so both the
    kernels and FAISS's scans use the same cores."""
    import faiss

    return max(1, faiss.omp_get_max_threads())
