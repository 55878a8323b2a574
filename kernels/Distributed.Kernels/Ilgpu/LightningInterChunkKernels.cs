using ILGPU;

namespace Distributed.Kernels.Ilgpu;

/// <summary>Sizes of one inter-chunk launch (query heads H, KV heads Hk, Causal 0/1).</summary>
internal struct InterChunkParams
{
    public int B, N, H, Hk, D, Dv, Causal;
}

/// <summary>
/// The inter-chunk terms of lightning attention, added in place to results computed with S0 = 0 and
/// dS_end = 0: <c>o_i += λ^(i+1) q_i S0</c>, <c>dq_i += λ^(i+1) dO_i S0ᵀ</c>,
/// <c>dk_j += λ^(N−1−j) dS_end v_j</c>, <c>dv_j += λ^(N−1−j) dS_endᵀ k_j</c> (λ = 1 when not causal).
/// One thread per output element, grid-stride: each is a D- or Dv-long dot product with one state row or
/// column, so the work is the same O(N·D·Dv) as the term itself. dK and dV loop over the group's query heads
/// inside the thread, so GQA sums need no atomics.
/// </summary>
internal static class LightningInterChunkKernels
{
    private static float Power(ArrayView<float> lnDecay, int h, int n, int causal) =>
        causal != 0 ? MathF.Exp(n * lnDecay[h]) : 1f;

    /// <summary>o[b,i,h,c] += λ_h^(i+1) Σ_d q[b,i,h,d] S0[b,h,d,c].</summary>
    public static void Forward(ArrayView<float> q, ArrayView<float> s0, ArrayView<float> o, ArrayView<float> lnDecay, InterChunkParams p)
    {
        long total = (long)p.B * p.N * p.H * p.Dv;
        for (long e = Grid.GlobalIndex.X; e < total; e += (long)Grid.DimX * Group.DimX)
        {
            int c = (int)(e % p.Dv);
            long row = e / p.Dv;                       // (b·N + i)·H + h
            int h = (int)(row % p.H);
            long bi = row / p.H;
            int i = (int)(bi % p.N);
            long b = bi / p.N;
            long state = (b * p.H + h) * p.D * p.Dv + c;
            float s = 0f;
            for (int d = 0; d < p.D; d++) s += q[row * p.D + d] * s0[state + (long)d * p.Dv];
            o[e] += Power(lnDecay, h, i + 1, p.Causal) * s;
        }
    }

    /// <summary>dQ[b,i,h,c] += λ_h^(i+1) Σ_e dO[b,i,h,e] S0[b,h,c,e].</summary>
    public static void GradQ(ArrayView<float> dO, ArrayView<float> s0, ArrayView<float> dQ, ArrayView<float> lnDecay, InterChunkParams p)
    {
        long total = (long)p.B * p.N * p.H * p.D;
        for (long e = Grid.GlobalIndex.X; e < total; e += (long)Grid.DimX * Group.DimX)
        {
            int c = (int)(e % p.D);
            long row = e / p.D;
            int h = (int)(row % p.H);
            long bi = row / p.H;
            int i = (int)(bi % p.N);
            long b = bi / p.N;
            long state = ((b * p.H + h) * p.D + c) * p.Dv;
            float s = 0f;
            for (int x = 0; x < p.Dv; x++) s += dO[row * p.Dv + x] * s0[state + x];
            dQ[e] += Power(lnDecay, h, i + 1, p.Causal) * s;
        }
    }

    /// <summary>dK[b,j,hk,c] += Σ_(h of hk) λ_h^(N−1−j) Σ_e dS_end[b,h,c,e] v[b,j,hk,e].</summary>
    public static void GradK(ArrayView<float> v, ArrayView<float> dSEnd, ArrayView<float> dK, ArrayView<float> lnDecay, InterChunkParams p)
    {
        long total = (long)p.B * p.N * p.Hk * p.D;
        int group = p.H / p.Hk;
        for (long e = Grid.GlobalIndex.X; e < total; e += (long)Grid.DimX * Group.DimX)
        {
            int c = (int)(e % p.D);
            long row = e / p.D;                        // (b·N + j)·Hk + hk
            int hk = (int)(row % p.Hk);
            long bj = row / p.Hk;
            int j = (int)(bj % p.N);
            long b = bj / p.N;
            float acc = 0f;
            for (int g = 0; g < group; g++)
            {
                int h = hk * group + g;
                long state = ((b * p.H + h) * p.D + c) * p.Dv;
                float s = 0f;
                for (int x = 0; x < p.Dv; x++) s += dSEnd[state + x] * v[row * p.Dv + x];
                acc += Power(lnDecay, h, p.N - 1 - j, p.Causal) * s;
            }
            dK[e] += acc;
        }
    }

    /// <summary>dV[b,j,hk,c] += Σ_(h of hk) λ_h^(N−1−j) Σ_d dS_end[b,h,d,c] k[b,j,hk,d].</summary>
    public static void GradV(ArrayView<float> k, ArrayView<float> dSEnd, ArrayView<float> dV, ArrayView<float> lnDecay, InterChunkParams p)
    {
        long total = (long)p.B * p.N * p.Hk * p.Dv;
        int group = p.H / p.Hk;
        for (long e = Grid.GlobalIndex.X; e < total; e += (long)Grid.DimX * Group.DimX)
        {
            int c = (int)(e % p.Dv);
            long row = e / p.Dv;
            int hk = (int)(row % p.Hk);
            long bj = row / p.Hk;
            int j = (int)(bj % p.N);
            long b = bj / p.N;
            float acc = 0f;
            for (int g = 0; g < group; g++)
            {
                int h = hk * group + g;
                long state = (b * p.H + h) * p.D * p.Dv + c;
                float s = 0f;
                for (int d = 0; d < p.D; d++) s += dSEnd[state + (long)d * p.Dv] * k[row * p.D + d];
                acc += Power(lnDecay, h, p.N - 1 - j, p.Causal) * s;
            }
            dV[e] += acc;
        }
    }
}
