using System.Runtime.CompilerServices;
namespace Distributed.Kernels.Cpu;

/// <summary>
/// The inter-chunk terms of lightning attention on the CPU, added to results computed with S0 = 0 and
/// dS_end = 0: forward <c>o_i += λ^(i+1) q_i S0</c>; backward <c>dq_i += λ^(i+1) dO_i S0ᵀ</c>,
/// <c>dk_j += λ^(N−1−j) dS_end v_j</c>, <c>dv_j += λ^(N−1−j) dS_endᵀ k_j</c> (λ = 1 when not causal).
/// 64-row tiles times one padded state per head; parallel over (batch, head) for O and dQ and over
/// (batch, KV head) for dK and dV, so GQA sums need no locks. Powers are <c>exp(n·ln λ)</c>, never divided by.
/// </summary>
internal static unsafe class CpuLightningInterChunk
{
    private const int T = 64;

    /// <summary>Per-thread buffers: one state [D, DvP], its transpose [Dv, DP], two row tiles.</summary>
    private readonly struct Tiles
    {
        public readonly float* S, St, X, Y;
        public readonly int DP, DvP;

        public Tiles(int d, int dv)
        {
            DP = CpuMath.Pad(d); DvP = CpuMath.Pad(dv);
            int w = Math.Max(DP, DvP);
            float* p = CpuParallel.Scratch((long)d * DvP + (long)dv * DP + 2L * T * w);
            S = p; p += d * DvP;
            St = p; p += dv * DP;
            X = p; p += T * w;
            Y = p;
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void LoadRows(float* src, int n, int heads, int width, int b, int head, int t0, int count, int ld, float* dst)
    {
        for (int j = 0; j < count; j++)
        {
            new Span<float>(src + (((long)b * n + t0 + j) * heads + head) * width, width).CopyTo(new Span<float>(dst + j * ld, width));
            if (ld > width) new Span<float>(dst + j * ld + width, ld - width).Clear();
        }
    }

    /// <summary>S [D, DvP] and Sᵀ [Dv, DP], both zero-padded, from a [D, Dv] state.</summary>
    private static void LoadState(float* src, int d, int dv, in Tiles t)
    {
        for (int r = 0; r < d; r++)
        {
            new Span<float>(src + (long)r * dv, dv).CopyTo(new Span<float>(t.S + r * t.DvP, dv));
            new Span<float>(t.S + r * t.DvP + dv, t.DvP - dv).Clear();
        }
        for (int e = 0; e < dv; e++)
        {
            for (int r = 0; r < d; r++) t.St[e * t.DP + r] = src[(long)r * dv + e];
            new Span<float>(t.St + e * t.DP + d, t.DP - d).Clear();
        }
    }

    private static float Power(double ln, long n) => (float)Math.Exp(n * ln);

    /// <summary>
    /// Row i of <paramref name="dst"/> (stride <paramref name="dstStride"/>) += λ^(p0 + step·i) · row i of
    /// <paramref name="src"/>, for i &lt; rows, vectorized; λ^p = exp(p·ln), never divided by.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AddDecayedRows(float* dst, long dstStride, float* src, int srcStride, int rows, int width, double ln, long p0, int step)
    {
        for (int i = 0; i < rows; i++)
        {
            float* row = dst + i * dstStride;
            CpuMath.AddScaled(row, row, src + (long)i * srcStride, ln == 0.0 ? 1f : Power(ln, p0 + (long)step * i), width, false);
        }
    }

    public static void Forward(CpuTensor q, float[] decay, bool causal, CpuTensor s0, CpuTensor o, int b0, int n, int heads, int d, int dv, int threads)
    {
        float* Q = q.Pointer, S0 = s0.Pointer, O = o.Pointer;
        CpuParallel.For(b0 * heads, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (bh) =>
        {
            int b = bh / heads, h = bh % heads;
            var t = new Tiles(d, dv);
            double ln = causal ? Math.Log(decay[h]) : 0.0;
            LoadState(S0 + (long)bh * d * dv, d, dv, t);
            for (int t0 = 0; t0 < n; t0 += T)
            {
                int bl = Math.Min(T, n - t0);
                LoadRows(Q, n, heads, d, b, h, t0, bl, t.DP, t.X);
                CpuMath.Gemm(bl, t.DvP, d, t.X, 1, t.DP, t.S, t.DvP, t.Y, t.DvP, false);
                AddDecayedRows(O + (((long)b * n + t0) * heads + h) * dv, (long)heads * dv, t.Y, t.DvP, bl, dv, ln, t0 + 1, 1);
            }
        });
    }

    public static void Backward(CpuTensor k, CpuTensor v, float[] decay, bool causal, CpuTensor? s0, CpuTensor dO, CpuTensor? dSEnd,
        CpuTensor dQ, CpuTensor dK, CpuTensor dV, AttentionDims x, int threads)
    {
        float* K = k.Pointer, V = v.Pointer, G = dO.Pointer, DQ = dQ.Pointer, DK = dK.Pointer, DV = dV.Pointer;
        int n = x.Nq, d = x.D, dv = x.Dv;
        if (s0 is not null)
        {
            float* S0 = s0.Pointer;
            CpuParallel.For(x.B * x.H, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (bh) =>
            {
                int b = bh / x.H, h = bh % x.H;
                var t = new Tiles(d, dv);
                double ln = causal ? Math.Log(decay[h]) : 0.0;
                LoadState(S0 + (long)bh * d * dv, d, dv, t);
                for (int t0 = 0; t0 < n; t0 += T)
                {
                    int bl = Math.Min(T, n - t0);
                    LoadRows(G, n, x.H, dv, b, h, t0, bl, t.DvP, t.X);
                    CpuMath.Gemm(bl, t.DP, dv, t.X, 1, t.DvP, t.St, t.DP, t.Y, t.DP, false);
                    AddDecayedRows(DQ + (((long)b * n + t0) * x.H + h) * d, (long)x.H * d, t.Y, t.DP, bl, d, ln, t0 + 1, 1);
                }
            });
        }
        if (dSEnd is not null)
        {
            float* E = dSEnd.Pointer;
            CpuParallel.For(x.B * x.Hk, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (bhk) =>
            {
                int b = bhk / x.Hk, hk = bhk % x.Hk;
                var t = new Tiles(d, dv);
                for (int g = 0; g < x.Group; g++)
                {
                    int h = hk * x.Group + g;
                    double ln = causal ? Math.Log(decay[h]) : 0.0;
                    LoadState(E + ((long)b * x.H + h) * d * dv, d, dv, t);
                    for (int t0 = 0; t0 < n; t0 += T)
                    {
                        int bl = Math.Min(T, n - t0);
                        // dk_j += w_j dS_end v_j: rows of V times dS_endᵀ.
                        LoadRows(V, n, x.Hk, dv, b, hk, t0, bl, t.DvP, t.X);
                        CpuMath.Gemm(bl, t.DP, dv, t.X, 1, t.DvP, t.St, t.DP, t.Y, t.DP, false);
                        AddDecayedRows(DK + (((long)b * n + t0) * x.Hk + hk) * d, (long)x.Hk * d, t.Y, t.DP, bl, d, ln, n - 1 - t0, -1);
                        // dv_j += w_j dS_endᵀ k_j: rows of K times dS_end.
                        LoadRows(K, n, x.Hk, d, b, hk, t0, bl, t.DP, t.X);
                        CpuMath.Gemm(bl, t.DvP, d, t.X, 1, t.DP, t.S, t.DvP, t.Y, t.DvP, false);
                        AddDecayedRows(DV + (((long)b * n + t0) * x.Hk + hk) * dv, (long)x.Hk * dv, t.Y, t.DvP, bl, dv, ln, n - 1 - t0, -1);
                    }
                }
            });
        }
    }
}
