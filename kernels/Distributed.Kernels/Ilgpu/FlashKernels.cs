using ILGPU;

namespace Distributed.Kernels.Ilgpu;

/// <summary>Scalars of the softmax kernels, passed by value so each kernel keeps a short signature.</summary>
internal struct FlashParams
{
    public int B, Nq, Nk, H, Hk, D, Dv;
    public long QueryOffset, KeyOffset;
    public int Causal, Accumulate;
    public float Scale;
}

/// <summary>
/// FlashAttention-2 as explicitly grouped ILGPU kernels, fp32 on the CUDA cores (no tensor cores).
/// <para>
/// Work split. A group of 4 warps (128 threads) owns a tile of <see cref="Rows"/> = 64 rows: query rows in
/// the forward and dQ kernels, key rows in the dK/dV kernel. It walks the other side in tiles of
/// <see cref="Cols"/> = 32 rows staged in shared memory at full width (K and V, or Q and dO). Warp w owns
/// rows w·16 .. w·16+15; lane 8·rg + cg of it owns rows w·16 + rg + 4r (r = 0..3), score columns cg + 8k
/// of the 32-row tile (k = 0..3), and accumulator columns cg + 8c (c = 0..15, up to D = 128). So each
/// thread holds a 4 x 4 fragment of S = QKᵀ (and of dP) and 4 x 16 fragments of its accumulators in
/// registers (<see cref="Frag4x4"/>, <see cref="AccRows"/>): an accumulator never lives in shared or
/// local memory. Row max and row sum reduce over the 8 lanes of a row with warp shuffles. The group's own
/// side streams through a 64 x 32 column chunk for the score products; once those are done the chunk
/// carries P (or dS) from the lanes that computed it to the 8 lanes of its row, behind warp barriers
/// only. Per staged key a thread then does 64 multiply-adds for 20 shared loads (the old kernels: one
/// multiply-add per two shared loads).
/// </para>
/// <para>
/// Tile shapes, from the ptxas report (dsattn ptx) on sm_80 and sm_90. Shared memory is static and sized
/// for D = 128, and must stay within 48 KB: two 32 x 128 tiles of the other side (32 KB) and the 64 x 32
/// chunk (8 KB) make 40 KB, so sm_80 (164 KB per SM) fits 4 groups and sm_90 (228 KB) 5. A 64-row tile
/// of the other side would need 64 KB at D = 128, past the static limit, so the key tile is 32 at every
/// head dim (dynamic shared memory stays off: unchecked on a GPU). The own side (Q, or K and V) is
/// re-read from L2 once per tile instead of staying resident; that is about 32 flops per byte, well
/// above what an H100's L2 needs to feed the fp32 rate. The accumulators make registers the limit
/// (see dsattn ptx: forward and dQ below 255 with one accumulator, dK/dV near 255 with two, 0 spill bytes);
/// that gives 2 or 3 groups per SM. Tiles are XOR-swizzled (<see cref="RegisterTile.Swizzle"/>) so a
/// warp's shared reads are free of bank conflicts without padding. Head dims of at most 64 skip the upper
/// half of the accumulator (one uniform branch).
/// </para>
/// <para>
/// ILGPU's CPU accelerator runs these kernels with 128-thread groups and 32-lane warps (see
/// <see cref="IlgpuBackend.CreateCpu"/>); every barrier there wakes OS threads, which is why P goes
/// through shared memory rather than 128 shuffles per tile.
/// </para>
/// </summary>
internal static class FlashKernels
{
    /// <summary>Threads per group: 4 warps of 32.</summary>
    public const int GroupSize = 128;

    /// <summary>Rows a group owns: query rows (forward, dQ) or key rows (dK/dV).</summary>
    public const int Rows = 64;

    /// <summary>Rows of the other side staged per step: key rows (forward, dQ) or query rows (dK/dV).</summary>
    public const int Cols = 32;

    /// <summary>Columns of the streamed own-side chunk in the backward kernels.</summary>
    public const int Chunk = 32;

    /// <summary>Largest head dim; the shared tiles are sized for it (48 KB static shared memory at most).</summary>
    public const int MaxHeadDim = 128;

