"""Triton backend of :func:`ipa_fast.sample` (backend ``"triton"``).

Semantics are exactly :mod:`ipa_fast.ops.reference`'s; this module only organises the work so that
each input is read a small, fixed number of times and nothing is sorted.

Kernels (every reduction has a fixed shape that depends on V only, never on B, so a row's
result is batch-invariant):

1. ``_stats_kernel``   grid (B, S): each program reads one CHUNK of a row, mixes
   ``z = (sum_k w_k * l_k) / T`` over the K experts (a tuple of pointers) in float32 (IEEE division, no FMA contraction) and writes
   the chunk's max, sum of ``exp(z - max)``, lowest argmax, NaN/+inf and finite counts, and a
   histogram of ``floor(z * R)`` counted down from the chunk max (NB bins of 1/R nat; the last
   bin collects everything further down, ``-inf`` included). Bins sit on an absolute grid, so
   chunk histograms merge by an integer shift.
2. ``_merge_kernel``   grid (B,): merges the chunk states in chunk order (online softmax merge),
   writes greedy and invalid rows outright, and bounds the threshold from the histogram: the
   kept set ``{z >= tau}`` lies inside bins ``0..J`` (top-k by counts, top-p by mass bounds,
   min-p by ``ln(min_p)``). If those bins hold at most CAP tokens the row is a CAND row, if no
   filter is on an ALL row, otherwise (or for absurd magnitudes) a ROW row.
3. ``_gather_kernel``  grid (B, S): CAND rows copy their candidates (bins ``<= J``) into a
   per-row buffer in index order (per-chunk counts -> prefix offsets -> in-chunk cumsum).
4. ``_finish_kernel``  grid (B,): the exact thresholds on the float32 order-preserving integer
   key: top-k first (the smallest key with fewer than k tokens above), then top-p over the top-k
   mass (the smallest key whose mass above is < p * that), min-p per token. Up to PAIR tokens
   compare all pairs in one pass; more take a 16-pivot search (at most 10 passes, a fixed cap).
   Then the inverse-CDF draw in index order over fixed-size blocks (block sums then an in-block
   scan) with one Philox uniform per row (``tl.randint4x`` = :mod:`ipa_fast.ops.rng`).
   CAND rows search their candidate buffer, ROW rows re-read the raw row (slow but exact),
   ALL rows draw from the chunk masses of step 1 and scan a single chunk.

Masses are float32 ``exp`` summed in float64 where they decide a threshold or a draw. The
workspace (allocated per call, so CUDA-graph capture gets it from the graph's pool) is about
``B * (min(V, CAP) * 8 + S * 280)`` bytes: 128 KiB a row at V >= 16384.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NB = 64            # histogram bins per chunk (the last is the overflow bin)
R = 4.0            # bins per nat
CAP = 16384        # candidate capacity per row (CAND rows); larger kept sets take the ROW path
BLOCK = 256        # block size of the per-row loops in _finish_kernel
NPIV = 16          # pivots tested per pass of the threshold search
PAIR = 128         # at most this many tokens: thresholds from all pairwise comparisons in one pass
PCH = 16           # columns of the pairwise tile at a time (bounds registers)
MAX_ABS_LOGIT = tl.constexpr(1048576.0)  # beyond |max z| = 2**20 the bin arithmetic is not exact: ROW path

MODE_DONE, MODE_ALL, MODE_CAND, MODE_ROW = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


def chunk_size(V: int) -> int:
    """Vocabulary chunk per program of the split kernels: a function of V alone (batch invariance)."""
    return min(4096, max(128, triton.next_power_of_2(triton.cdiv(V, 64))))


@triton.jit
def _mixed_z(X, ST, W, WS, r, offs, mask, t, K: tl.constexpr, FIRST: tl.constexpr):
    """float32 ``(sum_k w_k * l_k) / t`` for one block of row ``r``; -inf outside ``mask``.

    The mix of :func:`ipa_fast.ops.reference.mix_experts`: expert k's row starts at ``X[k] + r*ST[k]``;
    its weight is ``W[r*WS + k - FIRST]`` (and 1 for k = 0 when FIRST = 1: the two-expert entry
    passes alpha as a [B] column). Terms ``w_k * l_k`` (0 where w_k == 0, so an ignored expert's
    -inf or NaN never enters) summed left to right, no FMA (the launches disable fusion)."""
    x = tl.zeros(offs.shape, tl.float32)
    for k in tl.static_range(K):
        v = tl.load(X[k] + r * ST[k] + offs, mask=mask, other=0.0).to(tl.float32)
        if k < FIRST:
            term = v                                   # weight 1: 1 * v == v
        else:
            wk = tl.load(W + r * WS + (k - FIRST))
            term = tl.where(wk == 0.0, 0.0, wk * v)
        if k == 0:
            x = term
        else:
            x = x + term
    z = tl.math.div_rn(x, t) + 0.0  # + 0.0 turns -0.0 into +0.0 so the integer keys order like floats
    return tl.where(mask, z, float("-inf"))


@triton.jit
def _bin(zf, m_c, NB: tl.constexpr, R: tl.constexpr):
    """Histogram bin of each z counted down from the chunk max on the absolute grid floor(z*R)."""
    d = tl.floor(m_c * R) - tl.floor(zf * R)
    d = tl.where(zf > float("-inf"), d, NB - 1)
    d = tl.where(m_c > float("-inf"), d, NB - 1)
    d = tl.minimum(tl.maximum(d, 0.0), NB - 1.0)
    return d.to(tl.int32)


@triton.jit
def _key(z):
    """int64 key with the order of float32 ``z`` (no -0.0 or NaN reach here)."""
    b = z.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _row_temperature(t):
    # greedy (t == 0) rows mix at T = 1; t < 0 rows are invalid, any positive divisor will do
    return tl.where(t > 0.0, t, 1.0)


@triton.jit
def _stats_kernel(X, ST, W, WS, temp_ptr, V, S,
                  ch_m_ptr, ch_se_ptr, ch_idx_ptr, ch_bad_ptr, ch_fin_ptr, ch_hist_ptr,
                  K: tl.constexpr, FIRST: tl.constexpr, CHUNK: tl.constexpr, NB: tl.constexpr, R: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < V
    t = _row_temperature(tl.load(temp_ptr + r))
    z = _mixed_z(X, ST, W, WS, r, offs, mask, t, K, FIRST)
    bad = mask & ((z != z) | (z == float("inf")))
    zf = tl.where(bad, float("-inf"), z)
    m_c = tl.max(zf, axis=0)
    idx = tl.min(tl.where(mask & (zf == m_c), offs, 2147483647), axis=0)
    w = tl.where(zf > float("-inf"), tl.exp(zf - m_c), 0.0)
    se = tl.sum(w, axis=0)
    slot = r * S + c
    tl.store(ch_m_ptr + slot, m_c)
    tl.store(ch_se_ptr + slot, se)
    tl.store(ch_idx_ptr + slot, idx)
    tl.store(ch_bad_ptr + slot, tl.sum(bad.to(tl.int32), axis=0))
    tl.store(ch_fin_ptr + slot, tl.sum((zf > float("-inf")).to(tl.int32), axis=0))
    hist = tl.histogram(_bin(zf, m_c, NB, R), NB)
    tl.store(ch_hist_ptr + slot * NB + tl.arange(0, NB), hist)


@triton.jit
def _merge_kernel(temp_ptr, topk_ptr, topp_ptr, minp_ptr, V, S,
                  ch_m_ptr, ch_se_ptr, ch_idx_ptr, ch_bad_ptr, ch_fin_ptr, ch_hist_ptr,
                  ch_shift_ptr, ch_off_ptr, row_m_ptr, row_lse_ptr, row_se_ptr, row_mode_ptr,
                  row_j_ptr, row_n_ptr, tok_ptr, lp_ptr, flp_ptr, valid_ptr,
                  CAP, SP: tl.constexpr, NB: tl.constexpr, R: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, SP)
    cm = cs < S
    m_c = tl.load(ch_m_ptr + r * S + cs, mask=cm, other=float("-inf"))
    se_c = tl.load(ch_se_ptr + r * S + cs, mask=cm, other=0.0)
    idx_c = tl.load(ch_idx_ptr + r * S + cs, mask=cm, other=2147483647)
    nbad = tl.sum(tl.load(ch_bad_ptr + r * S + cs, mask=cm, other=0), axis=0)
    nfin = tl.sum(tl.load(ch_fin_ptr + r * S + cs, mask=cm, other=0), axis=0)
    t = tl.load(temp_ptr + r)
    k = tl.load(topk_ptr + r)
    p = tl.load(topp_ptr + r)
    mp = tl.load(minp_ptr + r)
    valid = (nbad == 0) & (nfin > 0) & (t >= 0.0) & (k >= 0) & (p > 0.0) & (p <= 1.0) & (mp >= 0.0) & (mp <= 1.0)
    m = tl.max(m_c, axis=0)
    se = tl.sum(tl.where(m_c > float("-inf"), se_c * tl.exp(m_c - m), 0.0), axis=0)
    lse = tl.log(se)   # log-sum-exp relative to m: z - m is exact near the max, z - (m + lse) need not be
    argmax = tl.min(tl.where(m_c == m, idx_c, 2147483647), axis=0)
    tl.store(row_m_ptr + r, m)
    tl.store(row_lse_ptr + r, lse)
    tl.store(row_se_ptr + r, se)

    k_on = (k > 0) & (k < V)
    p_on = p < 1.0
    mp_on = mp > 0.0
    greedy = t == 0.0
    J = tl.full((), NB - 1, tl.int32)
    count = tl.full((), 0, tl.int32)
    if valid & ~greedy & (k_on | p_on | mp_on):
        # chunk histograms shifted onto the row's grid: bin j of chunk c is row bin j + shift_c
        fm = tl.floor(m * R)
        shift_f = tl.where(m_c > float("-inf"), fm - tl.floor(m_c * R), NB * 1.0)
        shift = tl.minimum(tl.maximum(shift_f, 0.0), NB * 1.0).to(tl.int32)
        tl.store(ch_shift_ptr + r * S + cs, shift, mask=cm)
        tb = tl.arange(0, NB)
        src = tb[None, :] - shift[:, None]
        gm = cm[:, None] & (src >= 0) & (src < NB - 1)
        G = tl.load(ch_hist_ptr + (r * S + cs[:, None]) * NB + src, mask=gm, other=0)
        H = tl.sum(G, axis=0)
        H = tl.where(tb == NB - 1, V - tl.sum(tl.where(tb < NB - 1, H, 0), axis=0), H)
        ccount = tl.cumsum(H, axis=0).to(tl.int64)
        # the last bin that can hold a kept token, per filter
        j_k = tl.min(tl.where(ccount >= k, tb, NB - 1), axis=0)
        j_mp = tl.minimum(tl.floor(1.0 - R * tl.log(tl.maximum(mp, 1e-30))) + 1.0, NB - 1.0).to(tl.int32)
        tbf = tb.to(tl.float32)
        w_low = tl.where(tb < NB - 1, tl.exp(-(tbf + 1.0) / R), 0.0) * H.to(tl.float32)
        above = tl.cumsum(w_low, axis=0) - w_low     # lower bound of the mass strictly above bin t
        j_p = tl.min(tl.where(above * 0.99999 >= p * se * 1.00001, tb - 1, NB - 1), axis=0)
        J = tl.where(k_on & p_on, j_k,
                     tl.where(k_on, tl.minimum(j_k, tl.where(mp_on, j_mp, NB - 1)),
                              tl.minimum(tl.where(p_on, j_p, NB - 1), tl.where(mp_on, j_mp, NB - 1))))
        count = tl.sum(tl.where(tb <= J, H, 0), axis=0)
        cnt_c = tl.sum(tl.where(tb[None, :] <= J, G, 0), axis=1)
        tl.store(ch_off_ptr + r * S + cs, tl.cumsum(cnt_c, axis=0) - cnt_c, mask=cm)
    mode = tl.where(~(k_on | p_on | mp_on), MODE_ALL,
                    tl.where((J < NB - 1) & (count <= CAP) & (tl.abs(m) < MAX_ABS_LOGIT), MODE_CAND, MODE_ROW))
    mode = tl.where(valid & ~greedy, mode, MODE_DONE)
    tl.store(row_mode_ptr + r, mode)
    tl.store(row_j_ptr + r, J)
    tl.store(row_n_ptr + r, count)
    if mode == MODE_DONE:
        tok = tl.where(valid, argmax, 0).to(tl.int64)
        nan = float("nan")
        tl.store(tok_ptr + r, tok)
        tl.store(lp_ptr + r, tl.where(valid, -lse, nan))
        tl.store(flp_ptr + r, tl.where(valid, 0.0, nan))
        tl.store(valid_ptr + r, valid.to(tl.int1))


@triton.jit
def _gather_kernel(X, ST, W, WS, temp_ptr, V, S,
                   ch_m_ptr, ch_shift_ptr, ch_off_ptr, row_mode_ptr, row_j_ptr, cand_z_ptr, cand_i_ptr,
                   CAP, K: tl.constexpr, FIRST: tl.constexpr, CHUNK: tl.constexpr, NB: tl.constexpr, R: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    mode = tl.load(row_mode_ptr + r)
    if mode == MODE_CAND:
        slot = r * S + c
        J = tl.load(row_j_ptr + r)
        m_c = tl.load(ch_m_ptr + slot)
        shift = tl.load(ch_shift_ptr + slot)
        base_pos = tl.load(ch_off_ptr + slot)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        mask = offs < V
        t = _row_temperature(tl.load(temp_ptr + r))
        z = _mixed_z(X, ST, W, WS, r, offs, mask, t, K, FIRST)
        d = _bin(z, m_c, NB, R)
        cand = mask & (d < NB - 1) & (d + shift <= J)
        pos = base_pos + tl.cumsum(cand.to(tl.int32), axis=0) - 1
        ok = cand & (pos < CAP)
        tl.store(cand_z_ptr + r * CAP + pos, z, mask=ok)
        tl.store(cand_i_ptr + r * CAP + pos, offs, mask=ok)


@triton.jit
def _source(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, start, n,
            FROM_ROW: tl.constexpr, K: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """One block of the row (ROW) or of its candidate buffer (CAND): z, vocabulary index, in-range."""
    offs = start + tl.arange(0, BLOCK)
    ok = offs < n
    if FROM_ROW:
        z = _mixed_z(X, ST, W, WS, r, offs, ok, t, K, FIRST)
        idx = offs
    else:
        z = tl.load(cand_z_ptr + r * CAP + offs, mask=ok, other=float("-inf"))
        idx = tl.load(cand_i_ptr + r * CAP + offs, mask=ok, other=0)
    return z, idx, ok


@triton.jit
def _gt_stats(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, n, m, piv,
              FROM_ROW: tl.constexpr, K: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """For each pivot key in ``piv``: (count, float64 mass) of the tokens whose key is > it."""
    cnt = tl.zeros(piv.shape, tl.int64)
    mass = tl.zeros(piv.shape, tl.float64)
    for start in range(0, n, BLOCK):
        z, idx, ok = _source(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, start, n,
                             FROM_ROW, K, FIRST, BLOCK)
        gt = ok[:, None] & (_key(z)[:, None] > piv[None, :])
        w = tl.exp(z - m).to(tl.float64)
        cnt += tl.sum(gt.to(tl.int64), axis=0)
        mass += tl.sum(tl.where(gt, w[:, None], 0.0), axis=0)
    return cnt, mass


@triton.jit
def _search(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, n, m, lo, hi, k, bound,
            USE_MASS: tl.constexpr, FROM_ROW: tl.constexpr, K: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr,
            NPIV: tl.constexpr):
    """Smallest key in (lo, hi] with count_gt < k (or mass_gt < bound); the predicate holds at hi.

    Each round tests NPIV evenly spaced pivots in one pass, shrinking the range ~(NPIV+1)-fold:
    a 2**33 range needs at most 9 rounds with 16 pivots, so 10 fixed rounds always finish.
    """
    i = tl.arange(0, NPIV).to(tl.int64)
    for _ in range(10):
        if hi - lo > 1:
            piv = lo + ((hi - lo) * (i + 1)) // (NPIV + 1)
            cnt, mass = _gt_stats(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, n, m, piv,
                                  FROM_ROW, K, FIRST, BLOCK)
            if USE_MASS:
                ok = mass < bound
            else:
                ok = cnt < k
            hi = tl.minimum(hi, tl.min(tl.where(ok, piv, hi), axis=0))
            lo = tl.maximum(lo, tl.max(tl.where(ok, lo, piv), axis=0))
    return hi


@triton.jit
def _thresholds_pairwise(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, n, m, se, k, p, k_on,
                         p_on, FROM_ROW: tl.constexpr, K: tl.constexpr, FIRST: tl.constexpr, PAIR: tl.constexpr,
                         PCH: tl.constexpr):
    """(key_k, key_t) for n <= PAIR tokens in one go: every token's count and float64 mass of the
    tokens strictly above it (a PAIR x PCH tile at a time), then the smallest qualifying keys."""
    z, idx, ok = _source(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, 0, n,
                         FROM_ROW, K, FIRST, PAIR)
    key = _key(z)
    w = tl.where(ok, tl.exp(z - m), 0.0).to(tl.float64)
    cnt = tl.zeros((PAIR,), tl.int32)
    mass = tl.zeros((PAIR,), tl.float64)
    for j0 in tl.static_range(0, PAIR, PCH):
        zj, idxj, okj = _source(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, j0, n,
                                FROM_ROW, K, FIRST, PCH)
        gt = okj[None, :] & (_key(zj)[None, :] > key[:, None])
        cnt += tl.sum(gt.to(tl.int32), axis=1)
        mass += tl.sum(tl.where(gt, tl.exp(zj - m).to(tl.float64)[None, :], 0.0), axis=1)
    big = 2147483647
    k_eff = tl.where(k_on, k, 9223372036854775807)       # off: every token qualifies
    key_k = tl.min(tl.where(ok & (cnt.to(tl.int64) < k_eff), key, big), axis=0)
    total_k = tl.where(k_on, tl.sum(tl.where(key >= key_k, w, 0.0), axis=0), se.to(tl.float64))
    bound = tl.where(p_on, p.to(tl.float64) * total_k, float("inf"))
    key_t = tl.min(tl.where(ok & (key >= key_k) & (mass < bound), key, big), axis=0)
    return key_k, key_t


@triton.jit
def _threshold_and_draw(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, n, m, lse, se,
                        k, p, mp, u, tok_ptr, lp_ptr, flp_ptr, valid_ptr,
                        FROM_ROW: tl.constexpr, K: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr,
                        NPIV: tl.constexpr, PAIR: tl.constexpr, PCH: tl.constexpr):
    k_on = (k > 0) & (k < V)
    p_on = p < 1.0
    if n <= PAIR:
        key_k, key_t = _thresholds_pairwise(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, n,
                                            m, se, k, p, k_on, p_on, FROM_ROW, K, FIRST, PAIR, PCH)
    else:
        # lowest key present: the search never probes below it (candidates see only their range)
        kmin = tl.full((), 2147483647, tl.int64)
        for start in range(0, n, BLOCK):
            z, idx, ok = _source(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, start, n,
                                 FROM_ROW, K, FIRST, BLOCK)
            kmin = tl.minimum(kmin, tl.min(tl.where(ok, _key(z), 2147483647), axis=0))
        key_max = _key(m)
        # top-k: the smallest key with fewer than k tokens strictly above it (the k-th largest value)
        key_k = kmin
        if k_on:
            key_k = _search(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, n, m, kmin - 1,
                            key_max, k, 0.0, False, FROM_ROW, K, FIRST, BLOCK, NPIV)
        # top-p over the top-k survivors, value-based: the smallest key (>= key_k) whose mass strictly
        # above is < p * (top-k mass)
        key_t = key_k
        if p_on:
            if k_on:
                one = tl.full((1,), 0, tl.int64) + (key_k - 1)
                cnt, above = _gt_stats(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, n, m,
                                       one, FROM_ROW, K, FIRST, BLOCK)
                total_k = tl.sum(above, axis=0)
            else:
                total_k = se.to(tl.float64)   # every token survives top-k; candidates may not cover them
            key_t = _search(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, n, m, key_k - 1,
                            key_max, k, p.to(tl.float64) * total_k, True, FROM_ROW, K, FIRST, BLOCK, NPIV)
    # kept = {key >= key_t} and min-p per token; total kept mass, then the draw in index order
    total = tl.full((), 0.0, tl.float64)
    for start in range(0, n, BLOCK):
        z, idx, ok = _source(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, start, n,
                             FROM_ROW, K, FIRST, BLOCK)
        w = tl.exp(z - m)
        keep = ok & (_key(z) >= key_t) & (w >= mp)
        total += tl.sum(tl.where(keep, w, 0.0).to(tl.float64), axis=0)
    target = u * total
    cum = tl.full((), 0.0, tl.float64)
    tok = tl.full((), -1, tl.int32)
    z_tok = tl.full((), float("-inf"), tl.float32)
    last = tl.full((), -1, tl.int32)
    z_last = tl.full((), float("-inf"), tl.float32)
    for start in range(0, n, BLOCK):
        z, idx, ok = _source(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, start, n,
                             FROM_ROW, K, FIRST, BLOCK)
        w = tl.exp(z - m)
        keep = ok & (_key(z) >= key_t) & (w >= mp) & (w > 0.0)
        wk = tl.where(keep, w, 0.0).to(tl.float64)
        bsum = tl.sum(wk, axis=0)
        if tok < 0:
            if cum + bsum > target:
                inc = cum + tl.cumsum(wk, axis=0)
                first = tl.min(tl.where(keep & (inc > target), idx, 2147483647), axis=0)
                if first < 2147483647:
                    tok = first
                    z_tok = tl.max(tl.where(keep & (idx == first), z, float("-inf")), axis=0)
            cum += bsum
        blast = tl.max(tl.where(keep, idx, -1), axis=0)
        if blast > last:
            last = blast
            z_last = tl.max(tl.where(keep & (idx == blast), z, float("-inf")), axis=0)
    if tok < 0:   # rounding left u * total beyond the last partial sum: the last kept token
        tok = last
        z_tok = z_last
    tl.store(tok_ptr + r, tok.to(tl.int64))
    tl.store(lp_ptr + r, (z_tok - m) - lse)
    tl.store(flp_ptr + r, (z_tok.to(tl.float64) - m.to(tl.float64) - tl.log(total)).to(tl.float32))
    tl.store(valid_ptr + r, (tok >= 0).to(tl.int1))


@triton.jit
def _finish_kernel(X, ST, W, WS, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, off_ptr,
                   V, S, ch_m_ptr, ch_se_ptr, row_m_ptr, row_lse_ptr, row_se_ptr, row_mode_ptr, row_n_ptr,
                   cand_z_ptr, cand_i_ptr, tok_ptr, lp_ptr, flp_ptr, valid_ptr, CAP,
                   K: tl.constexpr, FIRST: tl.constexpr, CHUNK: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr,
                   NPIV: tl.constexpr, PAIR: tl.constexpr, PCH: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    mode = tl.load(row_mode_ptr + r)
    if mode != MODE_DONE:
        seed = tl.load(seed_ptr + r).to(tl.uint64, bitcast=True)
        offset = tl.load(off_ptr + r).to(tl.uint64, bitcast=True)
        x0, x1, x2, x3 = tl.randint4x(seed, offset)
        bits = (x0.to(tl.uint64) << 21) | (x1.to(tl.uint64) >> 11)
        u = (bits.to(tl.float64) + 0.5) * 1.1102230246251565e-16   # 2**-53
        m = tl.load(row_m_ptr + r)
        lse = tl.load(row_lse_ptr + r)
        se = tl.load(row_se_ptr + r)
        t = _row_temperature(tl.load(temp_ptr + r))
        if mode == MODE_ALL:
            # no filter: chunk masses from the stats pass pick the chunk, one chunk is scanned
            cs = tl.arange(0, SP)
            m_c = tl.load(ch_m_ptr + r * S + cs, mask=cs < S, other=float("-inf"))
            se_c = tl.load(ch_se_ptr + r * S + cs, mask=cs < S, other=0.0)
            cmass = tl.where(m_c > float("-inf"), se_c * tl.exp(m_c - m), 0.0).to(tl.float64)
            total = tl.sum(cmass, axis=0)
            target = u * total
            ccum = tl.cumsum(cmass, axis=0)
            c_hit = tl.min(tl.where(ccum > target, cs, SP), axis=0)
            c_last = tl.max(tl.where(cmass > 0.0, cs, -1), axis=0)
            c = tl.where(c_hit < SP, c_hit, c_last)
            prev = tl.sum(tl.where(cs < c, cmass, 0.0), axis=0)
            offs = c * CHUNK + tl.arange(0, CHUNK)
            mask = offs < V
            z = _mixed_z(X, ST, W, WS, r, offs, mask, t, K, FIRST)
            w = tl.exp(z - m)
            pos = w > 0.0
            inc = prev + tl.cumsum(tl.where(pos, w, 0.0).to(tl.float64), axis=0)
            first = tl.min(tl.where(pos & (inc > target), offs, 2147483647), axis=0)
            lastpos = tl.max(tl.where(pos, offs, -1), axis=0)
            tok = tl.where(first < 2147483647, first, lastpos)
            z_tok = tl.max(tl.where(offs == tok, z, float("-inf")), axis=0)
            tl.store(tok_ptr + r, tok.to(tl.int64))
            tl.store(lp_ptr + r, (z_tok - m) - lse)
            tl.store(flp_ptr + r, (z_tok.to(tl.float64) - m.to(tl.float64) - tl.log(total)).to(tl.float32))
            tl.store(valid_ptr + r, (tok >= 0).to(tl.int1))
        else:
            k = tl.load(topk_ptr + r)
            p = tl.load(topp_ptr + r)
            mp = tl.load(minp_ptr + r)
            if mode == MODE_CAND:
                n = tl.load(row_n_ptr + r)
                _threshold_and_draw(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, n, m, lse,
                                    se, k, p, mp, u, tok_ptr, lp_ptr, flp_ptr, valid_ptr, False, K, FIRST, BLOCK,
                                    NPIV, PAIR, PCH)
            else:
                _threshold_and_draw(X, ST, W, WS, r, V, t, cand_z_ptr, cand_i_ptr, CAP, V, m, lse,
                                    se, k, p, mp, u, tok_ptr, lp_ptr, flp_ptr, valid_ptr, True, K, FIRST, BLOCK,
                                    NPIV, PAIR, PCH)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` read in place when its columns are adjacent (any row stride), else a copy."""
    return x if x.shape[1] == 1 or x.stride(1) == 1 else x.contiguous()


