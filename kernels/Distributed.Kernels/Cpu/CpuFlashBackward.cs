using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace Distributed.Kernels.Cpu;

/// <summary>
/// The FlashAttention-2 backward on the CPU without recomputation: one sweep over (key tile, query tile)
/// pairs that forms S = Q Kᵀ and dP = dO Vᵀ once per pair and uses them for all three gradients, five
/// tile GEMMs per pair (S, dP, dV += Pᵀ dO, dK += dSᵀ Q, dQ += dS K). Q (pre-scaled by scale·log2 e), dO,
/// the base-2 LSE and Drow are packed once per call into 64-row, 16-padded tiles; each key tile's Kᵀ, Vᵀ
/// and K rows are packed once, by the one task that owns that key tile. dK and dV of a key tile stay in
/// thread scratch until the tile is done. dQ rows receive contributions from every key tile, so they
/// accumulate in a packed buffer: one shared buffer when tasks own whole KV heads (enough heads for every
/// thread; no two tasks touch the same query head), else one buffer per worker, summed at the end.
/// </summary>
internal static unsafe class CpuFlashBackward
{
    private const int T = CpuFlashAttention.T;
    private const float Log2E = CpuFlashAttention.Log2E;

    /// <summary>
    /// dQ, dK, dV of softmax attention. <paramref name="pack"/> is the backend's reusable packing buffer
    /// (the caller serialises its use).
    /// </summary>
    public static void Backward(CpuTensor q, CpuTensor k, CpuTensor v, CpuTensor lse, CpuTensor drow, CpuTensor dO,
        CpuTensor dQ, CpuTensor dK, CpuTensor dV, AttentionDims x, in FlashOptions opt, int threads, PinnedBuffer pack)
    {
        var options = opt;
        float scale = opt.ScaleFor(x.D), c = scale * Log2E;
        float* Q = q.Pointer, K = k.Pointer, V = v.Pointer, L = lse.Pointer, R = drow.Pointer, G = dO.Pointer;
        float* DQ = dQ.Pointer, DK = dK.Pointer, DV = dV.Pointer;
        int D = x.D, Dv = x.Dv, DP = CpuMath.Pad(D), DvP = CpuMath.Pad(Dv);
        int kTiles = (x.Nk + T - 1) / T, qTiles = (x.Nq + T - 1) / T, NqP = qTiles * T;
        int heads = x.B * x.H, kvHeads = x.B * x.Hk;
        // Tasks own whole KV heads when that keeps every thread busy; otherwise they own single key tiles
        // and each worker keeps its own dQ accumulator.
        bool ownHeads = kvHeads % threads == 0 || kvHeads >= 4 * threads;
        int tasks = ownHeads ? kvHeads : kvHeads * kTiles;
        int accumulators = ownHeads ? 1 : CpuParallel.Workers(tasks, threads);
        long qSize = (long)heads * NqP * DP, gSize = (long)heads * NqP * DvP, rowSize = (long)heads * NqP;
        float* Qp = pack.Get(qSize + gSize + 2 * rowSize + accumulators * qSize);
        float* Gp = Qp + qSize, Lp = Gp + gSize, Rp = Lp + rowSize, Acc = Rp + rowSize;

        CpuParallel.For(heads * qTiles, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (t) =>
        {
            int qt = t % qTiles, bh = t / qTiles, b = bh / x.H, h = bh % x.H, i0 = qt * T, rows = Math.Min(T, x.Nq - i0);
            long row0 = (long)bh * NqP + i0;
            CpuFlashAttention.LoadScaledRows(Q, x.Nq, x.H, D, b, h, i0, rows, DP, c, Qp + row0 * DP);
            CpuFlashAttention.LoadRows(G, x.Nq, x.H, Dv, b, h, i0, rows, DvP, Gp + row0 * DvP);
            for (int r = 0; r < T; r++)
            {
                long li = (long)bh * x.Nq + i0 + r;
                Lp[row0 + r] = r < rows ? L[li] * Log2E : float.NegativeInfinity;
                Rp[row0 + r] = r < rows ? R[li] : 0f;
            }
            for (int a = 0; a < accumulators; a++) new Span<float>(Acc + a * qSize + row0 * DP, T * DP).Clear();
        });

        var packed = new Packed(Qp, Gp, Lp, Rp, NqP, DP, DvP);
        if (ownHeads)
        {
            CpuParallel.For(kvHeads, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (bhk) =>
            {
                for (int jt = 0; jt < kTiles; jt++) KeyTile(K, V, DK, DV, packed, Acc, x, options, bhk, jt);
            });
        }
        else
        {
            // Causal: the first key tiles see the most queries; hand them out first.
            int[] order = new int[tasks];
            for (int jt = 0, n = 0; jt < kTiles; jt++)
                for (int bhk = 0; bhk < kvHeads; bhk++) order[n++] = bhk * kTiles + jt;
            CpuParallel.ForWorkers(tasks, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (t, w) =>
                KeyTile(K, V, DK, DV, packed, Acc + w * qSize, x, options, t / kTiles, t % kTiles), order);
        }

        bool accumulate = opt.Accumulate;
        CpuParallel.For(heads * qTiles, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (t) =>
        {
            int qt = t % qTiles, bh = t / qTiles, b = bh / x.H, h = bh % x.H, i0 = qt * T, rows = Math.Min(T, x.Nq - i0);
            for (int r = 0; r < rows; r++)
            {
                long row = (long)bh * NqP + i0 + r;
                float* dst = DQ + (((long)b * x.Nq + i0 + r) * x.H + h) * D;
                if (!accumulate) new Span<float>(dst, D).Clear();
                for (int a = 0; a < accumulators; a++) AddScaled(dst, Acc + a * qSize + row * DP, D, scale);
            }
        });
    }