    /// <summary>Number of keys [0, end) a query tile can see, the same for every thread of the group.</summary>
    private static int KeyEnd(in FlashParams p, int lastRow)
    {
        if (p.Causal == 0) return p.Nk;
        long end = p.QueryOffset + lastRow - p.KeyOffset + 1;
        return end <= 0 ? 0 : (int)Math.Min(end, p.Nk);
    }

    /// <summary>Grid: B·H·ceil(Nq/Rows) groups of <see cref="GroupSize"/> threads. O [B,Nq,H,Dv], LSE [B,H,Nq].</summary>
    public static void Forward(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> o, ArrayView<float> lse, FlashParams p)
    {
        var chunk = SharedMemory.Allocate<float>(Rows * Chunk);
        var kTile = SharedMemory.Allocate<float>(Cols * MaxHeadDim);
        var vTile = SharedMemory.Allocate<float>(Cols * MaxHeadDim);

        int t = Group.IdxX, lane = t & 31;
        int rg = lane >> 3, cg = lane & 7;
        int row0 = (t >> 5) * 16 + rg;
        int qTiles = (p.Nq + Rows - 1) / Rows;
        int qt = Grid.IdxX % qTiles, bh = Grid.IdxX / qTiles;
        int h = bh % p.H, b = bh / p.H;
        int hk = h / (p.H / p.Hk);
        int q0 = qt * Rows;
        bool wide = p.Dv > 64;

        AccRows acc = default;
        Quad m = Fill(float.NegativeInfinity), l = default;
        int jEnd = KeyEnd(p, Math.Min(q0 + Rows, p.Nq) - 1);

        for (int j0 = 0; j0 < jEnd; j0 += Cols)
        {
            Group.Barrier();
            LoadTile(k, p.D, 0, p.D, kTile, MaxHeadDim, b, j0, p.Nk, p.Hk, hk, Cols, t);
            LoadTile(v, p.Dv, 0, p.Dv, vTile, MaxHeadDim, b, j0, p.Nk, p.Hk, hk, Cols, t);
            Frag4x4 s = default;
            ChunkedProduct(ref s, q, p.D, chunk, kTile, b, q0, p.Nq, p.H, h, row0, cg, t);
            FlashFragments.ForwardScores(ref s, p, q0 + row0, j0 + cg);

            // Online softmax: rescale what was summed under the old maximum.
            var tileMax = RegisterTile.RowMax(s);
            Quad mNew, corr;
            mNew.X0 = Math.Max(m.X0, tileMax.X0);
            mNew.X1 = Math.Max(m.X1, tileMax.X1);
            mNew.X2 = Math.Max(m.X2, tileMax.X2);
            mNew.X3 = Math.Max(m.X3, tileMax.X3);
            corr.X0 = Correction(m.X0, mNew.X0);
            corr.X1 = Correction(m.X1, mNew.X1);
            corr.X2 = Correction(m.X2, mNew.X2);
            corr.X3 = Correction(m.X3, mNew.X3);
            FlashFragments.Exponentiate(ref s, mNew);
            var sum = RegisterTile.RowSum(s);
            l.X0 = l.X0 * corr.X0 + sum.X0;
            l.X1 = l.X1 * corr.X1 + sum.X1;
            l.X2 = l.X2 * corr.X2 + sum.X2;
            l.X3 = l.X3 * corr.X3 + sum.X3;
            m = mNew;
            RegisterTile.ScaleRows(ref acc, corr, wide);
            ShareWithinWarp(chunk, s, row0, cg);
            RegisterTile.AccumulateProduct(ref acc, chunk, row0, vTile, cg, wide);
        }

        int i = q0 + row0;
        StoreForwardRow(o, lse, p, b, h, i, acc.R0Lo, acc.R0Hi, m.X0, l.X0, cg);
        StoreForwardRow(o, lse, p, b, h, i + 4, acc.R1Lo, acc.R1Hi, m.X1, l.X1, cg);
        StoreForwardRow(o, lse, p, b, h, i + 8, acc.R2Lo, acc.R2Hi, m.X2, l.X2, cg);
        StoreForwardRow(o, lse, p, b, h, i + 12, acc.R3Lo, acc.R3Hi, m.X3, l.X3, cg);
    }

