using ILGPU;

namespace Distributed.Kernels.Ilgpu;

/// <summary>Scalars of the lightning kernels.</summary>
internal struct LightningParams
{
    public int B, N, H, Hk, D, Dv;
    /// <summary>Block length; N for a non-causal call or a whole-chunk state.</summary>
    public int Bs;
    /// <summary>Number of blocks, ceil(N / Bs).</summary>
    public int T;
    public int Causal;
}

/// <summary>
/// Lightning (linear) attention as block kernels: per-block states, a sequential scan over the few blocks
/// per (b, h, d, c), then the intra-block term plus the inter-block term read from the scanned states.
/// Decay enters only as λ^e = exp(e·ln λ) with 0 ≤ e ≤ Bs + 1 inside a block, and across blocks by repeated
/// multiplication; nothing is ever divided by a power of λ, so strong decay underflows harmlessly to 0.
/// The scratch <c>states</c> is [B, H, T, D, Dv].
/// </summary>
internal static class LightningKernels
{
    /// <summary>Threads per group.</summary>
    public const int GroupSize = 256;

    /// <summary>Block length of the causal path.</summary>
    public const int BlockSize = 64;

    private static long Stride => (long)Grid.DimX * Group.DimX;

    private static float LnDecay(ArrayView<float> lnDecay, in LightningParams p, int h) => p.Causal != 0 ? lnDecay[h] : 0f;

    private static int BlockLength(in LightningParams p, int t) => Math.Min(p.Bs, p.N - t * p.Bs);

    /// <summary>states[b,h,t,d,c] = Σ_{j in block t} λ^(n_t−1−jl) k[j,d] v[j,c]. One thread per element.</summary>
    public static void BlockState(ArrayView<float> k, ArrayView<float> v, ArrayView<float> lnDecay, ArrayView<float> states, LightningParams p)
    {
        long total = (long)p.B * p.H * p.T * p.D * p.Dv;
        int group = p.H / p.Hk;
        for (long e = Grid.GlobalIndex.X; e < total; e += Stride)
        {
            int c = (int)(e % p.Dv);
            long r = e / p.Dv;
            int d = (int)(r % p.D); r /= p.D;
            int t = (int)(r % p.T); r /= p.T;
            int h = (int)(r % p.H);
            long b = r / p.H;
            int hk = h / group;
            float ln = LnDecay(lnDecay, p, h);
            int n = BlockLength(p, t);
            float s = 0f;
            for (int jl = 0; jl < n; jl++)
            {
                long row = (b * p.N + t * p.Bs + jl) * p.Hk + hk;
                s += MathF.Exp((n - 1 - jl) * ln) * k[row * p.D + d] * v[row * p.Dv + c];
            }
            states[e] = s;
        }
    }

    /// <summary>
    /// dM_t[b,h,t,d,c] = Σ_{i in block t} λ^(il+1) q[i,d] dO[i,c]: the gradient reaching the state that
    /// enters block t from the block's own outputs.
    /// </summary>
    public static void BlockGrad(ArrayView<float> q, ArrayView<float> dO, ArrayView<float> lnDecay, ArrayView<float> states, LightningParams p)
    {
        long total = (long)p.B * p.H * p.T * p.D * p.Dv;
        for (long e = Grid.GlobalIndex.X; e < total; e += Stride)
        {
            int c = (int)(e % p.Dv);
            long r = e / p.Dv;
            int d = (int)(r % p.D); r /= p.D;
            int t = (int)(r % p.T); r /= p.T;
            int h = (int)(r % p.H);
            long b = r / p.H;
            float ln = LnDecay(lnDecay, p, h);
            int n = BlockLength(p, t);
            float s = 0f;
            for (int il = 0; il < n; il++)
            {
                long row = (b * p.N + t * p.Bs + il) * p.H + h;
                s += MathF.Exp((il + 1) * ln) * q[row * p.D + d] * dO[row * p.Dv + c];
            }
            states[e] = s;
        }
    }

    /// <summary>
    /// Forward scan per (b,h,d,c): replaces each block state M_t with the state entering block t and writes
    /// S_end. Non-causal (T = 1): states[0] becomes the total S0 + KᵀV, which every row reads.
    /// flags.X = 1 when s0 is given, flags.Y = 1 when sEnd is wanted.
    /// </summary>
    public static void ScanForward(ArrayView<float> states, ArrayView<float> s0, ArrayView<float> sEnd, ArrayView<float> lnDecay,
        LightningParams p, Int4 flags)
    {
        long dd = (long)p.D * p.Dv;
        long total = p.B * p.H * dd;
        for (long e = Grid.GlobalIndex.X; e < total; e += Stride)
        {
            long bh = e / dd, x = e % dd;
            int h = (int)(bh % p.H);
            float ln = LnDecay(lnDecay, p, h);
            float s = flags.X != 0 ? s0[e] : 0f;
            for (int t = 0; t < p.T; t++)
            {
                long at = (bh * p.T + t) * dd + x;
                float m = states[at];
                states[at] = s;
                s = MathF.Exp(BlockLength(p, t) * ln) * s + m;
            }
            if (p.Causal == 0) states[bh * p.T * dd + x] = s;
            if (flags.Y != 0) sEnd[e] = s;
        }
    }