    /// <summary>The per-call packed operands: rows of head bh start at row bh·NqP.</summary>
    private readonly struct Packed(float* q, float* g, float* l, float* r, int nqP, int dp, int dvP)
    {
        public readonly float* Q = q, G = g, L = l, R = r;
        public readonly int NqP = nqP, DP = dp, DvP = dvP;
    }

    /// <summary>All query tiles of every query head in KV head <paramref name="bhk"/>'s group against key tile <paramref name="jt"/>.</summary>
    private static void KeyTile(float* K, float* V, float* DK, float* DV, Packed p, float* dqAcc, AttentionDims x, in FlashOptions opt, int bhk, int jt)
    {
        int D = x.D, Dv = x.Dv, DP = p.DP, DvP = p.DvP, b = bhk / x.Hk, hk = bhk % x.Hk, j0 = jt * T;
        int tl = Math.Min(T, x.Nk - j0);
        long scratch = (long)D * T + (long)Dv * T + (long)T * DP + 2 * T * T + (long)T * DP + (long)T * DvP;
        float* kt = CpuParallel.Scratch(scratch);
        // A worker's scratch holds whatever its thread computed last (another tile, or another rank's call):
        // start from zeros so no stale value can reach a result, whichever thread runs the tile.
        new Span<float>(kt, (int)scratch).Clear();
        float* vt = kt + D * T, kr = vt + Dv * T, s = kr + T * DP, dp = s + T * T, dk = dp + T * T, dv = dk + T * DP;
        CpuFlashAttention.LoadKeyTileTransposed(K, x, b, hk, j0, tl, kt);
        CpuFlashAttention.LoadTransposed(V, x.Nk, x.Hk, Dv, b, hk, j0, tl, vt);
        CpuFlashAttention.LoadRows(K, x.Nk, x.Hk, D, b, hk, j0, tl, DP, kr);
        new Span<float>(dk, T * DP).Clear();
        new Span<float>(dv, T * DvP).Clear();
        long iStart = opt.Causal ? Math.Max(0, opt.KeyOffset + j0 - opt.QueryOffset) : 0;
        for (int g = 0; g < x.Group; g++)
        {
            long bh = (long)b * x.H + hk * x.Group + g;
            for (long i0l = iStart / T * T; i0l < x.Nq; i0l += T)
            {
                int i0 = (int)i0l, rows = Math.Min(T, x.Nq - i0);
                long row0 = bh * p.NqP + i0;
                float* qs = p.Q + row0 * DP, dos = p.G + row0 * DvP;
                CpuMath.Gemm(rows, T, D, qs, 1, DP, kt, T, s, T, false);
                CpuMath.Gemm(rows, T, Dv, dos, 1, DvP, vt, T, dp, T, false);
                ScoreGradients(s, dp, p.L + row0, p.R + row0, opt, rows, i0, j0, tl);
                CpuMath.Gemm(tl, DvP, rows, s, T, 1, dos, DvP, dv, DvP, true);
                CpuMath.Gemm(tl, DP, rows, dp, T, 1, qs, DP, dk, DP, true);
                CpuMath.Gemm(rows, DP, tl, dp, 1, T, kr, DP, dqAcc + row0 * DP, DP, true);
            }
        }
        // qs carried scale·log2 e; dK = scale Σ dS q = Σ dS qs / log2 e.
        float undo = 1f / Log2E;
        for (int j = 0; j < tl; j++)
        {
            float* dkRow = DK + (((long)b * x.Nk + j0 + j) * x.Hk + hk) * D;
            float* dvRow = DV + (((long)b * x.Nk + j0 + j) * x.Hk + hk) * Dv;
            if (!opt.Accumulate)
            {
                new Span<float>(dkRow, D).Clear();
                new Span<float>(dvRow, Dv).Clear();
            }
            AddScaled(dkRow, dk + j * DP, D, undo);
            AddScaled(dvRow, dv + j * DvP, Dv, 1f);
        }
    }