    /// <summary>dQ. Grid as <see cref="Forward"/>. Uses the global LSE and Drow [B,H,Nq].</summary>
    public static void BackwardDq(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<float> lse,
        ArrayView<float> drow, ArrayView<float> dO, ArrayView<float> dQ, FlashParams p)
    {
        var chunk = SharedMemory.Allocate<float>(Rows * Chunk);
        var kTile = SharedMemory.Allocate<float>(Cols * MaxHeadDim);
        var vTile = SharedMemory.Allocate<float>(Cols * MaxHeadDim);

        int t = Group.IdxX, lane = t & 31;
        int rg = lane >> 3, cg = lane & 7;
        int row0 = (t >> 5) * 16 + rg;
        int qTiles = (p.Nq + Rows - 1) / Rows;
        int qt = Grid.IdxX % qTiles, bh = Grid.IdxX / qTiles;
        int h = bh % p.H, b = bh / p.H;
        int hk = h / (p.H / p.Hk);
        int q0 = qt * Rows;
        int i = q0 + row0;
        bool wide = p.D > 64;

        // A row with no visible key anywhere has LSE −∞: zero probabilities, hence zero gradient.
        Quad rowLse, rowD;
        rowLse.X0 = RowStat(lse, p, b, h, i, float.NegativeInfinity);
        rowLse.X1 = RowStat(lse, p, b, h, i + 4, float.NegativeInfinity);
        rowLse.X2 = RowStat(lse, p, b, h, i + 8, float.NegativeInfinity);
        rowLse.X3 = RowStat(lse, p, b, h, i + 12, float.NegativeInfinity);
        rowD.X0 = RowStat(drow, p, b, h, i, 0f);
        rowD.X1 = RowStat(drow, p, b, h, i + 4, 0f);
        rowD.X2 = RowStat(drow, p, b, h, i + 8, 0f);
        rowD.X3 = RowStat(drow, p, b, h, i + 12, 0f);

        AccRows acc = default;
        int jEnd = KeyEnd(p, Math.Min(q0 + Rows, p.Nq) - 1);
        for (int j0 = 0; j0 < jEnd; j0 += Cols)
        {
            Group.Barrier();
            LoadTile(k, p.D, 0, p.D, kTile, MaxHeadDim, b, j0, p.Nk, p.Hk, hk, Cols, t);
            LoadTile(v, p.Dv, 0, p.Dv, vTile, MaxHeadDim, b, j0, p.Nk, p.Hk, hk, Cols, t);
            Frag4x4 s = default, dp = default;
            ChunkedProduct(ref s, q, p.D, chunk, kTile, b, q0, p.Nq, p.H, h, row0, cg, t);
            ChunkedProduct(ref dp, dO, p.Dv, chunk, vTile, b, q0, p.Nq, p.H, h, row0, cg, t);
            FlashFragments.QueryRowGradients(ref s, ref dp, p, i, j0 + cg, rowLse, rowD);
            ShareWithinWarp(chunk, dp, row0, cg);
            RegisterTile.AccumulateProduct(ref acc, chunk, row0, kTile, cg, wide);
        }

        bool add = p.Accumulate != 0;
        StoreRow(dQ, p.Nq, p.H, p.D, b, h, i, acc.R0Lo, acc.R0Hi, cg, add);
        StoreRow(dQ, p.Nq, p.H, p.D, b, h, i + 4, acc.R1Lo, acc.R1Hi, cg, add);
        StoreRow(dQ, p.Nq, p.H, p.D, b, h, i + 8, acc.R2Lo, acc.R2Hi, cg, add);
        StoreRow(dQ, p.Nq, p.H, p.D, b, h, i + 12, acc.R3Lo, acc.R3Hi, cg, add);
    }

