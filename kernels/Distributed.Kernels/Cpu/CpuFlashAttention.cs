using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace Distributed.Kernels.Cpu;

/// <summary>
/// FlashAttention-2 on the CPU: 64×64 tiles, scores and P·V as register-blocked GEMMs
/// (<see cref="CpuMath.Gemm"/>), an online softmax in base 2 (Q is pre-scaled by scale·log2 e), no N×N
/// buffer. Forward parallelises over (batch, head, query tile), heaviest tiles first. The backward is
/// <see cref="CpuFlashBackward"/>.
/// </summary>
internal static unsafe class CpuFlashAttention
{
    internal const int T = 64;
    internal const float Log2E = 1.4426950408889634f;
    private const float Ln2 = 0.6931471805599453f;

    public static void Forward(CpuTensor q, CpuTensor k, CpuTensor v, CpuTensor o, CpuTensor lse, AttentionDims x, in FlashOptions opt, int threads, PinnedBuffer keysTransposed, long packBudget)
    {
        int qTiles = (x.Nq + T - 1) / T;
        var options = opt;
        float c = opt.ScaleFor(x.D) * Log2E;
        float* Q = q.Pointer, K = k.Pointer, V = v.Pointer, O = o.Pointer, L = lse.Pointer;
        // K and V are packed into contiguous 64-key tiles, [heads, tiles, D, 64] (Kᵀ) and [heads, tiles, 64, DvP],
        // zero-padded, so every query tile reads them with short strides. Whole KV heads are packed a pass at
        // a time, as many as fit CpuBackend.PackBudgetFloats (at least one): the buffer never holds a second
        // copy of all of K and V.
        int kTiles = (x.Nk + T - 1) / T, DvP = CpuMath.Pad(x.Dv);
        long ktTile = (long)x.D * T, vTileSize = (long)T * DvP, perHead = Math.Max(1L, kTiles * (ktTile + vTileSize));
        int kvHeads = x.B * x.Hk;
        int perPass = (int)Math.Clamp(packBudget / perHead, 1, kvHeads);
        float* KT = keysTransposed.Get(perPass * perHead);
        float* VP = KT + perPass * kTiles * ktTile;
        for (int first = 0; first < kvHeads; first += perPass)
        {
            int count = Math.Min(perPass, kvHeads - first), head0 = first;
            CpuParallel.For(count * kTiles, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (t) =>
            {
                int jt = t % kTiles, bhk = head0 + t / kTiles, b = bhk / x.Hk, hk = bhk % x.Hk;
                int tl = Math.Min(T, x.Nk - jt * T);
                LoadKeyTileTransposed(K, x, b, hk, jt * T, tl, KT + t * ktTile);
                LoadRows(V, x.Nk, x.Hk, x.Dv, b, hk, jt * T, tl, DvP, VP + t * vTileSize);
            });
            int heads = count * x.Group;
            CpuParallel.For(heads * qTiles, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (t) =>
            {
                int qt = t % qTiles, rest = t / qTiles, g = rest % x.Group, slot = rest / x.Group;
                int bhk = head0 + slot, b = bhk / x.Hk, h = bhk % x.Hk * x.Group + g;
                ForwardTile(Q, KT + slot * kTiles * ktTile, VP + slot * kTiles * vTileSize, O, L, x, options, c, b, h, qt * T);
            }, options.Causal ? HeaviestLastTileFirst(heads, qTiles) : null);
        }
    }

    /// <summary>Task order for causal work: the last query tiles (most keys) of every head first.</summary>
    internal static int[] HeaviestLastTileFirst(int heads, int tiles)
    {
        var order = new int[heads * tiles];
        int n = 0;
        for (int qt = tiles - 1; qt >= 0; qt--)
            for (int bh = 0; bh < heads; bh++) order[n++] = bh * tiles + qt;
        return order;
    }

