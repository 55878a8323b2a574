using ILGPU;

namespace Distributed.Kernels.Ilgpu;

/// <summary>
/// Row-wise and copy kernels, explicitly grouped with a grid-stride loop so one launch shape serves
/// any element count.
/// </summary>
internal static class ElementwiseKernels
{
    /// <summary>Threads per group of these kernels.</summary>
    public const int GroupSize = 256;

    /// <summary>Drow[b,h,i] = Σ_c dO[b,i,h,c]·O[b,i,h,c]; one thread per (b,h,i). dims = (B, N, H, Dv).</summary>
    public static void RowDot(ArrayView<float> o, ArrayView<float> dO, ArrayView<float> drow, Int4 dims)
    {
        int b0 = dims.X, n = dims.Y, heads = dims.Z, dv = dims.W;
        long total = (long)b0 * heads * n;
        for (long e = Grid.GlobalIndex.X; e < total; e += (long)Grid.DimX * Group.DimX)
        {
            int i = (int)(e % n);
            long bh = e / n;
            int h = (int)(bh % heads);
            long b = bh / heads;
            long rowBase = ((b * n + i) * heads + h) * dv;
            float s = 0f;
            for (int c = 0; c < dv; c++) s += dO[rowBase + c] * o[rowBase + c];
            drow[e] = s;
        }
    }

    /// <summary>
    /// Merges state b into a: the stable sigmoid form of the two-way softmax merge, one thread per row.
    /// dims = (B, N, H, Dv); O [B,N,H,Dv], LSE [B,H,N].
    /// </summary>
    public static void Merge(ArrayView<float> oA, ArrayView<float> lseA, ArrayView<float> oB, ArrayView<float> lseB, Int4 dims)
    {
        int b0 = dims.X, n = dims.Y, heads = dims.Z, dv = dims.W;
        long total = (long)b0 * heads * n;
        for (long e = Grid.GlobalIndex.X; e < total; e += (long)Grid.DimX * Group.DimX)
        {
            int i = (int)(e % n);
            long bh = e / n;
            int h = (int)(bh % heads);
            long b = bh / heads;
            long rowBase = ((b * n + i) * heads + h) * dv;
            float la = lseA[e], lb = lseB[e];
            // -inf carries weight 0; checking first keeps (-inf) - (-inf) = NaN out of the arithmetic.
            if (lb == float.NegativeInfinity) continue;
            if (la == float.NegativeInfinity)
            {
                lseA[e] = lb;
                for (int c = 0; c < dv; c++) oA[rowBase + c] = oB[rowBase + c];
                continue;
            }
            float diff = lb - la;
            float w = 1f / (1f + MathF.Exp(-diff));
            lseA[e] = Math.Max(la, lb) + MathF.Log(1f + MathF.Exp(-Math.Abs(diff)));
            for (int c = 0; c < dv; c++)
            {
                float a = oA[rowBase + c];
                oA[rowBase + c] = a - w * (a - oB[rowBase + c]);
            }
        }
    }

    /// <summary>
    /// Copies a slab along one axis of tensors viewed as [outer, axis, inner].
    /// dims = (outer, count, inner, unused); axes = (srcAxis, srcStart, dstAxis, dstStart).
    /// </summary>
    public static void CopySlice(ArrayView<float> src, ArrayView<float> dst, Int4 dims, Int4 axes)
    {
        long count = dims.Y, inner = dims.Z;
        long total = dims.X * count * inner;
        for (long e = Grid.GlobalIndex.X; e < total; e += (long)Grid.DimX * Group.DimX)
        {
            long x = e % inner;
            long r = e / inner;
            long c = r % count;
            long outer = r / count;
            dst[(outer * axes.Z + axes.W + c) * inner + x] = src[(outer * axes.X + axes.Y + c) * inner + x];
        }
    }
}

/// <summary>Four ints passed by value to a kernel.</summary>
internal readonly record struct Int4(int X, int Y, int Z, int W);
