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
/// FlashAttention as explicitly grouped ILGPU kernels. One thread owns one query row (forward, dQ) or one
/// key row (dK/dV); the tiles of the other side are staged in shared memory between two barriers, and the
/// per-row accumulators live in shared memory because a per-thread array would land in local memory.
/// </summary>
internal static class FlashKernels
{
    /// <summary>Query rows per group (one warp).</summary>
    public const int TileQ = 32;

    /// <summary>Key rows staged per step in the forward and dQ kernels.</summary>
    public const int TileK = 16;

    /// <summary>Key rows per group in the dK/dV kernel.</summary>
    public const int TileKb = 32;

    /// <summary>Query rows staged per step in the dK/dV kernel.</summary>
    public const int TileQb = 8;

    /// <summary>Largest head dim; the shared tiles are sized for it (48 KB static shared memory at most).</summary>
    public const int MaxHeadDim = 128;

    /// <summary>
    /// Row stride of the per-thread accumulator rows. Odd, so the 32 threads of a warp, each at column c
    /// of its own row, hit 32 different banks instead of one.
    /// </summary>
    public const int AccStride = MaxHeadDim + 1;

    /// <summary>Row stride of the per-thread score rows (odd for the same reason).</summary>
    public const int ScoreStride = TileK + 1;

    /// <summary>Key rows staged per step in the forward kernel, which also keeps the query tile in shared memory.</summary>
    public const int ForwardTileK = 8;

    /// <summary>Row stride of the forward kernel's score rows.</summary>
    public const int ForwardScoreStride = ForwardTileK + 1;

    /// <summary>Number of keys [0, end) a query tile can see, the same for every thread of the group.</summary>
    private static int KeyEnd(in FlashParams p, int lastRow)
    {
        if (p.Causal == 0) return p.Nk;
        long end = p.QueryOffset + lastRow - p.KeyOffset + 1;
        return end <= 0 ? 0 : (int)Math.Min(end, p.Nk);
    }

    private static bool Sees(in FlashParams p, int i, int j) =>
        p.Causal == 0 || p.KeyOffset + j <= p.QueryOffset + i;

    /// <summary>Grid: B·H·ceil(Nq/TileQ) groups of TileQ threads. O [B,Nq,H,Dv], LSE [B,H,Nq].</summary>
    public static void Forward(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> o, ArrayView<float> lse, FlashParams p)
    {
        var kTile = SharedMemory.Allocate<float>(ForwardTileK * MaxHeadDim);
        var vTile = SharedMemory.Allocate<float>(ForwardTileK * MaxHeadDim);
        var qRows = SharedMemory.Allocate<float>(TileQ * AccStride);
        var acc = SharedMemory.Allocate<float>(TileQ * AccStride);
        var scores = SharedMemory.Allocate<float>(TileQ * ForwardScoreStride);

        int t = Group.IdxX;
        int qTiles = (p.Nq + TileQ - 1) / TileQ;
        int qt = Grid.IdxX % qTiles;
        int bh = Grid.IdxX / qTiles;
        int h = bh % p.H, b = bh / p.H;
        int hk = h / (p.H / p.Hk);
        int i = qt * TileQ + t;
        bool row = i < p.Nq;
        long qBase = (((long)b * p.Nq + i) * p.H + h) * p.D;
        int accBase = t * AccStride;

        for (int c = 0; c < p.Dv; c++) acc[accBase + c] = 0f;
        // The query row is read once per key; shared memory serves it without a global load each time.
        for (int d = 0; d < p.D; d++) qRows[accBase + d] = row ? q[qBase + d] : 0f;
        float m = float.NegativeInfinity, l = 0f;
        int jEnd = KeyEnd(p, Math.Min(qt * TileQ + TileQ, p.Nq) - 1);

        for (int j0 = 0; j0 < jEnd; j0 += ForwardTileK)
        {
            Group.Barrier();
            LoadRows(k, kTile, b, j0, p.Nk, p.Hk, hk, p.D, ForwardTileK, t, TileQ);
            LoadRows(v, vTile, b, j0, p.Nk, p.Hk, hk, p.Dv, ForwardTileK, t, TileQ);
            Group.Barrier();
            if (!row) continue;

            float tileMax = float.NegativeInfinity;
            for (int jj = 0; jj < ForwardTileK; jj++)
            {
                int j = j0 + jj;
                float s = float.NegativeInfinity;
                if (j < p.Nk && Sees(p, i, j))
                {
                    float dot = 0f;
                    for (int d = 0; d < p.D; d++) dot += qRows[accBase + d] * kTile[jj * MaxHeadDim + d];
                    s = dot * p.Scale;
                }
                scores[t * ForwardScoreStride + jj] = s;
                tileMax = Math.Max(tileMax, s);
            }
            if (tileMax == float.NegativeInfinity) continue;

            float mNew = Math.Max(m, tileMax);
            float corr = MathF.Exp(m - mNew);
            l *= corr;
            for (int c = 0; c < p.Dv; c++) acc[accBase + c] *= corr;
            for (int jj = 0; jj < ForwardTileK; jj++)
            {
                float pr = MathF.Exp(scores[t * ForwardScoreStride + jj] - mNew);
                if (pr == 0f) continue;
                l += pr;
                for (int c = 0; c < p.Dv; c++) acc[accBase + c] += pr * vTile[jj * MaxHeadDim + c];
            }
            m = mNew;
        }

        if (!row) return;
        long oBase = (((long)b * p.Nq + i) * p.H + h) * p.Dv;
        float inv = l > 0f ? 1f / l : 0f;
        for (int c = 0; c < p.Dv; c++) o[oBase + c] = acc[accBase + c] * inv;
        lse[((long)b * p.H + h) * p.Nq + i] = l > 0f ? m + MathF.Log(l) : float.NegativeInfinity;
    }