    /// <summary>One query tile of head h against its KV head's packed tiles (<paramref name="KT"/>, <paramref name="VP"/> start at its tile 0).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void ForwardTile(float* Q, float* KT, float* VP, float* O, float* L, AttentionDims x, in FlashOptions opt, float c, int b, int h, int i0)
    {
        int D = x.D, Dv = x.Dv, DvP = CpuMath.Pad(Dv);
        int rows = Math.Min(T, x.Nq - i0);
        float* qs = CpuParallel.Scratch((long)T * D + (long)D * T + (long)T * DvP + T * T + (long)T * DvP + 2 * T);
        float* kt = qs + T * D, vt = kt + D * T, s = vt + T * DvP, acc = s + T * T, m = acc + T * DvP, l = m + T;
        for (int r = 0; r < rows; r++)
        {
            float* src = Q + (((long)b * x.Nq + i0 + r) * x.H + h) * D;
            for (int d = 0; d < D; d++) qs[r * D + d] = src[d] * c;
            m[r] = float.NegativeInfinity;
            l[r] = 0f;
        }
        new Span<float>(acc, T * DvP).Clear();
        int jEnd = x.Nk;
        if (opt.Causal) jEnd = (int)Math.Clamp(opt.QueryOffset + i0 + rows - 1 - opt.KeyOffset + 1, 0, x.Nk);
        for (int j0 = 0; j0 < jEnd; j0 += T)
        {
            int tl = Math.Min(T, x.Nk - j0);
            long tile = j0 / T;
            float* ktTile = KT + tile * D * T, vTile = VP + tile * T * DvP;
            CpuMath.Gemm(rows, T, D, qs, 1, D, ktTile, T, s, T, false);
            for (int r = 0; r < rows; r++)
            {
                int valid = opt.Causal ? (int)Math.Clamp(opt.QueryOffset + i0 + r - opt.KeyOffset - j0 + 1, 0, tl) : tl;
                float alpha = SoftmaxRow(s + r * T, valid, ref m[r], ref l[r]);
                if (alpha != 1f) CpuMath.Scale(acc + r * DvP, DvP, alpha);
            }
            CpuMath.Gemm(rows, DvP, tl, s, 1, T, vTile, DvP, acc, DvP, true);
        }
        for (int r = 0; r < rows; r++)
        {
            float* dst = O + (((long)b * x.Nq + i0 + r) * x.H + h) * Dv;
            long li = ((long)b * x.H + h) * x.Nq + i0 + r;
            if (l[r] == 0f)
            {
                new Span<float>(dst, Dv).Clear();
                L[li] = float.NegativeInfinity;
                continue;
            }
            float inv = 1f / l[r];
            for (int e = 0; e < Dv; e++) dst[e] = acc[r * DvP + e] * inv;
            L[li] = (m[r] + MathF.Log2(l[r])) * Ln2;
        }
    }

    /// <summary>
    /// One row of the online softmax over a 64-key tile (scores in base-2 units): keys at and after
    /// <paramref name="valid"/> are masked. Turns the row into probabilities relative to the new max,
    /// updates the running max and sum, and returns the factor that rescales earlier output.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static float SoftmaxRow(float* s, int valid, ref float m, ref float l)
    {
        if (valid <= 0)
        {
            new Span<float>(s, T).Clear();
            return 1f;
        }
        // Masked keys become -inf, so they drop out of the max and their exp2 is exactly 0.
        for (int j = valid; j < T; j++) s[j] = float.NegativeInfinity;
        float rowMax = float.NegativeInfinity;
        if (CpuMath.UseVector256 && !CpuMath.UseVector512)
        {
            var mv = Vector256.Load(s);
            for (int j = 8; j < T; j += 8) mv = Vector256.Max(mv, Vector256.Load(s + j));
            for (int e = 0; e < 8; e++) rowMax = MathF.Max(rowMax, mv.GetElement(e));
        }
        else if (CpuMath.UseVector512)
        {
            var mv = Vector512.Load(s);
            for (int j = 16; j < T; j += 16) mv = Vector512.Max(mv, Vector512.Load(s + j));
            rowMax = CpuMath.HorizontalMax(mv);
        }
        else
            for (int j = 0; j < valid; j++) rowMax = MathF.Max(rowMax, s[j]);
        float mNew = MathF.Max(m, rowMax);
        float alpha = float.IsNegativeInfinity(m) ? 0f : CpuMath.Exp2(m - mNew);
        float sum = 0f;
        if (CpuMath.UseVector512)
        {
            var mv = Vector512.Create(mNew);
            var sv = Vector512<float>.Zero;
            for (int j = 0; j < T; j += 16)
            {
                Vector512<float> p;
                if (j + 16 <= valid) p = CpuMath.Exp2Unmasked(Vector512.Load(s + j) - mv);
                else
                {
                    p = CpuMath.Exp2(Vector512.Load(s + j) - mv);
                    var idx = Vector512.Create(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15) + Vector512.Create(j);
                    p = Vector512.ConditionalSelect(Vector512.LessThan(idx, Vector512.Create(valid)).AsSingle(), p, Vector512<float>.Zero);
                }
                p.Store(s + j);
                sv += p;
            }
            sum = Vector512.Sum(sv);
        }
        else if (CpuMath.UseVector256)
        {
            var mv = Vector256.Create(mNew);
            var sv = Vector256<float>.Zero;
            for (int j = 0; j < T; j += 8)
            {
                var p = CpuMath.Exp2(Vector256.Load(s + j) - mv);
                if (j + 8 > valid)
                {
                    var idx = Vector256.Create(0, 1, 2, 3, 4, 5, 6, 7) + Vector256.Create(j);
                    p = Vector256.ConditionalSelect(Vector256.LessThan(idx, Vector256.Create(valid)).AsSingle(), p, Vector256<float>.Zero);
                }
                p.Store(s + j);
                sv += p;
            }
            sum = Vector256.Sum(sv);
        }
        else
        {
            for (int j = 0; j < T; j++)
            {
                float p = j < valid ? CpuMath.Exp2(s[j] - mNew) : 0f;
                s[j] = p;
                sum += p;
            }
        }
        l = l * alpha + sum;
        m = mNew;
        return alpha;
    }