    /// <summary>
    /// dK and dV. Grid: B·Hk·ceil(Nk/Rows) groups of <see cref="GroupSize"/> threads; a group owns 64 key
    /// rows and sums over every query head of its GQA group, so no atomics are needed.
    /// </summary>
    public static void BackwardDkDv(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<float> lse,
        ArrayView<float> drow, ArrayView<float> dO, ArrayView<float> dK, ArrayView<float> dV, FlashParams p)
    {
        var chunk = SharedMemory.Allocate<float>(Rows * Chunk);
        var qTile = SharedMemory.Allocate<float>(Cols * MaxHeadDim);
        var doTile = SharedMemory.Allocate<float>(Cols * MaxHeadDim);
        var stats = SharedMemory.Allocate<float>(2 * Cols);

        int t = Group.IdxX, lane = t & 31;
        int rg = lane >> 3, cg = lane & 7;
        int row0 = (t >> 5) * 16 + rg;
        int kTiles = (p.Nk + Rows - 1) / Rows;
        int kt = Grid.IdxX % kTiles, bhk = Grid.IdxX / kTiles;
        int hk = bhk % p.Hk, b = bhk / p.Hk;
        int groupSize = p.H / p.Hk;
        int k0 = kt * Rows;
        int j = k0 + row0;

        // Causal: queries before the tile's first key see none of its keys.
        int iStart = 0;
        if (p.Causal != 0)
        {
            long first = p.KeyOffset + k0 - p.QueryOffset;
            iStart = first <= 0 ? 0 : (int)Math.Min(first, p.Nq);
        }

        AccRows accK = default, accV = default;
        for (int g = 0; g < groupSize; g++)
        {
            int h = hk * groupSize + g;
            for (int i0 = iStart; i0 < p.Nq; i0 += Cols)
            {
                Group.Barrier();
                LoadTile(q, p.D, 0, p.D, qTile, MaxHeadDim, b, i0, p.Nq, p.H, h, Cols, t);
                LoadTile(dO, p.Dv, 0, p.Dv, doTile, MaxHeadDim, b, i0, p.Nq, p.H, h, Cols, t);
                if (t < Cols)
                {
                    int i = i0 + t;
                    long r = ((long)b * p.H + h) * p.Nq + i;
                    stats[t] = i < p.Nq ? lse[r] : float.NegativeInfinity;
                    stats[Cols + t] = i < p.Nq ? drow[r] : 0f;
                }
                // Transposed scores: rows are this group's keys, columns the staged queries.
                Frag4x4 s = default, dp = default;
                ChunkedProduct(ref s, k, p.D, chunk, qTile, b, k0, p.Nk, p.Hk, hk, row0, cg, t);
                ChunkedProduct(ref dp, v, p.Dv, chunk, doTile, b, k0, p.Nk, p.Hk, hk, row0, cg, t);
                Quad colLse, colD;
                colLse.X0 = stats[cg];
                colLse.X1 = stats[cg + 8];
                colLse.X2 = stats[cg + 16];
                colLse.X3 = stats[cg + 24];
                colD.X0 = stats[Cols + cg];
                colD.X1 = stats[Cols + cg + 8];
                colD.X2 = stats[Cols + cg + 16];
                colD.X3 = stats[Cols + cg + 24];
                FlashFragments.KeyRowGradients(ref s, ref dp, p, j, i0 + cg, colLse, colD);
                ShareWithinWarp(chunk, s, row0, cg);
                RegisterTile.AccumulateProduct(ref accV, chunk, row0, doTile, cg, p.Dv > 64);
                ShareWithinWarp(chunk, dp, row0, cg);
                RegisterTile.AccumulateProduct(ref accK, chunk, row0, qTile, cg, p.D > 64);
            }
        }

        bool add = p.Accumulate != 0;
        StoreRow(dK, p.Nk, p.Hk, p.D, b, hk, j, accK.R0Lo, accK.R0Hi, cg, add);
        StoreRow(dK, p.Nk, p.Hk, p.D, b, hk, j + 4, accK.R1Lo, accK.R1Hi, cg, add);
        StoreRow(dK, p.Nk, p.Hk, p.D, b, hk, j + 8, accK.R2Lo, accK.R2Hi, cg, add);
        StoreRow(dK, p.Nk, p.Hk, p.D, b, hk, j + 12, accK.R3Lo, accK.R3Hi, cg, add);
        StoreRow(dV, p.Nk, p.Hk, p.Dv, b, hk, j, accV.R0Lo, accV.R0Hi, cg, add);
        StoreRow(dV, p.Nk, p.Hk, p.Dv, b, hk, j + 4, accV.R1Lo, accV.R1Hi, cg, add);
        StoreRow(dV, p.Nk, p.Hk, p.Dv, b, hk, j + 8, accV.R2Lo, accV.R2Hi, cg, add);
        StoreRow(dV, p.Nk, p.Hk, p.Dv, b, hk, j + 12, accV.R3Lo, accV.R3Hi, cg, add);
    }

