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

    /// <summary>Row stride of the per-thread weight rows in shared memory (odd: one bank per thread).</summary>
    public const int WeightStride = BlockSize + 1;

    /// <summary>Rows per group of the row kernels: half a block, one warp.</summary>
    public const int GroupRows = 32;

    /// <summary>
    /// Locates this thread's row: row <paramref name="row"/> of head h in batch b, at index
    /// <paramref name="local"/> of block <paramref name="tb"/> that starts at <paramref name="row0"/>. Grid:
    /// heads·ceil(N/GroupRows) groups of GroupRows threads (heads = H for query rows, Hk for key rows).
    /// </summary>
    private static void RowOf(in LightningParams p, int heads, out long b, out int h, out int row, out int tb, out int row0, out int local)
    {
        int subBlocks = (p.N + GroupRows - 1) / GroupRows;
        int sb = Grid.IdxX % subBlocks;
        int bh = Grid.IdxX / subBlocks;
        h = bh % heads;
        b = bh / heads;
        row = sb * GroupRows + Group.IdxX;
        tb = row / BlockSize;
        row0 = tb * BlockSize;
        local = row - row0;
    }

    /// <summary>
    /// O[b,i,h,:], one thread per row (a group covers half of a 64-row block). Causal: the thread first forms its weights
    /// w_j = λ^(il−jl)(q_i·k_j) for jl ≤ il in shared memory (a per-thread array would live in local memory),
    /// then o_i[c] = Σ_j w_j v_j[c] + λ^(il+1) Σ_d q_i[d] S_in,t[d,c]. Non-causal: o_i = q_i S.
    /// </summary>
    public static void Output(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<float> lnDecay,
        ArrayView<float> states, ArrayView<float> o, LightningParams p)
    {
        var weights = SharedMemory.Allocate<float>(GroupRows * WeightStride);
        RowOf(p, p.H, out long b, out int h, out int i, out int tb, out int row0, out int il);
        if (i >= p.N) return;
        int hk = h / (p.H / p.Hk);
        bool causal = p.Causal != 0;
        float ln = LnDecay(lnDecay, p, h);
        long qRow = (b * p.N + i) * p.H + h;
        int wBase = Group.IdxX * WeightStride;
        if (causal)
        {
            for (int jl = 0; jl <= il; jl++)
            {
                long kRow = (b * p.N + row0 + jl) * p.Hk + hk;
                float dot = 0f;
                for (int d = 0; d < p.D; d++) dot += q[qRow * p.D + d] * k[kRow * p.D + d];
                weights[wBase + jl] = MathF.Exp((il - jl) * ln) * dot;
            }
        }
        long sBase = ((b * p.H + h) * p.T + (causal ? tb : 0)) * p.D * p.Dv;
        float interScale = causal ? MathF.Exp((il + 1) * ln) : 1f;
        for (int c = 0; c < p.Dv; c++)
        {
            float acc = 0f;
            if (causal)
                for (int jl = 0; jl <= il; jl++) acc += weights[wBase + jl] * v[((b * p.N + row0 + jl) * p.Hk + hk) * p.Dv + c];
            float inter = 0f;
            for (int d = 0; d < p.D; d++) inter += q[qRow * p.D + d] * states[sBase + (long)d * p.Dv + c];
            o[qRow * p.Dv + c] = acc + interScale * inter;
        }
    }

    /// <summary>
    /// dQ[b,i,h,:], grouped as <see cref="Output"/>: weights λ^(il−jl)(dO_i·v_j), then
    /// dq_i[d] = Σ_j w_j k_j[d] + λ^(il+1) Σ_c dO_i[c] S_in,t[d,c].
    /// </summary>
    public static void GradQ(ArrayView<float> k, ArrayView<float> v, ArrayView<float> dO, ArrayView<float> lnDecay,
        ArrayView<float> states, ArrayView<float> dQ, LightningParams p)
    {
        var weights = SharedMemory.Allocate<float>(GroupRows * WeightStride);
        RowOf(p, p.H, out long b, out int h, out int i, out int tb, out int row0, out int il);
        if (i >= p.N) return;
        int hk = h / (p.H / p.Hk);
        bool causal = p.Causal != 0;
        float ln = LnDecay(lnDecay, p, h);
        long qRow = (b * p.N + i) * p.H + h;
        int wBase = Group.IdxX * WeightStride;
        if (causal)
        {
            for (int jl = 0; jl <= il; jl++)
            {
                long kRow = (b * p.N + row0 + jl) * p.Hk + hk;
                float dot = 0f;
                for (int c = 0; c < p.Dv; c++) dot += dO[qRow * p.Dv + c] * v[kRow * p.Dv + c];
                weights[wBase + jl] = MathF.Exp((il - jl) * ln) * dot;
            }
        }
        long sBase = ((b * p.H + h) * p.T + (causal ? tb : 0)) * p.D * p.Dv;
        float interScale = causal ? MathF.Exp((il + 1) * ln) : 1f;
        for (int d = 0; d < p.D; d++)
        {
            float acc = 0f;
            if (causal)
                for (int jl = 0; jl <= il; jl++) acc += weights[wBase + jl] * k[((b * p.N + row0 + jl) * p.Hk + hk) * p.D + d];
            float inter = 0f;
            for (int c = 0; c < p.Dv; c++) inter += dO[qRow * p.Dv + c] * states[sBase + (long)d * p.Dv + c];
            dQ[qRow * p.D + d] = acc + interScale * inter;
        }
    }

    /// <summary>
    /// dK[b,j,hk,:], one thread per key row of a block, summed over the heads of the GQA group (the thread
    /// owns its output row, so it adds in place): weights λ^(il−jl)(dO_i·v_j) for il ≥ jl, then
    /// dk_j[d] += Σ_i w_i q_i[d] + λ^(n_t−1−jl) Σ_c G_t[d,c] v_j[c] (non-causal: the last term with λ = 1).
    /// </summary>
    public static void GradK(ArrayView<float> q, ArrayView<float> v, ArrayView<float> dO, ArrayView<float> lnDecay,
        ArrayView<float> grads, ArrayView<float> dK, LightningParams p)
    {
        var weights = SharedMemory.Allocate<float>(GroupRows * WeightStride);
        RowOf(p, p.Hk, out long b, out int hk, out int j, out int tb, out int row0, out int jl);
        if (j >= p.N) return;
        int group = p.H / p.Hk;
        bool causal = p.Causal != 0;
        int n = Math.Min(BlockSize, p.N - row0);
        long kRow = (b * p.N + j) * p.Hk + hk;
        int wBase = Group.IdxX * WeightStride;
        for (int g = 0; g < group; g++)
        {
            int h = hk * group + g;
            float ln = LnDecay(lnDecay, p, h);
            if (causal)
            {
                for (int il = jl; il < n; il++)
                {
                    long qRow = (b * p.N + row0 + il) * p.H + h;
                    float dot = 0f;
                    for (int c = 0; c < p.Dv; c++) dot += dO[qRow * p.Dv + c] * v[kRow * p.Dv + c];
                    weights[wBase + il] = MathF.Exp((il - jl) * ln) * dot;
                }
            }
            long sBase = ((b * p.H + h) * p.T + (causal ? tb : 0)) * p.D * p.Dv;
            float interScale = causal ? MathF.Exp((n - 1 - jl) * ln) : 1f;
            for (int d = 0; d < p.D; d++)
            {
                float acc = 0f;
                if (causal)
                    for (int il = jl; il < n; il++) acc += weights[wBase + il] * q[((b * p.N + row0 + il) * p.H + h) * p.D + d];
                float inter = 0f;
                for (int c = 0; c < p.Dv; c++) inter += grads[sBase + (long)d * p.Dv + c] * v[kRow * p.Dv + c];
                float total = acc + interScale * inter;
                dK[kRow * p.D + d] = g == 0 ? total : dK[kRow * p.D + d] + total;
            }
        }
    }

    /// <summary>
    /// dV[b,j,hk,:], grouped as <see cref="GradK"/>: weights λ^(il−jl)(q_i·k_j) for il ≥ jl, then
    /// dv_j[c] += Σ_i w_i dO_i[c] + λ^(n_t−1−jl) Σ_d k_j[d] G_t[d,c].
    /// </summary>
    public static void GradV(ArrayView<float> q, ArrayView<float> k, ArrayView<float> dO, ArrayView<float> lnDecay,
        ArrayView<float> grads, ArrayView<float> dV, LightningParams p)
    {
        var weights = SharedMemory.Allocate<float>(GroupRows * WeightStride);
        RowOf(p, p.Hk, out long b, out int hk, out int j, out int tb, out int row0, out int jl);
        if (j >= p.N) return;
        int group = p.H / p.Hk;
        bool causal = p.Causal != 0;
        int n = Math.Min(BlockSize, p.N - row0);
        long kRow = (b * p.N + j) * p.Hk + hk;
        int wBase = Group.IdxX * WeightStride;
        for (int g = 0; g < group; g++)
        {
            int h = hk * group + g;
            float ln = LnDecay(lnDecay, p, h);
            if (causal)
            {
                for (int il = jl; il < n; il++)
                {
                    long qRow = (b * p.N + row0 + il) * p.H + h;
                    float dot = 0f;
                    for (int d = 0; d < p.D; d++) dot += q[qRow * p.D + d] * k[kRow * p.D + d];
                    weights[wBase + il] = MathF.Exp((il - jl) * ln) * dot;
                }
            }
            long sBase = ((b * p.H + h) * p.T + (causal ? tb : 0)) * p.D * p.Dv;
            float interScale = causal ? MathF.Exp((n - 1 - jl) * ln) : 1f;
            for (int c = 0; c < p.Dv; c++)
            {
                float acc = 0f;
                if (causal)
                    for (int il = jl; il < n; il++) acc += weights[wBase + il] * dO[((b * p.N + row0 + il) * p.H + h) * p.Dv + c];
                float inter = 0f;
                for (int d = 0; d < p.D; d++) inter += k[kRow * p.D + d] * grads[sBase + (long)d * p.Dv + c];
                float total = acc + interScale * inter;
                dV[kRow * p.Dv + c] = g == 0 ? total : dV[kRow * p.Dv + c] + total;
            }
        }
    }
}