def _launch(experts, weights, first: int, temperature, top_k, top_p, min_p, seed, offset):
    experts = [_rows(x) for x in experts]
    base = experts[0]
    B, V = base.shape
    dev = base.device
    X = tuple(experts)
    ST = tuple(int(x.stride(0)) for x in experts)
    W = weights.contiguous()
    WS = int(W.shape[1]) if W.dim() == 2 else 1
    if W.numel() == 0:   # K = 1 with the implicit unit weight: any valid pointer
        W = temperature
    mix = dict(K=len(experts), FIRST=first)
    chunk = chunk_size(V)
    S = triton.cdiv(V, chunk)
    SP = triton.next_power_of_2(S)
    cap = min(CAP, V)
    f32 = torch.empty(B * (2 * S + 3), dtype=torch.float32, device=dev)
    ch_m, ch_se = f32[:B * S], f32[B * S:2 * B * S]
    row_m, row_lse, row_se = f32[2 * B * S:].view(3, B)
    i32 = torch.empty(B * S * (NB + 5) + 3 * B + B * cap, dtype=torch.int32, device=dev)
    ch_hist = i32[:B * S * NB]
    ch_idx, ch_bad, ch_fin, ch_shift, ch_off = i32[B * S * NB:B * S * (NB + 5)].view(5, B * S)
    row_mode, row_j, row_n = i32[B * S * (NB + 5):B * S * (NB + 5) + 3 * B].view(3, B)
    cand_i = i32[B * S * (NB + 5) + 3 * B:]
    cand_z = torch.empty(B * cap, dtype=torch.float32, device=dev)
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    filtered = torch.empty(B, dtype=torch.float32, device=dev)
    valid = torch.empty(B, dtype=torch.bool, device=dev)

    opts = dict(enable_fp_fusion=False)   # z and masses as the reference rounds them: no FMA
    _stats_kernel[(B, S)](X, ST, W, WS, temperature, V, S, ch_m, ch_se, ch_idx, ch_bad, ch_fin,
                          ch_hist, **mix, CHUNK=chunk, NB=NB, R=R, num_warps=4, **opts)
    _merge_kernel[(B,)](temperature, top_k, top_p, min_p, V, S, ch_m, ch_se, ch_idx, ch_bad, ch_fin,
                        ch_hist, ch_shift, ch_off, row_m, row_lse, row_se, row_mode, row_j, row_n,
                        tokens, logprobs, filtered, valid, cap, SP=SP, NB=NB, R=R, num_warps=4, **opts)
    _gather_kernel[(B, S)](X, ST, W, WS, temperature, V, S, ch_m, ch_shift, ch_off, row_mode, row_j,
                           cand_z, cand_i, cap, **mix, CHUNK=chunk, NB=NB, R=R, num_warps=4, **opts)
    _finish_kernel[(B,)](X, ST, W, WS, temperature, top_k, top_p, min_p, seed, offset, V, S,
                         ch_m, ch_se, row_m, row_lse, row_se, row_mode, row_n, cand_z, cand_i,
                         tokens, logprobs, filtered, valid, cap, **mix, CHUNK=chunk, SP=SP,
                         BLOCK=BLOCK, NPIV=NPIV, PAIR=PAIR, PCH=PCH, num_warps=8, **opts)
    return tokens, logprobs, filtered, valid


def sample(base, adapter, *, alpha, temperature, top_k, top_p, min_p, seed, offset):
    """Backend entry point (see :mod:`ipa_fast.ops.dispatch`): no host sync, no data-dependent shapes.
    The two-expert case: expert 0 (base) has weight 1, alpha is expert 1's weight column."""
    experts = [base] if adapter is None else [base, adapter]
    return _launch(experts, alpha, 1, temperature, top_k, top_p, min_p, seed, offset)


def sample_experts(experts, weights, *, temperature, top_k, top_p, min_p, seed, offset):
    """K-expert entry point: ``weights`` [B, K] float32; each expert is read in place through its
    pointer and row stride (a tuple of K pointers: one kernel specialisation per K and dtypes)."""
    return _launch(experts, weights, 0, temperature, top_k, top_p, min_p, seed, offset)