    /// <summary>
    /// In place over the first <paramref name="rows"/> rows of a pair: <paramref name="s"/> (base-2 scores)
    /// becomes P and <paramref name="dp"/> becomes dS = P ∘ (dP − Drow), natural units; masked keys and
    /// rows with no keys (LSE −∞) give 0 in both.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void ScoreGradients(float* s, float* dp, float* lse2Rows, float* dRows, in FlashOptions opt, int rows, int i0, int j0, int tl)
    {
        for (int r = 0; r < rows; r++)
        {
            float lse2 = lse2Rows[r], dr = dRows[r];
            int valid = opt.Causal ? (int)Math.Clamp(opt.QueryOffset + i0 + r - opt.KeyOffset - j0 + 1, 0, tl) : tl;
            if (float.IsNegativeInfinity(lse2)) valid = 0;
            float* sr = s + r * T, dpr = dp + r * T;
            int j = 0;
            if (CpuMath.UseVector512)
            {
                var lv = Vector512.Create(lse2);
                var dv = Vector512.Create(dr);
                for (; j + 16 <= valid; j += 16)
                {
                    var pv = CpuMath.Exp2Unmasked(Vector512.Load(sr + j) - lv);
                    pv.Store(sr + j);
                    (pv * (Vector512.Load(dpr + j) - dv)).Store(dpr + j);
                }
            }
            else if (CpuMath.UseVector256)
            {
                var lv = Vector256.Create(lse2);
                var dv = Vector256.Create(dr);
                for (; j + 8 <= valid; j += 8)
                {
                    var pv = CpuMath.Exp2(Vector256.Load(sr + j) - lv);
                    pv.Store(sr + j);
                    (pv * (Vector256.Load(dpr + j) - dv)).Store(dpr + j);
                }
            }
            for (; j < valid; j++)
            {
                float pv = CpuMath.Exp2(sr[j] - lse2);
                sr[j] = pv;
                dpr[j] = pv * (dpr[j] - dr);
            }
            for (; j < T; j++) { sr[j] = 0f; dpr[j] = 0f; }
        }
    }

    /// <summary>dst[i] += s · src[i] for i &lt; n.</summary>
    private static void AddScaled(float* dst, float* src, int n, float s)
    {
        int i = 0;
        if (CpuMath.UseVector512)
        {
            var sv = Vector512.Create(s);
            for (; i + 16 <= n; i += 16) Vector512.FusedMultiplyAdd(Vector512.Load(src + i), sv, Vector512.Load(dst + i)).Store(dst + i);
        }
        else if (CpuMath.UseVector256)
        {
            var sv = Vector256.Create(s);
            for (; i + 8 <= n; i += 8) Vector256.FusedMultiplyAdd(Vector256.Load(src + i), sv, Vector256.Load(dst + i)).Store(dst + i);
        }
        for (; i < n; i++) dst[i] += s * src[i];
    }
}
