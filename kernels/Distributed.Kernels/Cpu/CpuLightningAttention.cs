using System.Runtime.Intrinsics;

namespace Distributed.Kernels.Cpu;

/// <summary>
/// Lightning (linear) attention on the CPU, blocked in 64-token blocks so the causal case is O(N):
/// the intra-block part <c>[(Q Kᵀ) ⊙ M] V</c> with <c>M_ij = λ^(i−j)</c>, the inter-block part
/// <c>diag(λ^(i+1)) Q S</c>, and the state update <c>S ← λ^b S + (diag(λ^(b−1−j)) K)ᵀ V</c>. Powers of λ
/// are formed as <c>exp(n·ln λ)</c> for n ≤ 65 or from global positions, flushed to 0 below 2^-64
/// (<see cref="PowerFloor"/>), never divided by. Parallel over (batch, head), forward and backward; with
/// GQA the backward writes each query head's dK and dV to its own slice of a partials buffer and sums
/// the group afterwards, so MQA still uses every thread.
/// </summary>
internal static unsafe class CpuLightningAttention
{
    private const int T = 64;

    /// <summary>Per-thread tile buffers of one (batch, head) sweep.</summary>
    private readonly struct Tiles
    {
        public readonly float* Q, K, V, G, Kt, Vt, A, dA, Tmp, Tmp2, S, St, Pw, Mask;
        public readonly int D, Dv, DP, DvP;

        public Tiles(int d, int dv)
        {
            D = d; Dv = dv; DP = CpuMath.Pad(d); DvP = CpuMath.Pad(dv);
            int dp = DP, dvp = DvP;
            long total = 4L * T * Math.Max(dp, dvp) + (long)d * T + (long)dv * T + 2 * T * T + 2L * T * Math.Max(dp, dvp) + (long)d * dvp + (long)dv * dp + T + 2 + 2 * T + 16;
            float* p = CpuParallel.Scratch(total);
            Q = p; p += T * dp;
            K = p; p += T * dp;
            V = p; p += T * dvp;
            G = p; p += T * dvp;
            Kt = p; p += d * T;
            Vt = p; p += dv * T;
            A = p; p += T * T;
            dA = p; p += T * T;
            Tmp = p; p += T * Math.Max(dp, dvp);
            Tmp2 = p; p += T * Math.Max(dp, dvp);
            S = p; p += d * dvp;
            St = p; p += dv * dp;
            Pw = p; p += T + 16;
            Mask = p;
        }

        /// <summary>Pw[n] = λ^n for n in [0, 65], flushed to 0 below <see cref="PowerFloor"/>.</summary>
        public void Powers(float lambda)
        {
            double ln = Math.Log(lambda);
            for (int n = 0; n <= T + 1; n++) Pw[n] = Power(n * ln);
            // Mask[m] = λ^(T−1−m) for m < T, 0 after: row i of the causal decay mask is Mask[T−1−i ..].
            for (int m = 0; m < T; m++) Mask[m] = Pw[T - 1 - m];
            new Span<float>(Mask + T, T).Clear();
        }
    }

    /// <summary>
    /// Decay powers below 2^-64 are flushed to exactly 0, so no hot loop multiplies by (or produces from a
    /// power) a float subnormal, which costs a microcode assist per operation on x86 and made small λ slow.
    /// A dropped term is below 2^-64 of the diagonal term (weight λ^0 = 1) of the same row: far under fp32
    /// resolution.
    /// </summary>
    public const double PowerFloor = 5.421010862427522e-20; // 2^-64

    /// <summary>e^x as a float, 0 when below <see cref="PowerFloor"/>.</summary>
    private static float Power(double x)
    {
        double p = Math.Exp(x);
        return p < PowerFloor ? 0f : (float)p;
    }