    /// <summary>
    /// s += A·Bᵀ where A is the group's 64 rows [row0g, row0g + 64) of head <paramref name="head"/> of
    /// <paramref name="src"/> [B, n, heads, width], streamed through <paramref name="chunk"/> 32 columns at
    /// a time, and B is a 32-row tile already in shared memory (row length 128). Begins with a barrier, so
    /// the caller's loads into the B tile are visible once the first chunk is.
    /// </summary>
    internal static void ChunkedProduct(ref Frag4x4 s, ArrayView<float> src, int width, ArrayView<float> chunk, ArrayView<float> other,
        int b, int row0g, int n, int heads, int head, int row0, int cg, int t)
    {
        for (int c0 = 0; c0 < width; c0 += Chunk)
        {
            int cw = Math.Min(Chunk, width - c0);
            Group.Barrier();
            LoadTile(src, width, c0, cw, chunk, Chunk, b, row0g, n, heads, head, Rows, t);
            Group.Barrier();
            RegisterTile.Product(ref s, chunk, Chunk, row0, other, MaxHeadDim, c0, cg, cw);
        }
    }

    /// <summary>
    /// Stages columns [col0, col0 + width) of rows [row0, row0 + rows) of head <paramref name="head"/> of a
    /// [B, n, heads, srcWidth] tensor into a swizzled shared tile of row length <paramref name="rowLength"/>,
    /// zero-filling rows past the end (their probabilities are 0, and 0 · garbage could be NaN).
    /// </summary>
    internal static void LoadTile(ArrayView<float> src, int srcWidth, int col0, int width, ArrayView<float> tile, int rowLength,
        int b, int row0, int n, int heads, int head, int rows, int t)
    {
        int total = rows * width;
        for (int e = t; e < total; e += GroupSize)
        {
            int r = e / width, c = e - r * width;
            int row = row0 + r;
            tile[RegisterTile.Swizzle(r, c, rowLength)] =
                row < n ? src[(((long)b * n + row) * heads + head) * srcWidth + col0 + c] : 0f;
        }
    }

    /// <summary>
    /// Puts a fragment of P (or dS) into the chunk tile for <see cref="RegisterTile.AccumulateProduct"/>. The
    /// chunk is free once the score products are done, and a warp reads back only its own 16 rows, so warp
    /// barriers suffice: one before (the warp's lanes may still read the chunk or the previous fragment),
    /// one after. The next chunk load begins with a group barrier.
    /// </summary>
    internal static void ShareWithinWarp(ArrayView<float> chunk, in Frag4x4 s, int row0, int cg)
    {
        Warp.Barrier();
        RegisterTile.StoreFragment(chunk, s, row0, cg);
        Warp.Barrier();
    }

    private static Quad Fill(float x)
    {
        Quad f;
        f.X0 = x;
        f.X1 = x;
        f.X2 = x;
        f.X3 = x;
        return f;
    }

    /// <summary>exp(m − mNew); 1 while the row has seen no key (both −∞), where the accumulator is still 0.</summary>
    private static float Correction(float m, float mNew) => mNew == float.NegativeInfinity ? 1f : MathF.Exp(m - mNew);

    private static float RowStat(ArrayView<float> stat, in FlashParams p, int b, int h, int i, float outside) =>
        i < p.Nq ? stat[((long)b * p.H + h) * p.Nq + i] : outside;

    private static void StoreForwardRow(ArrayView<float> o, ArrayView<float> lse, in FlashParams p, int b, int h, int i,
        in Cols8 lo, in Cols8 hi, float m, float l, int cg)
    {
        if (i >= p.Nq) return;
        float inv = l > 0f ? 1f / l : 0f;
        RegisterTile.StoreRow(o, (((long)b * p.Nq + i) * p.H + h) * p.Dv, lo, hi, cg, p.Dv, inv, false);
        if (cg == 0) lse[((long)b * p.H + h) * p.Nq + i] = l > 0f ? m + MathF.Log(l) : float.NegativeInfinity;
    }

    private static void StoreRow(ArrayView<float> dst, int n, int heads, int width, int b, int head, int row,
        in Cols8 lo, in Cols8 hi, int cg, bool accumulate)
    {
        if (row >= n) return;
        RegisterTile.StoreRow(dst, (((long)b * n + row) * heads + head) * width, lo, hi, cg, width, 1f, accumulate);
    }
}
