using ILGPU;

namespace Distributed.Kernels.Ilgpu;

/// <summary>Scalars of the lightning kernels.</summary>
internal struct LightningParams
{
    public int B, N, H, Hk, D, Dv;
    /// <summary>Block length: <see cref="LightningKernels.BlockSize"/> on the causal path, N for a non-causal
    /// call, a whole-chunk state or an inter-chunk term.</summary>
    public int Bs;
    /// <summary>Number of blocks, ceil(N / Bs).</summary>
    public int T;
    public int Causal;
    /// <summary>1: add the intra-block term (causal chunk); 0: the state term only (non-causal, inter-chunk).</summary>
    public int Intra;
    /// <summary>1: add to the output (inter-chunk terms); 0: overwrite it.</summary>
    public int Accumulate;
}

/// <summary>
/// Lightning (linear) attention as FlashAttention-2-style tiled kernels, fp32 on the CUDA cores: per-block
/// states, a sequential scan over the few blocks per (b, h, d, c), then the intra-block term plus the
/// inter-block term read from the scanned states. Decay enters only as λ^e = exp(e·ln λ) with
/// 0 ≤ e ≤ Bs + 1 inside a block, and across blocks by repeated multiplication; nothing is ever divided by
/// a power of λ, so strong decay underflows harmlessly to 0. The scratch <c>states</c> is [B, H, T, D, Dv].
/// <para>
/// Work split, as in <see cref="FlashKernels"/>: a group of 4 warps (128 threads) owns a 64-row tile (query
/// rows in <see cref="Output"/> and <see cref="GradQ"/>, key rows in <see cref="GradKV"/>, state rows d in
/// <see cref="BlockState"/> and <see cref="BlockGrad"/>), and lane 8·rg + cg of warp w holds rows
/// w·16 + rg + 4r and accumulator columns cg + 8c (<see cref="AccRows"/>, up to 128 columns) in registers.
/// The causal block length is the tile height (64), so a row tile is exactly one block.
/// </para>
/// <list type="bullet">
/// <item>Intra-block term: the 32-row tiles of the block's other side (K and V, or Q and dO) go through
/// shared memory; Q Kᵀ (or dO Vᵀ, K Qᵀ, V dOᵀ) is a 4 x 4 register fragment per thread
/// (<see cref="FlashKernels.ChunkedProduct"/>), the causal mask and λ^(i−j) are applied to it in registers
/// (<see cref="LightningFragments"/>), and the fragment times the V (K, dO, Q) tile accumulates in registers.</item>
/// <item>Inter-block term: q S_in, dO S_inᵀ, K G and V Gᵀ are GEMMs over 32-wide slices: the own rows' slice,
/// scaled per row by λ^(i+1) or λ^(n−1−j) as it is staged, and 32 rows of the state (or of its transpose)
/// go through shared memory, and the product accumulates into the same registers.</item>
/// <item>Block states K_tᵀ diag(λ^(n−1−j)) V_t and the backward chain's Q_tᵀ diag(λ^(i+1)) dO_t: a group owns
/// 64 rows d of the D x Dv state; the weighted, transposed 64 x 32 slice of K (Q) and the 32 x Dv tile of
/// V (dO) go through shared memory, the accumulator stays in registers.</item>
/// </list>
/// <para>
/// Tile shapes, from the ptxas report (dsattn ptx, PTX ISA 7.8, CUDA 11.8 ptxas) on sm_80 and sm_90.
/// Shared memory is static, sized for D = Dv = 128, and must stay within 48 KB: the row kernels stage the
/// 64 x 32 own-side slice (8 KB) and two 32 x 128 tiles (32 KB), 40 KB; a 64-row tile of the other side
/// would need 64 KB at D = 128, past the static limit, so the other side goes 32 rows at a time (dynamic
/// shared memory stays off: unchecked on a GPU). The state kernels stage a 64 x 32 slice and one 32 x 128
/// tile, 24 KB. Registers set the occupancy, with 0 spill bytes and 0 stack everywhere:
/// </para>
/// <code>
///   kernel           regs sm_80/sm_90   shared   groups of 128 per SM (sm_80 / sm_90)
///   BlockState           167 / 157      24 KB    3 / 3
///   BlockGrad            159 / 139      24 KB    3 / 3
///   Output (forward)     160 / 158      40 KB    3 / 3
///   GradQ                160 / 168      40 KB    3 / 3
///   GradKV               249 / 225      40 KB    2 / 2
/// </code>
/// <para>
/// One 4 x 16 accumulator per thread (64 registers) keeps the forward, dQ and state kernels near 160
/// registers, 3 groups (12 warps) per SM. GradKV holds two (dK and dV) so that one pass over the block's
/// Q and dO tiles and one stream of K and V serve both gradients, as the flash dK/dV kernel does; that
/// costs a group per SM (2 instead of 3) where two kernels would each stage the Q and dO tiles again.
/// A row tile of 64 is also the causal block length: the block's intra term is two 32-key steps, and
/// λ^e inside a block keeps e ≤ 64. The XOR swizzle (<see cref="RegisterTile.Swizzle"/>) keeps a warp's
/// shared reads free of bank conflicts; the transposed stores of the state kernels' K (Q) slice and of
/// a state's transpose are 4-way conflicted, once per tile. Head dims above 128 are refused by the
/// backend (the accumulator holds 128 columns). The scans stay element-wise: each (b, h, d, c) is an
/// independent T-step recurrence, coalesced over c. Untimed on a GPU: these are the choices the ptxas
/// report supports, not measured ones.
/// </para>
/// </summary>
internal static class LightningKernels
{
    /// <summary>Threads per group of the tiled kernels: 4 warps of 32.</summary>
    public const int GroupSize = FlashKernels.GroupSize;