    private static void LoadRows(float* X, int n, int heads, int width, int b, int head, int t0, int count, int ld, float* dst)
    {
        for (int j = 0; j < count; j++)
        {
            float* src = X + (((long)b * n + t0 + j) * heads + head) * width;
            new Span<float>(src, width).CopyTo(new Span<float>(dst + j * ld, width));
            if (ld > width) new Span<float>(dst + j * ld + width, ld - width).Clear();
        }
    }

    private static void Transpose(float* src, int rows, int ld, int cols, float* dst, int ldDst)
    {
        // dst[c·ldDst + r] = src[r·ld + c]
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++) dst[c * ldDst + r] = src[r * ld + c];
    }

    private static void ClearPadding(float* dst, int rows, int ld, int usedRows)
    {
        if (usedRows < rows) new Span<float>(dst + usedRows * ld, (rows - usedRows) * ld).Clear();
    }

    /// <summary>A[i, j] ← λ^(i−j)·A[i, j] for j ≤ i &lt; bl, else 0 (<paramref name="mask"/> is <see cref="Tiles.Mask"/>).</summary>
    private static void CausalDecayMask(float* a, int bl, float* mask)
    {
        for (int i = 0; i < bl; i++) CpuMath.Multiply(a + i * T, mask + T - 1 - i, T);
    }

    private static void LoadState(float* src, int d, int dv, int dvp, float* dst)
    {
        for (int r = 0; r < d; r++)
        {
            new Span<float>(src + (long)r * dv, dv).CopyTo(new Span<float>(dst + r * dvp, dv));
            if (dvp > dv) new Span<float>(dst + r * dvp + dv, dvp - dv).Clear();
        }
    }

    private static void StoreState(float* src, int d, int dv, int dvp, float* dst)
    {
        for (int r = 0; r < d; r++) new Span<float>(src + r * dvp, dv).CopyTo(new Span<float>(dst + (long)r * dv, dv));
    }

    public static void Forward(CpuTensor q, CpuTensor k, CpuTensor v, float[] decay, bool causal, CpuTensor? s0, CpuTensor o, CpuTensor? sEnd, AttentionDims x, int threads)
    {
        float* Q = q.Pointer, K = k.Pointer, V = v.Pointer, O = o.Pointer;
        float* S0 = s0 is null ? null : s0.Pointer, SE = sEnd is null ? null : sEnd.Pointer;
        int N = x.Nq;
        CpuParallel.For(x.B * x.H, threads, bh =>
        {
            int b = bh / x.H, h = bh % x.H, hk = h / x.Group;
            var t = new Tiles(x.D, x.Dv);
            long stateOff = (long)bh * x.D * x.Dv;
            t.Powers(causal ? decay[h] : 1f);
            if (S0 is null) new Span<float>(t.S, x.D * t.DvP).Clear();
            else LoadState(S0 + stateOff, x.D, x.Dv, t.DvP, t.S);
            if (!causal)
            {
                // S = S0 + Kᵀ V over all tokens, then O = Q S.
                for (int t0 = 0; t0 < N; t0 += T)
                {
                    int bl = Math.Min(T, N - t0);
                    LoadRows(K, N, x.Hk, x.D, b, hk, t0, bl, t.DP, t.K);
                    LoadRows(V, N, x.Hk, x.Dv, b, hk, t0, bl, t.DvP, t.V);
                    CpuMath.Gemm(x.D, t.DvP, bl, t.K, t.DP, 1, t.V, t.DvP, t.S, t.DvP, true);
                }
                for (int t0 = 0; t0 < N; t0 += T)
                {
                    int bl = Math.Min(T, N - t0);
                    LoadRows(Q, N, x.H, x.D, b, h, t0, bl, t.DP, t.Q);
                    CpuMath.Gemm(bl, t.DvP, x.D, t.Q, 1, t.DP, t.S, t.DvP, t.Tmp, t.DvP, false);
                    for (int i = 0; i < bl; i++)
                        new Span<float>(t.Tmp + i * t.DvP, x.Dv).CopyTo(new Span<float>(O + (((long)b * N + t0 + i) * x.H + h) * x.Dv, x.Dv));
                }
            }
            else
            {
                for (int t0 = 0; t0 < N; t0 += T)
                {
                    int bl = Math.Min(T, N - t0);
                    LoadRows(Q, N, x.H, x.D, b, h, t0, bl, t.DP, t.Q);
                    LoadRows(K, N, x.Hk, x.D, b, hk, t0, bl, t.DP, t.K);
                    LoadRows(V, N, x.Hk, x.Dv, b, hk, t0, bl, t.DvP, t.V);
                    Transpose(t.K, bl, t.DP, x.D, t.Kt, T);
                    if (bl < T) for (int d = 0; d < x.D; d++) new Span<float>(t.Kt + d * T + bl, T - bl).Clear();
                    // Intra-block: [(Q Kᵀ) ⊙ M] V.
                    CpuMath.Gemm(bl, T, x.D, t.Q, 1, t.DP, t.Kt, T, t.A, T, false);
                    CausalDecayMask(t.A, bl, t.Mask);
                    CpuMath.Gemm(bl, t.DvP, bl, t.A, 1, T, t.V, t.DvP, t.Tmp, t.DvP, false);
                    // Inter-block: diag(λ^(i+1)) Q S.
                    CpuMath.Gemm(bl, t.DvP, x.D, t.Q, 1, t.DP, t.S, t.DvP, t.Tmp2, t.DvP, false);
                    for (int i = 0; i < bl; i++)
                    {
                        float w = t.Pw[i + 1];
                        float* dst = O + (((long)b * N + t0 + i) * x.H + h) * x.Dv;
                        float* intra = t.Tmp + i * t.DvP, inter = t.Tmp2 + i * t.DvP;
                        CpuMath.AddScaled(dst, intra, inter, w, x.Dv, false);
                    }
                    // State: S ← λ^bl S + (diag(λ^(bl−1−j)) K)ᵀ V.
                    for (int j = 0; j < bl; j++) CpuMath.Scale(t.K + j * t.DP, t.DP, t.Pw[bl - 1 - j]);
                    CpuMath.Scale(t.S, x.D * t.DvP, t.Pw[bl]);
                    CpuMath.Gemm(x.D, t.DvP, bl, t.K, t.DP, 1, t.V, t.DvP, t.S, t.DvP, true);
                }
            }
            if (SE is not null) StoreState(t.S, x.D, x.Dv, t.DvP, SE + stateOff);
        });
    }

    public static void Backward(CpuTensor q, CpuTensor k, CpuTensor v, float[] decay, bool causal, CpuTensor? s0, CpuTensor dO, CpuTensor? dSEnd,
        CpuTensor dQ, CpuTensor dK, CpuTensor dV, CpuTensor? dS0, AttentionDims x, int threads, PinnedBuffer partials)
    {
        float* Q = q.Pointer, K = k.Pointer, V = v.Pointer, G = dO.Pointer, DQ = dQ.Pointer, DK = dK.Pointer, DV = dV.Pointer;
        float* S0 = s0 is null ? null : s0.Pointer, GE = dSEnd is null ? null : dSEnd.Pointer, GS = dS0 is null ? null : dS0.Pointer;
        int N = x.Nq, D = x.D, Dv = x.Dv;
        // One query head per task. Without GQA a task owns its dK/dV rows; with it, every query head
        // writes its own partial dK/dV ([B·H, N, D] and [B·H, N, Dv]) and the group is summed below.
        bool direct = x.Group == 1;
        long heads = (long)x.B * x.H;
        float* PK = direct ? null : partials.Get(heads * N * (D + Dv));
        float* PV = direct ? null : PK + heads * N * D;
        CpuParallel.For(x.B * x.H, threads, bh =>
        {
            int b = bh / x.H, h = bh % x.H, hk = h / x.Group;
            var t = new Tiles(D, Dv);
            int DP = t.DP, DvP = t.DvP;
            var dst = direct
                ? new Gradients(DK + ((long)b * N * x.Hk + hk) * D, (long)x.Hk * D, DV + ((long)b * N * x.Hk + hk) * Dv, (long)x.Hk * Dv)
                : new Gradients(PK + bh * (long)N * D, D, PV + bh * (long)N * Dv, Dv);
            for (int i = 0; i < N; i++)
            {
                new Span<float>(dst.K + i * dst.KStride, D).Clear();
                new Span<float>(dst.V + i * dst.VStride, Dv).Clear();
            }
            long stateOff = (long)bh * D * Dv;
            t.Powers(causal ? decay[h] : 1f);
            if (S0 is null) new Span<float>(t.S, D * DvP).Clear();
            else LoadState(S0 + stateOff, D, Dv, DvP, t.S);
            if (!causal)
            {
                NonCausalBackward(Q, K, V, G, DQ, dst, GE, GS, x, t, b, h, hk, stateOff);
                return;
            }
            // Sweep 1, forwards: dq_i = Σ_{j≤i} λ^(i−j)(dO_i·v_j) k_j + λ^(i+1) dO_i Sᵀ. Only Sᵀ is
            // needed, so the sweep carries Sᵀ ([Dv, DP]) and updates it directly, with no transpose per block.
            Transpose(t.S, D, DvP, Dv, t.St, DP);
            for (int e = 0; e < Dv; e++) new Span<float>(t.St + e * DP + D, DP - D).Clear();
            for (int t0 = 0; t0 < N; t0 += T)
            {
                int bl = Math.Min(T, N - t0);
                LoadRows(G, N, x.H, Dv, b, h, t0, bl, DvP, t.G);
                LoadRows(K, N, x.Hk, D, b, hk, t0, bl, DP, t.K);
                LoadRows(V, N, x.Hk, Dv, b, hk, t0, bl, DvP, t.V);
                Transpose(t.V, bl, DvP, Dv, t.Vt, T);
                if (bl < T) for (int e = 0; e < Dv; e++) new Span<float>(t.Vt + e * T + bl, T - bl).Clear();
                CpuMath.Gemm(bl, T, Dv, t.G, 1, DvP, t.Vt, T, t.dA, T, false);
                CausalDecayMask(t.dA, bl, t.Mask);
                CpuMath.Gemm(bl, DP, bl, t.dA, 1, T, t.K, DP, t.Tmp, DP, false);
                CpuMath.Gemm(bl, DP, Dv, t.G, 1, DvP, t.St, DP, t.Tmp2, DP, false);
                for (int i = 0; i < bl; i++)
                {
                    float w = t.Pw[i + 1];
                    float* dq = DQ + (((long)b * N + t0 + i) * x.H + h) * D;
                    CpuMath.AddScaled(dq, t.Tmp + i * DP, t.Tmp2 + i * DP, w, D, false);
                }
                // Sᵀ ← λ^bl Sᵀ + Vᵀ diag(λ^(bl−1−j)) K.
                for (int j = 0; j < bl; j++) CpuMath.Scale(t.K + j * DP, DP, t.Pw[bl - 1 - j]);
                CpuMath.Scale(t.St, Dv * DP, t.Pw[bl]);
                CpuMath.Gemm(Dv, DP, bl, t.V, DvP, 1, t.K, DP, t.St, DP, true);
            }
            // Sweep 2, backwards, carrying G = ∂L/∂(state entering the next block).
            if (GE is null) new Span<float>(t.S, D * DvP).Clear();
            else LoadState(GE + stateOff, D, Dv, DvP, t.S);
            int lastStart = (N - 1) / T * T;
            for (int t0 = lastStart; t0 >= 0; t0 -= T)
            {
                int bl = Math.Min(T, N - t0);
                LoadRows(Q, N, x.H, D, b, h, t0, bl, DP, t.Q);
                LoadRows(G, N, x.H, Dv, b, h, t0, bl, DvP, t.G);
                LoadRows(K, N, x.Hk, D, b, hk, t0, bl, DP, t.K);
                LoadRows(V, N, x.Hk, Dv, b, hk, t0, bl, DvP, t.V);
                Transpose(t.K, bl, DP, D, t.Kt, T);
                Transpose(t.V, bl, DvP, Dv, t.Vt, T);
                if (bl < T)
                {
                    for (int d = 0; d < D; d++) new Span<float>(t.Kt + d * T + bl, T - bl).Clear();
                    for (int e = 0; e < Dv; e++) new Span<float>(t.Vt + e * T + bl, T - bl).Clear();
                }
                CpuMath.Gemm(bl, T, D, t.Q, 1, DP, t.Kt, T, t.A, T, false);
                CausalDecayMask(t.A, bl, t.Mask);
                CpuMath.Gemm(bl, T, Dv, t.G, 1, DvP, t.Vt, T, t.dA, T, false);
                CausalDecayMask(t.dA, bl, t.Mask);
                // dk_j = Σ_{i≥j} dA_ij q_i + λ^(bl−1−j) G v_j
                CpuMath.Gemm(bl, DP, bl, t.dA, T, 1, t.Q, DP, t.Tmp, DP, false);
                Transpose(t.S, D, DvP, Dv, t.St, DP);
                for (int e = 0; e < Dv; e++) new Span<float>(t.St + e * DP + D, DP - D).Clear();
                CpuMath.Gemm(bl, DP, Dv, t.V, 1, DvP, t.St, DP, t.Tmp2, DP, false);
                for (int j = 0; j < bl; j++)
                {
                    float w = t.Pw[bl - 1 - j];
                    float* dk = dst.K + (t0 + j) * dst.KStride;
                    CpuMath.AddScaled(dk, t.Tmp + j * DP, t.Tmp2 + j * DP, w, D, true);
                }
                // dv_j = Σ_{i≥j} A_ij dO_i + λ^(bl−1−j) Gᵀ k_j
                CpuMath.Gemm(bl, DvP, bl, t.A, T, 1, t.G, DvP, t.Tmp, DvP, false);
                CpuMath.Gemm(bl, DvP, D, t.K, 1, DP, t.S, DvP, t.Tmp2, DvP, false);
                for (int j = 0; j < bl; j++)
                {
                    float w = t.Pw[bl - 1 - j];
                    float* dv = dst.V + (t0 + j) * dst.VStride;
                    CpuMath.AddScaled(dv, t.Tmp + j * DvP, t.Tmp2 + j * DvP, w, Dv, true);
                }
                // G ← λ^bl G + Σ_i λ^(i+1) q_iᵀ dO_i
                for (int i = 0; i < bl; i++) CpuMath.Scale(t.Q + i * DP, DP, t.Pw[i + 1]);
                CpuMath.Scale(t.S, D * DvP, t.Pw[bl]);
                CpuMath.Gemm(D, DvP, bl, t.Q, DP, 1, t.G, DvP, t.S, DvP, true);
            }
            if (GS is not null) StoreState(t.S, D, Dv, DvP, GS + stateOff);
        });
        if (direct) return;
        // dK[b, i, hk] = Σ_g partial[b, hk·G + g, i], and the same for dV.
        int blocks = (N + T - 1) / T;
        CpuParallel.For(x.B * x.Hk * blocks, threads, task =>
        {
            int blk = task % blocks, bhk = task / blocks, b = bhk / x.Hk, hk = bhk % x.Hk;
            long h0 = (long)b * x.H + (long)hk * x.Group;
            for (int i = blk * T, end = Math.Min(N, i + T); i < end; i++)
            {
                SumGroup(DK + (((long)b * N + i) * x.Hk + hk) * D, PK + (h0 * N + i) * D, (long)N * D, x.Group, D);
                SumGroup(DV + (((long)b * N + i) * x.Hk + hk) * Dv, PV + (h0 * N + i) * Dv, (long)N * Dv, x.Group, Dv);
            }
        });
    }

    /// <summary>Where one task's dK and dV rows go: row i of dK at K + i·KStride, of dV at V + i·VStride.</summary>
    private readonly struct Gradients(float* k, long kStride, float* v, long vStride)
    {
        public readonly float* K = k, V = v;
        public readonly long KStride = kStride, VStride = vStride;
    }

    /// <summary>dst[e] = Σ_g src[g·stride + e] for e &lt; n.</summary>
    private static void SumGroup(float* dst, float* src, long stride, int group, int n)
    {
        new Span<float>(src, n).CopyTo(new Span<float>(dst, n));
        for (int g = 1; g < group; g++)
        {
            float* part = src + g * stride;
            int e = 0;
            if (CpuMath.UseVector512)
                for (; e + 16 <= n; e += 16) (Vector512.Load(dst + e) + Vector512.Load(part + e)).Store(dst + e);
            else if (CpuMath.UseVector256)
                for (; e + 8 <= n; e += 8) (Vector256.Load(dst + e) + Vector256.Load(part + e)).Store(dst + e);
            for (; e < n; e++) dst[e] += part[e];
        }
    }

    private static void NonCausalBackward(float* Q, float* K, float* V, float* G, float* DQ, Gradients dst, float* GE, float* GS,
        AttentionDims x, Tiles t, int b, int h, int hk, long stateOff)
    {
        int N = x.Nq, D = x.D, Dv = x.Dv, DP = t.DP, DvP = t.DvP;
        // On entry t.S holds S0; add Kᵀ V to get the total state.
        for (int t0 = 0; t0 < N; t0 += T)
        {
            int bl = Math.Min(T, N - t0);
            LoadRows(K, N, x.Hk, D, b, hk, t0, bl, DP, t.K);
            LoadRows(V, N, x.Hk, Dv, b, hk, t0, bl, DvP, t.V);
            CpuMath.Gemm(D, DvP, bl, t.K, DP, 1, t.V, DvP, t.S, DvP, true);
        }
        // dQ = dO Sᵀ
        Transpose(t.S, D, DvP, Dv, t.St, DP);
        for (int e = 0; e < Dv; e++) new Span<float>(t.St + e * DP + D, DP - D).Clear();
        for (int t0 = 0; t0 < N; t0 += T)
        {
            int bl = Math.Min(T, N - t0);
            LoadRows(G, N, x.H, Dv, b, h, t0, bl, DvP, t.G);
            CpuMath.Gemm(bl, DP, Dv, t.G, 1, DvP, t.St, DP, t.Tmp, DP, false);
            for (int i = 0; i < bl; i++)
                new Span<float>(t.Tmp + i * DP, D).CopyTo(new Span<float>(DQ + (((long)b * N + t0 + i) * x.H + h) * D, D));
        }
        // Gs = dS_end + Qᵀ dO (the gradient of the total state, also dS0), kept in t.S.
        if (GE is null) new Span<float>(t.S, D * DvP).Clear();
        else LoadState(GE + stateOff, D, Dv, DvP, t.S);
        for (int t0 = 0; t0 < N; t0 += T)
        {
            int bl = Math.Min(T, N - t0);
            LoadRows(Q, N, x.H, D, b, h, t0, bl, DP, t.Q);
            LoadRows(G, N, x.H, Dv, b, h, t0, bl, DvP, t.G);
            CpuMath.Gemm(D, DvP, bl, t.Q, DP, 1, t.G, DvP, t.S, DvP, true);
        }
        Transpose(t.S, D, DvP, Dv, t.St, DP);
        for (int e = 0; e < Dv; e++) new Span<float>(t.St + e * DP + D, DP - D).Clear();
        for (int t0 = 0; t0 < N; t0 += T)
        {
            int bl = Math.Min(T, N - t0);
            LoadRows(K, N, x.Hk, D, b, hk, t0, bl, DP, t.K);
            LoadRows(V, N, x.Hk, Dv, b, hk, t0, bl, DvP, t.V);
            CpuMath.Gemm(bl, DP, Dv, t.V, 1, DvP, t.St, DP, t.Tmp, DP, false);
            CpuMath.Gemm(bl, DvP, D, t.K, 1, DP, t.S, DvP, t.Tmp2, DvP, false);
            for (int j = 0; j < bl; j++)
            {
                float* dk = dst.K + (t0 + j) * dst.KStride;
                float* dv = dst.V + (t0 + j) * dst.VStride;
                for (int d = 0; d < D; d++) dk[d] += t.Tmp[j * DP + d];
                for (int e = 0; e < Dv; e++) dv[e] += t.Tmp2[j * DvP + e];
            }
        }
        if (GS is not null) StoreState(t.S, D, Dv, DvP, GS + stateOff);
    }

    /// <summary>M = Σ_j λ^(N−1−j) k_jᵀ v_j per (batch, head).</summary>
    public static void ChunkState(CpuTensor k, CpuTensor v, float[] decay, bool causal, CpuTensor m, AttentionDims x, int threads)
    {
        float* K = k.Pointer, V = v.Pointer, M = m.Pointer;
        int N = x.Nk;
        CpuParallel.For(x.B * x.H, threads, bh =>
        {
            int b = bh / x.H, h = bh % x.H, hk = h / x.Group;
            var t = new Tiles(x.D, x.Dv);
            t.Powers(causal ? decay[h] : 1f);
            new Span<float>(t.S, x.D * t.DvP).Clear();
            for (int t0 = 0; t0 < N; t0 += T)
            {
                int bl = Math.Min(T, N - t0);
                LoadRows(K, N, x.Hk, x.D, b, hk, t0, bl, t.DP, t.K);
                LoadRows(V, N, x.Hk, x.Dv, b, hk, t0, bl, t.DvP, t.V);
                for (int j = 0; j < bl; j++) CpuMath.Scale(t.K + j * t.DP, t.DP, t.Pw[bl - 1 - j]);
                CpuMath.Scale(t.S, x.D * t.DvP, t.Pw[bl]);
                CpuMath.Gemm(x.D, t.DvP, bl, t.K, t.DP, 1, t.V, t.DvP, t.S, t.DvP, true);
            }
            StoreState(t.S, x.D, x.Dv, t.DvP, M + (long)bh * x.D * x.Dv);
        });
    }

    /// <summary>dM = Σ_i λ^(i+1) q_iᵀ dO_i per (batch, head).</summary>
    public static void ChunkStateBackward(CpuTensor q, CpuTensor dO, float[] decay, bool causal, CpuTensor dM, int b_, int n, int heads, int d, int dv, int threads)
    {
        float* Q = q.Pointer, G = dO.Pointer, M = dM.Pointer;
        CpuParallel.For(b_ * heads, threads, bh =>
        {
            int b = bh / heads, h = bh % heads;
            var t = new Tiles(d, dv);
            double ln = Math.Log(causal ? decay[h] : 1f);
            new Span<float>(t.S, d * t.DvP).Clear();
            for (int t0 = 0; t0 < n; t0 += T)
            {
                int bl = Math.Min(T, n - t0);
                LoadRows(Q, n, heads, d, b, h, t0, bl, t.DP, t.Q);
                LoadRows(G, n, heads, dv, b, h, t0, bl, t.DvP, t.G);
                for (int i = 0; i < bl; i++) CpuMath.Scale(t.Q + i * t.DP, t.DP, Power((t0 + i + 1) * ln));
                CpuMath.Gemm(d, t.DvP, bl, t.Q, t.DP, 1, t.G, t.DvP, t.S, t.DvP, true);
            }
            StoreState(t.S, d, dv, t.DvP, M + (long)bh * d * dv);
        });
    }
}