    /// <summary>
    /// Backward scan per (b,h,d,c): replaces each dM_t with G_t, the gradient of the state leaving block t,
    /// and writes dS0. Non-causal (T = 1): states[0] becomes the total dS = dS_end + QᵀdO.
    /// flags.X = 1 when dSEnd is given, flags.Y = 1 when dS0 is wanted.
    /// </summary>
    public static void ScanBackward(ArrayView<float> states, ArrayView<float> dSEnd, ArrayView<float> dS0, ArrayView<float> lnDecay,
        LightningParams p, Int4 flags)
    {
        long dd = (long)p.D * p.Dv;
        long total = p.B * p.H * dd;
        for (long e = Grid.GlobalIndex.X; e < total; e += Stride)
        {
            long bh = e / dd, x = e % dd;
            int h = (int)(bh % p.H);
            float ln = LnDecay(lnDecay, p, h);
            float g = flags.X != 0 ? dSEnd[e] : 0f;
            for (int t = p.T - 1; t >= 0; t--)
            {
                long at = (bh * p.T + t) * dd + x;
                float m = states[at];
                states[at] = g;
                g = MathF.Exp(BlockLength(p, t) * ln) * g + m;
            }
            if (p.Causal == 0) states[bh * p.T * dd + x] = g;
            if (flags.Y != 0) dS0[e] = g;
        }
    }

    /// <summary>
    /// O[b,i,h,c]: causal, Σ_{jl≤il} λ^(il−jl)(q_i·k_j) v_j[c] + λ^(il+1) Σ_d q_i[d] S_in,t[d,c];
    /// non-causal, Σ_d q_i[d] S[d,c].
    /// </summary>
    public static void Output(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<float> lnDecay,
        ArrayView<float> states, ArrayView<float> o, LightningParams p)
    {
        long total = (long)p.B * p.N * p.H * p.Dv;
        int group = p.H / p.Hk;
        for (long e = Grid.GlobalIndex.X; e < total; e += Stride)
        {
            int c = (int)(e % p.Dv);
            long r = e / p.Dv;
            int h = (int)(r % p.H); r /= p.H;
            int i = (int)(r % p.N);
            long b = r / p.N;
            int hk = h / group;
            int t = i / p.Bs, il = i - t * p.Bs;
            long qRow = (b * p.N + i) * p.H + h;
            float ln = LnDecay(lnDecay, p, h);
            float acc = 0f;
            if (p.Causal != 0)
            {
                for (int jl = 0; jl <= il; jl++)
                {
                    long kRow = (b * p.N + t * p.Bs + jl) * p.Hk + hk;
                    float dot = 0f;
                    for (int d = 0; d < p.D; d++) dot += q[qRow * p.D + d] * k[kRow * p.D + d];
                    acc += MathF.Exp((il - jl) * ln) * dot * v[kRow * p.Dv + c];
                }
            }
            long sBase = ((b * p.H + h) * p.T + t) * p.D * p.Dv + c;
            float inter = 0f;
            for (int d = 0; d < p.D; d++) inter += q[qRow * p.D + d] * states[sBase + (long)d * p.Dv];
            o[e] = acc + (p.Causal != 0 ? MathF.Exp((il + 1) * ln) : 1f) * inter;
        }
    }

    /// <summary>dQ[b,i,h,d]: the mirror of <see cref="Output"/> with dO in place of O and S read transposed.</summary>
    public static void GradQ(ArrayView<float> k, ArrayView<float> v, ArrayView<float> dO, ArrayView<float> lnDecay,
        ArrayView<float> states, ArrayView<float> dQ, LightningParams p)
    {
        long total = (long)p.B * p.N * p.H * p.D;
        int group = p.H / p.Hk;
        for (long e = Grid.GlobalIndex.X; e < total; e += Stride)
        {
            int d = (int)(e % p.D);
            long r = e / p.D;
            int h = (int)(r % p.H); r /= p.H;
            int i = (int)(r % p.N);
            long b = r / p.N;
            int hk = h / group;
            int t = i / p.Bs, il = i - t * p.Bs;
            long qRow = (b * p.N + i) * p.H + h;
            float ln = LnDecay(lnDecay, p, h);
            float acc = 0f;
            if (p.Causal != 0)
            {
                for (int jl = 0; jl <= il; jl++)
                {
                    long kRow = (b * p.N + t * p.Bs + jl) * p.Hk + hk;
                    float dot = 0f;
                    for (int c = 0; c < p.Dv; c++) dot += dO[qRow * p.Dv + c] * v[kRow * p.Dv + c];
                    acc += MathF.Exp((il - jl) * ln) * dot * k[kRow * p.D + d];
                }
            }
            long sBase = (((b * p.H + h) * p.T + t) * p.D + d) * p.Dv;
            float inter = 0f;
            for (int c = 0; c < p.Dv; c++) inter += dO[qRow * p.Dv + c] * states[sBase + c];
            dQ[e] = acc + (p.Causal != 0 ? MathF.Exp((il + 1) * ln) : 1f) * inter;
        }
    }