    /// <summary>dQ. Grid as <see cref="Forward"/>. Uses the global LSE and Drow [B,H,Nq].</summary>
    public static void BackwardDq(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<float> lse,
        ArrayView<float> drow, ArrayView<float> dO, ArrayView<float> dQ, FlashParams p)
    {
        var kTile = SharedMemory.Allocate<float>(TileK * MaxHeadDim);
        var vTile = SharedMemory.Allocate<float>(TileK * MaxHeadDim);
        var acc = SharedMemory.Allocate<float>(TileQ * AccStride);

        int t = Group.IdxX;
        int qTiles = (p.Nq + TileQ - 1) / TileQ;
        int qt = Grid.IdxX % qTiles;
        int bh = Grid.IdxX / qTiles;
        int h = bh % p.H, b = bh / p.H;
        int hk = h / (p.H / p.Hk);
        int i = qt * TileQ + t;
        bool row = i < p.Nq;
        long qBase = (((long)b * p.Nq + i) * p.H + h) * p.D;
        long oBase = (((long)b * p.Nq + i) * p.H + h) * p.Dv;
        int accBase = t * AccStride;
        float rowLse = float.NegativeInfinity, rowD = 0f;
        if (row)
        {
            rowLse = lse[((long)b * p.H + h) * p.Nq + i];
            rowD = drow[((long)b * p.H + h) * p.Nq + i];
        }
        // A row with no visible key anywhere has zero probabilities, hence zero gradient.
        bool live = row && rowLse != float.NegativeInfinity;

        for (int d = 0; d < p.D; d++) acc[accBase + d] = 0f;
        int jEnd = KeyEnd(p, Math.Min(qt * TileQ + TileQ, p.Nq) - 1);

        for (int j0 = 0; j0 < jEnd; j0 += TileK)
        {
            Group.Barrier();
            LoadRows(k, kTile, b, j0, p.Nk, p.Hk, hk, p.D, TileK, t, TileQ);
            LoadRows(v, vTile, b, j0, p.Nk, p.Hk, hk, p.Dv, TileK, t, TileQ);
            Group.Barrier();
            if (!live) continue;
            for (int jj = 0; jj < TileK; jj++)
            {
                int j = j0 + jj;
                if (j >= p.Nk || !Sees(p, i, j)) continue;
                float dot = 0f;
                for (int d = 0; d < p.D; d++) dot += q[qBase + d] * kTile[jj * MaxHeadDim + d];
                float pr = MathF.Exp(dot * p.Scale - rowLse);
                float dp = 0f;
                for (int c = 0; c < p.Dv; c++) dp += dO[oBase + c] * vTile[jj * MaxHeadDim + c];
                float ds = pr * (dp - rowD) * p.Scale;
                for (int d = 0; d < p.D; d++) acc[accBase + d] += ds * kTile[jj * MaxHeadDim + d];
            }
        }

        if (!row) return;
        for (int d = 0; d < p.D; d++)
        {
            float g = acc[accBase + d];
            dQ[qBase + d] = p.Accumulate != 0 ? dQ[qBase + d] + g : g;
        }
    }