    /// <summary>Rows a group owns; also the block length of the causal path, so a row tile is one block.</summary>
    public const int Rows = FlashKernels.Rows;

    /// <summary>Block length of the causal path.</summary>
    public const int BlockSize = Rows;

    /// <summary>Rows of the other side (or of a state) staged per step, and width of a staged slice.</summary>
    public const int Tile = FlashKernels.Cols;

    /// <summary>Largest head dim D or Dv: the accumulators and shared tiles are sized for it.</summary>
    public const int MaxHeadDim = FlashKernels.MaxHeadDim;

    private static long Stride => (long)Grid.DimX * Group.DimX;

    private static float LnDecay(ArrayView<float> lnDecay, in LightningParams p, int h) => p.Causal != 0 ? lnDecay[h] : 0f;

    private static int BlockLength(in LightningParams p, int t) => Math.Min(p.Bs, p.N - t * p.Bs);

    /// <summary>
    /// states[b,h,t,d,c] = Σ_{j in block t} λ^(n_t−1−jl) k[j,d] v[j,c]. Grid: B·H·T·ceil(D/64) groups of
    /// <see cref="GroupSize"/> threads.
    /// </summary>
    public static void BlockState(ArrayView<float> k, ArrayView<float> v, ArrayView<float> lnDecay, ArrayView<float> states, LightningParams p) =>
        StateProduct(k, p.Hk, v, lnDecay, states, p, true);

    /// <summary>
    /// dM_t[b,h,t,d,c] = Σ_{i in block t} λ^(il+1) q[i,d] dO[i,c]: the gradient reaching the state that
    /// enters block t from the block's own outputs. Grid as <see cref="BlockState"/>.
    /// </summary>
    public static void BlockGrad(ArrayView<float> q, ArrayView<float> dO, ArrayView<float> lnDecay, ArrayView<float> states, LightningParams p) =>
        StateProduct(q, p.H, dO, lnDecay, states, p, false);