    /// <summary>
    /// dK[b,j,hk,d] = Σ over the heads of the GQA group of
    /// Σ_{il≥jl} λ^(il−jl)(dO_i·v_j) q_i[d] + λ^(n_t−1−jl) Σ_c G_t[d,c] v_j[c] (non-causal: the last term with λ = 1).
    /// </summary>
    public static void GradK(ArrayView<float> q, ArrayView<float> v, ArrayView<float> dO, ArrayView<float> lnDecay,
        ArrayView<float> grads, ArrayView<float> dK, LightningParams p)
    {
        long total = (long)p.B * p.N * p.Hk * p.D;
        int group = p.H / p.Hk;
        for (long e = Grid.GlobalIndex.X; e < total; e += Stride)
        {
            int d = (int)(e % p.D);
            long r = e / p.D;
            int hk = (int)(r % p.Hk); r /= p.Hk;
            int j = (int)(r % p.N);
            long b = r / p.N;
            int t = j / p.Bs, jl = j - t * p.Bs;
            int n = BlockLength(p, t);
            long kRow = (b * p.N + j) * p.Hk + hk;
            float sum = 0f;
            for (int g = 0; g < group; g++)
            {
                int h = hk * group + g;
                float ln = LnDecay(lnDecay, p, h);
                float acc = 0f;
                if (p.Causal != 0)
                {
                    for (int il = jl; il < n; il++)
                    {
                        long qRow = (b * p.N + t * p.Bs + il) * p.H + h;
                        float dot = 0f;
                        for (int c = 0; c < p.Dv; c++) dot += dO[qRow * p.Dv + c] * v[kRow * p.Dv + c];
                        acc += MathF.Exp((il - jl) * ln) * dot * q[qRow * p.D + d];
                    }
                }
                long sBase = (((b * p.H + h) * p.T + t) * p.D + d) * p.Dv;
                float inter = 0f;
                for (int c = 0; c < p.Dv; c++) inter += grads[sBase + c] * v[kRow * p.Dv + c];
                sum += acc + MathF.Exp((n - 1 - jl) * ln) * inter;
            }
            dK[e] = sum;
        }
    }

    /// <summary>
    /// dV[b,j,hk,c] = Σ over the heads of the GQA group of
    /// Σ_{il≥jl} λ^(il−jl)(q_i·k_j) dO_i[c] + λ^(n_t−1−jl) Σ_d k_j[d] G_t[d,c].
    /// </summary>
    public static void GradV(ArrayView<float> q, ArrayView<float> k, ArrayView<float> dO, ArrayView<float> lnDecay,
        ArrayView<float> grads, ArrayView<float> dV, LightningParams p)
    {
        long total = (long)p.B * p.N * p.Hk * p.Dv;
        int group = p.H / p.Hk;
        for (long e = Grid.GlobalIndex.X; e < total; e += Stride)
        {
            int c = (int)(e % p.Dv);
            long r = e / p.Dv;
            int hk = (int)(r % p.Hk); r /= p.Hk;
            int j = (int)(r % p.N);
            long b = r / p.N;
            int t = j / p.Bs, jl = j - t * p.Bs;
            int n = BlockLength(p, t);
            long kRow = (b * p.N + j) * p.Hk + hk;
            float sum = 0f;
            for (int g = 0; g < group; g++)
            {
                int h = hk * group + g;
                float ln = LnDecay(lnDecay, p, h);
                float acc = 0f;
                if (p.Causal != 0)
                {
                    for (int il = jl; il < n; il++)
                    {
                        long qRow = (b * p.N + t * p.Bs + il) * p.H + h;
                        float dot = 0f;
                        for (int d = 0; d < p.D; d++) dot += q[qRow * p.D + d] * k[kRow * p.D + d];
                        acc += MathF.Exp((il - jl) * ln) * dot * dO[qRow * p.Dv + c];
                    }
                }
                long sBase = ((b * p.H + h) * p.T + t) * p.D * p.Dv + c;
                float inter = 0f;
                for (int d = 0; d < p.D; d++) inter += k[kRow * p.D + d] * grads[sBase + (long)d * p.Dv];
                sum += acc + MathF.Exp((n - 1 - jl) * ln) * inter;
            }
            dV[e] = sum;
        }
    }
}