    /// <summary>
    /// dK and dV. Grid: B·Hk·ceil(Nk/TileKb) groups of TileKb threads; each thread owns one key row and
    /// sums over every query head of its GQA group, so no atomics are needed.
    /// </summary>
    public static void BackwardDkDv(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<float> lse,
        ArrayView<float> drow, ArrayView<float> dO, ArrayView<float> dK, ArrayView<float> dV, FlashParams p)
    {
        var qTile = SharedMemory.Allocate<float>(TileQb * MaxHeadDim);
        var doTile = SharedMemory.Allocate<float>(TileQb * MaxHeadDim);
        var accK = SharedMemory.Allocate<float>(TileKb * AccStride);
        var accV = SharedMemory.Allocate<float>(TileKb * AccStride);
        var rowTile = SharedMemory.Allocate<float>(2 * TileQb);

        int t = Group.IdxX;
        int kTiles = (p.Nk + TileKb - 1) / TileKb;
        int kt = Grid.IdxX % kTiles;
        int bhk = Grid.IdxX / kTiles;
        int hk = bhk % p.Hk, b = bhk / p.Hk;
        int groupSize = p.H / p.Hk;
        int j = kt * TileKb + t;
        bool key = j < p.Nk;
        long kBase = (((long)b * p.Nk + j) * p.Hk + hk) * p.D;
        long vBase = (((long)b * p.Nk + j) * p.Hk + hk) * p.Dv;
        int accBase = t * AccStride;
        for (int d = 0; d < p.D; d++) accK[accBase + d] = 0f;
        for (int c = 0; c < p.Dv; c++) accV[accBase + c] = 0f;

        // Causal: queries before the tile's first key see none of its keys.
        int iStart = 0;
        if (p.Causal != 0)
        {
            long first = p.KeyOffset + kt * TileKb - p.QueryOffset;
            iStart = first <= 0 ? 0 : (int)Math.Min(first, p.Nq);
        }

        for (int g = 0; g < groupSize; g++)
        {
            int h = hk * groupSize + g;
            for (int i0 = iStart; i0 < p.Nq; i0 += TileQb)
            {
                Group.Barrier();
                LoadRows(q, qTile, b, i0, p.Nq, p.H, h, p.D, TileQb, t, TileKb);
                LoadRows(dO, doTile, b, i0, p.Nq, p.H, h, p.Dv, TileQb, t, TileKb);
                if (t < TileQb)
                {
                    int i = i0 + t;
                    long r = ((long)b * p.H + h) * p.Nq + i;
                    rowTile[t] = i < p.Nq ? lse[r] : float.NegativeInfinity;
                    rowTile[TileQb + t] = i < p.Nq ? drow[r] : 0f;
                }
                Group.Barrier();
                if (!key) continue;
                for (int ii = 0; ii < TileQb; ii++)
                {
                    int i = i0 + ii;
                    float rowLse = rowTile[ii];
                    if (i >= p.Nq || rowLse == float.NegativeInfinity || !Sees(p, i, j)) continue;
                    float dot = 0f;
                    for (int d = 0; d < p.D; d++) dot += qTile[ii * MaxHeadDim + d] * k[kBase + d];
                    float pr = MathF.Exp(dot * p.Scale - rowLse);
                    float dp = 0f;
                    for (int c = 0; c < p.Dv; c++)
                    {
                        float go = doTile[ii * MaxHeadDim + c];
                        accV[accBase + c] += pr * go;
                        dp += go * v[vBase + c];
                    }
                    float ds = pr * (dp - rowTile[TileQb + ii]) * p.Scale;
                    for (int d = 0; d < p.D; d++) accK[accBase + d] += ds * qTile[ii * MaxHeadDim + d];
                }
            }
        }

        if (!key) return;
        for (int d = 0; d < p.D; d++)
        {
            float g = accK[accBase + d];
            dK[kBase + d] = p.Accumulate != 0 ? dK[kBase + d] + g : g;
        }
        for (int c = 0; c < p.Dv; c++)
        {
            float g = accV[accBase + c];
            dV[vBase + c] = p.Accumulate != 0 ? dV[vBase + c] + g : g;
        }
    }

    /// <summary>
    /// Stages rows [row0, row0 + rows) of head <paramref name="head"/> of a [B, n, heads, width] tensor into
    /// a shared tile with row stride MaxHeadDim, zero-filling rows past the end.
    /// </summary>
    private static void LoadRows(ArrayView<float> src, ArrayView<float> tile, int b, int row0, int n, int heads, int head,
        int width, int rows, int t, int threads)
    {
        int total = rows * width;
        for (int e = t; e < total; e += threads)
        {
            int r = e / width, c = e - r * width;
            int row = row0 + r;
            tile[r * MaxHeadDim + c] = row < n ? src[(((long)b * n + row) * heads + head) * width + c] : 0f;
        }
    }
}