    /// <summary>
    /// states[b,h,t, d, :] = Σ_{l in block t} w_l a[l, d] · src[l, :] for the group's 64 rows d, with
    /// w_l = λ^(n_t−1−l) for keys, λ^(l+1) for queries (l block-local). a is [B, N, aHeads, D], src [B, N, heads, Dv].
    /// </summary>
    private static void StateProduct(ArrayView<float> a, int aHeads, ArrayView<float> src, ArrayView<float> lnDecay,
        ArrayView<float> states, in LightningParams p, bool keys)
    {
        var aTile = SharedMemory.Allocate<float>(Rows * Tile);
        var srcTile = SharedMemory.Allocate<float>(Tile * MaxHeadDim);

        int t = Group.IdxX, lane = t & 31;
        int rg = lane >> 3, cg = lane & 7;
        int row0 = (t >> 5) * 16 + rg;
        int dTiles = (p.D + Rows - 1) / Rows;
        int dt = Grid.IdxX % dTiles, rest = Grid.IdxX / dTiles;
        int tb = rest % p.T;
        int bh = rest / p.T;
        int h = bh % p.H, b = bh / p.H;
        int head = keys ? h / (p.H / p.Hk) : h;
        int srcHeads = keys ? p.Hk : p.H;
        int d0 = dt * Rows;
        int blockStart = tb * p.Bs;
        int n = Math.Min(p.Bs, p.N - blockStart);
        float ln = LnDecay(lnDecay, p, h);
        bool wide = p.Dv > 64;

        AccRows acc = default;
        for (int j0 = 0; j0 < n; j0 += Tile)
        {
            Group.Barrier();
            // aTile[d, l] = w_l a[l, d0 + d]: consecutive threads take consecutive d (coalesced reads).
            for (int e = t; e < Rows * Tile; e += GroupSize)
            {
                int d = e % Rows, l = e / Rows;
                int jl = j0 + l, dd = d0 + d;
                float x = 0f;
                if (jl < n && dd < p.D)
                {
                    float w = MathF.Exp((keys ? n - 1 - jl : jl + 1) * ln);
                    x = w * a[(((long)b * p.N + blockStart + jl) * aHeads + head) * p.D + dd];
                }
                aTile[RegisterTile.Swizzle(d, l, Tile)] = x;
            }
            // Rows past the block belong to the next block but have weight 0 above; rows past N load as 0.
            FlashKernels.LoadTile(src, p.Dv, 0, p.Dv, srcTile, MaxHeadDim, b, blockStart + j0, p.N, srcHeads, head, Tile, t);
            Group.Barrier();
            RegisterTile.AccumulateProduct(ref acc, aTile, row0, srcTile, cg, wide);
        }

        long sBase = (((long)b * p.H + h) * p.T + tb) * p.D * p.Dv;
        StoreStateRow(states, sBase, p, d0 + row0, acc.R0Lo, acc.R0Hi, cg);
        StoreStateRow(states, sBase, p, d0 + row0 + 4, acc.R1Lo, acc.R1Hi, cg);
        StoreStateRow(states, sBase, p, d0 + row0 + 8, acc.R2Lo, acc.R2Hi, cg);
        StoreStateRow(states, sBase, p, d0 + row0 + 12, acc.R3Lo, acc.R3Hi, cg);
    }