    /// <summary>kt[d·64 + j] = K[b, j0+j, hk, d], zero for j ≥ tl.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void LoadKeyTileTransposed(float* K, AttentionDims x, int b, int hk, int j0, int tl, float* kt)
    {
        int D = x.D;
        if (tl < T) new Span<float>(kt, D * T).Clear();
        for (int j = 0; j < tl; j++)
        {
            float* src = K + (((long)b * x.Nk + j0 + j) * x.Hk + hk) * D;
            for (int d = 0; d < D; d++) kt[d * T + j] = src[d];
        }
    }

    /// <summary>dst[j·ld + e] = X[b, j0+j, head, e] for e &lt; width, zero-padded to ld and to 64 rows.</summary>
    internal static void LoadRows(float* X, int n, int heads, int width, int b, int head, int j0, int count, int ld, float* dst)
    {
        for (int j = 0; j < count; j++)
        {
            float* src = X + (((long)b * n + j0 + j) * heads + head) * width;
            float* d = dst + j * ld;
            new Span<float>(src, width).CopyTo(new Span<float>(d, width));
            if (ld > width) new Span<float>(d + width, ld - width).Clear();
        }
        if (count < T) new Span<float>(dst + count * ld, (T - count) * ld).Clear();
    }

    /// <summary>dst[e·64 + j] = X[b, j0+j, head, e] (a tile transposed), zero for j ≥ count.</summary>
    internal static void LoadTransposed(float* X, int n, int heads, int width, int b, int head, int j0, int count, float* dst)
    {
        if (count < T) new Span<float>(dst, width * T).Clear();
        for (int j = 0; j < count; j++)
        {
            float* src = X + (((long)b * n + j0 + j) * heads + head) * width;
            for (int e = 0; e < width; e++) dst[e * T + j] = src[e];
        }
    }

    /// <summary>dst[r·ld + d] = c · X[b, i0+r, h, d], zero-padded to ld and to 64 rows.</summary>
    internal static void LoadScaledRows(float* X, int n, int heads, int width, int b, int h, int i0, int rows, int ld, float c, float* dst)
    {
        for (int r = 0; r < rows; r++)
        {
            float* src = X + (((long)b * n + i0 + r) * heads + h) * width;
            float* d = dst + r * ld;
            for (int e = 0; e < width; e++) d[e] = src[e] * c;
            for (int e = width; e < ld; e++) d[e] = 0f;
        }
        if (rows < T) new Span<float>(dst + rows * ld, (T - rows) * ld).Clear();
    }
}