    private static void StoreStateRow(ArrayView<float> states, long sBase, in LightningParams p, int d, in Cols8 lo, in Cols8 hi, int cg)
    {
        if (d >= p.D) return;
        RegisterTile.StoreRow(states, sBase + (long)d * p.Dv, lo, hi, cg, p.Dv, 1f, false);
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
    /// O[b,i,h,:] = Σ_{j ≤ i in block} λ^(il−jl)(q_i·k_j) v_j + λ^(il+1) q_i S_in,t (Intra = 0: the last term
    /// only, with S the total state, and λ = 1 unless causal; Accumulate = 1 adds to O). Grid: B·H·ceil(N/64)
    /// groups of <see cref="GroupSize"/> threads.
    /// </summary>
    public static void Output(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<float> lnDecay,
        ArrayView<float> states, ArrayView<float> o, LightningParams p)
    {
        var chunk = SharedMemory.Allocate<float>(Rows * Tile);
        var scoreTile = SharedMemory.Allocate<float>(Tile * MaxHeadDim);
        var sideTile = SharedMemory.Allocate<float>(Tile * MaxHeadDim);
        QueryRows(q, p.D, k, v, p.Dv, lnDecay, states, o, p, false, chunk, scoreTile, sideTile);
    }

    /// <summary>
    /// dQ[b,i,h,:] = Σ_{j ≤ i in block} λ^(il−jl)(dO_i·v_j) k_j + λ^(il+1) dO_i S_in,tᵀ, flags and grid as
    /// <see cref="Output"/>.
    /// </summary>
    public static void GradQ(ArrayView<float> k, ArrayView<float> v, ArrayView<float> dO, ArrayView<float> lnDecay,
        ArrayView<float> states, ArrayView<float> dQ, LightningParams p)
    {
        var chunk = SharedMemory.Allocate<float>(Rows * Tile);
        var scoreTile = SharedMemory.Allocate<float>(Tile * MaxHeadDim);
        var sideTile = SharedMemory.Allocate<float>(Tile * MaxHeadDim);
        QueryRows(dO, p.Dv, v, k, p.D, lnDecay, states, dQ, p, true, chunk, scoreTile, sideTile);
    }

    /// <summary>
    /// One 64-row query tile: dst = mask∘λ(own · scoreᵀ) · side + diag(λ^(il+1)) own · S (S transposed when
    /// <paramref name="transposed"/>). own is [B, N, H, ownWidth]; score [B, N, Hk, ownWidth]; side and dst
    /// have width <paramref name="outWidth"/> (side with Hk heads, dst with H).
    /// </summary>
    private static void QueryRows(ArrayView<float> own, int ownWidth, ArrayView<float> score, ArrayView<float> side, int outWidth,
        ArrayView<float> lnDecay, ArrayView<float> states, ArrayView<float> dst, in LightningParams p, bool transposed,
        ArrayView<float> chunk, ArrayView<float> scoreTile, ArrayView<float> sideTile)
    {
        int t = Group.IdxX, lane = t & 31;
        int rg = lane >> 3, cg = lane & 7;
        int row0 = (t >> 5) * 16 + rg;
        int tiles = (p.N + Rows - 1) / Rows;
        int qt = Grid.IdxX % tiles, bh = Grid.IdxX / tiles;
        int h = bh % p.H, b = bh / p.H;
        int hk = h / (p.H / p.Hk);
        int q0 = qt * Rows;
        int tb = q0 / p.Bs, blockStart = tb * p.Bs;
        int blockEnd = Math.Min(blockStart + p.Bs, p.N);
        float ln = LnDecay(lnDecay, p, h);
        bool wide = outWidth > 64;

        AccRows acc = default;
        if (p.Intra != 0)
        {
            int jEnd = Math.Min(q0 + Rows, blockEnd);
            for (int j0 = blockStart; j0 < jEnd; j0 += Tile)
            {
                Group.Barrier();
                FlashKernels.LoadTile(score, ownWidth, 0, ownWidth, scoreTile, MaxHeadDim, b, j0, p.N, p.Hk, hk, Tile, t);
                FlashKernels.LoadTile(side, outWidth, 0, outWidth, sideTile, MaxHeadDim, b, j0, p.N, p.Hk, hk, Tile, t);
                Frag4x4 s = default;
                FlashKernels.ChunkedProduct(ref s, own, ownWidth, chunk, scoreTile, b, q0, p.N, p.H, h, row0, cg, t);
                LightningFragments.QueryRows(ref s, ln, q0 - blockStart + row0, j0 - blockStart + cg);
                FlashKernels.ShareWithinWarp(chunk, s, row0, cg);
                RegisterTile.AccumulateProduct(ref acc, chunk, row0, sideTile, cg, wide);
            }
        }

        long sBase = (((long)b * p.H + h) * p.T + tb) * p.D * p.Dv;
        for (int c0 = 0; c0 < ownWidth; c0 += Tile)
        {
            Group.Barrier();
            LoadScaledSlice(own, ownWidth, c0, chunk, b, q0, p.N, p.H, h, t, ln, q0 - blockStart + 1, 1);
            if (transposed) LoadStateColumns(states, sBase, c0, p.D, p.Dv, scoreTile, t);
            else LoadStateRows(states, sBase, c0, p.D, p.Dv, scoreTile, t);
            Group.Barrier();
            RegisterTile.AccumulateProduct(ref acc, chunk, row0, scoreTile, cg, wide);
        }

        bool add = p.Accumulate != 0;
        StoreRow(dst, p.N, p.H, outWidth, b, h, q0 + row0, acc.R0Lo, acc.R0Hi, cg, add);
        StoreRow(dst, p.N, p.H, outWidth, b, h, q0 + row0 + 4, acc.R1Lo, acc.R1Hi, cg, add);
        StoreRow(dst, p.N, p.H, outWidth, b, h, q0 + row0 + 8, acc.R2Lo, acc.R2Hi, cg, add);
        StoreRow(dst, p.N, p.H, outWidth, b, h, q0 + row0 + 12, acc.R3Lo, acc.R3Hi, cg, add);
    }

    /// <summary>
    /// dK and dV of a 64-row key tile, summed over the query heads of its GQA group (the group owns its
    /// output rows, so no atomics): dk_j = Σ_h [Σ_{i ≥ j in block} λ^(il−jl)(dO_i·v_j) q_i + λ^(n_t−1−jl) G_t v_j],
    /// dv_j = Σ_h [Σ_{i ≥ j} λ^(il−jl)(q_i·k_j) dO_i + λ^(n_t−1−jl) k_j G_t] with G_t [D, Dv] the gradient of
    /// the state leaving block t (Intra = 0: the G terms only). Grid: B·Hk·ceil(N/64) groups of
    /// <see cref="GroupSize"/> threads.
    /// </summary>
    public static void GradKV(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<float> dO, ArrayView<float> lnDecay,
        ArrayView<float> grads, ArrayView<float> dK, ArrayView<float> dV, LightningParams p)
    {
        var chunk = SharedMemory.Allocate<float>(Rows * Tile);
        var qTile = SharedMemory.Allocate<float>(Tile * MaxHeadDim);
        var doTile = SharedMemory.Allocate<float>(Tile * MaxHeadDim);

        int t = Group.IdxX, lane = t & 31;
        int rg = lane >> 3, cg = lane & 7;
        int row0 = (t >> 5) * 16 + rg;
        int tiles = (p.N + Rows - 1) / Rows;
        int kt = Grid.IdxX % tiles, bhk = Grid.IdxX / tiles;
        int hk = bhk % p.Hk, b = bhk / p.Hk;
        int group = p.H / p.Hk;
        int k0 = kt * Rows;
        int tb = k0 / p.Bs, blockStart = tb * p.Bs;
        int blockEnd = Math.Min(blockStart + p.Bs, p.N);
        int keyExponent = blockEnd - blockStart - 1 - (k0 - blockStart);
        bool wideK = p.D > 64, wideV = p.Dv > 64;

        AccRows accK = default, accV = default;
        for (int g = 0; g < group; g++)
        {
            int h = hk * group + g;
            float ln = LnDecay(lnDecay, p, h);
            if (p.Intra != 0)
            {
                // Queries before the tile's first key see none of its keys.
                for (int i0 = k0; i0 < blockEnd; i0 += Tile)
                {
                    Group.Barrier();
                    FlashKernels.LoadTile(q, p.D, 0, p.D, qTile, MaxHeadDim, b, i0, p.N, p.H, h, Tile, t);
                    FlashKernels.LoadTile(dO, p.Dv, 0, p.Dv, doTile, MaxHeadDim, b, i0, p.N, p.H, h, Tile, t);
                    // Transposed scores: rows are this group's keys, columns the staged queries.
                    Frag4x4 s = default;
                    FlashKernels.ChunkedProduct(ref s, k, p.D, chunk, qTile, b, k0, p.N, p.Hk, hk, row0, cg, t);
                    LightningFragments.KeyRows(ref s, ln, k0 - blockStart + row0, i0 - blockStart + cg);
                    FlashKernels.ShareWithinWarp(chunk, s, row0, cg);
                    RegisterTile.AccumulateProduct(ref accV, chunk, row0, doTile, cg, wideV);
                    Frag4x4 dp = default;
                    FlashKernels.ChunkedProduct(ref dp, v, p.Dv, chunk, doTile, b, k0, p.N, p.Hk, hk, row0, cg, t);
                    LightningFragments.KeyRows(ref dp, ln, k0 - blockStart + row0, i0 - blockStart + cg);
                    FlashKernels.ShareWithinWarp(chunk, dp, row0, cg);
                    RegisterTile.AccumulateProduct(ref accK, chunk, row0, qTile, cg, wideK);
                }
            }

            long sBase = (((long)b * p.H + h) * p.T + tb) * p.D * p.Dv;
            // dV += diag(λ^(n−1−jl)) K G.
            for (int d0 = 0; d0 < p.D; d0 += Tile)
            {
                Group.Barrier();
                LoadScaledSlice(k, p.D, d0, chunk, b, k0, p.N, p.Hk, hk, t, ln, keyExponent, -1);
                LoadStateRows(grads, sBase, d0, p.D, p.Dv, doTile, t);
                Group.Barrier();
                RegisterTile.AccumulateProduct(ref accV, chunk, row0, doTile, cg, wideV);
            }
            // dK += diag(λ^(n−1−jl)) V Gᵀ.
            for (int c0 = 0; c0 < p.Dv; c0 += Tile)
            {
                Group.Barrier();
                LoadScaledSlice(v, p.Dv, c0, chunk, b, k0, p.N, p.Hk, hk, t, ln, keyExponent, -1);
                LoadStateColumns(grads, sBase, c0, p.D, p.Dv, qTile, t);
                Group.Barrier();
                RegisterTile.AccumulateProduct(ref accK, chunk, row0, qTile, cg, wideK);
            }
        }

        bool add = p.Accumulate != 0;
        int j = k0 + row0;
        StoreRow(dK, p.N, p.Hk, p.D, b, hk, j, accK.R0Lo, accK.R0Hi, cg, add);
        StoreRow(dK, p.N, p.Hk, p.D, b, hk, j + 4, accK.R1Lo, accK.R1Hi, cg, add);
        StoreRow(dK, p.N, p.Hk, p.D, b, hk, j + 8, accK.R2Lo, accK.R2Hi, cg, add);
        StoreRow(dK, p.N, p.Hk, p.D, b, hk, j + 12, accK.R3Lo, accK.R3Hi, cg, add);
        StoreRow(dV, p.N, p.Hk, p.Dv, b, hk, j, accV.R0Lo, accV.R0Hi, cg, add);
        StoreRow(dV, p.N, p.Hk, p.Dv, b, hk, j + 4, accV.R1Lo, accV.R1Hi, cg, add);
        StoreRow(dV, p.N, p.Hk, p.Dv, b, hk, j + 8, accV.R2Lo, accV.R2Hi, cg, add);
        StoreRow(dV, p.N, p.Hk, p.Dv, b, hk, j + 12, accV.R3Lo, accV.R3Hi, cg, add);
    }

    /// <summary>
    /// Stages columns [col0, col0 + 32) of the 64 rows [row0, row0 + 64) of head <paramref name="head"/> of
    /// src [B, n, heads, width] into <paramref name="chunk"/> (swizzled, row length 32), row r scaled by
    /// λ^(expBase + expSign·r); columns past the width and rows past n are 0.
    /// </summary>
    private static void LoadScaledSlice(ArrayView<float> src, int width, int col0, ArrayView<float> chunk,
        int b, int row0, int n, int heads, int head, int t, float ln, int expBase, int expSign)
    {
        for (int e = t; e < Rows * Tile; e += GroupSize)
        {
            int r = e / Tile, c = e - r * Tile;
            int row = row0 + r, col = col0 + c;
            float x = 0f;
            if (row < n && col < width)
                x = MathF.Exp((expBase + expSign * r) * ln) * src[(((long)b * n + row) * heads + head) * width + col];
            chunk[RegisterTile.Swizzle(r, c, Tile)] = x;
        }
    }

    /// <summary>tile[r, c] = S[row0 + r, c] of the [rows, cols] state at sBase (swizzled, row length 128); rows past the end are 0.</summary>
    private static void LoadStateRows(ArrayView<float> states, long sBase, int row0, int rows, int cols, ArrayView<float> tile, int t)
    {
        for (int e = t; e < Tile * cols; e += GroupSize)
        {
            int r = e / cols, c = e - r * cols;
            int row = row0 + r;
            tile[RegisterTile.Swizzle(r, c, MaxHeadDim)] = row < rows ? states[sBase + (long)row * cols + c] : 0f;
        }
    }

    /// <summary>tile[r, d] = S[d, col0 + r] of the [rows, cols] state at sBase: 32 rows of Sᵀ; rows past the end are 0.</summary>
    private static void LoadStateColumns(ArrayView<float> states, long sBase, int col0, int rows, int cols, ArrayView<float> tile, int t)
    {
        // Consecutive threads read consecutive columns of S (coalesced).
        for (int e = t; e < Tile * rows; e += GroupSize)
        {
            int r = e % Tile, d = e / Tile;
            int col = col0 + r;
            tile[RegisterTile.Swizzle(r, d, MaxHeadDim)] = col < cols ? states[sBase + (long)d * cols + col] : 0f;
        }
    }

    private static void StoreRow(ArrayView<float> dst, int n, int heads, int width, int b, int head, int row,
        in Cols8 lo, in Cols8 hi, int cg, bool accumulate)
    {
        if (row >= n) return;
        RegisterTile.StoreRow(dst, (((long)b * n + row) * heads + head) * width, lo, hi, cg, width, 1f, accumulate);
    }
}
