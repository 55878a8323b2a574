using System.Runtime.CompilerServices;
using ILGPU;

namespace Distributed.Kernels.Ilgpu;

// Register fragments of the FlashAttention-2 kernels (FlashKernels.cs). ILGPU keeps a per-thread array
// (LocalMemory) in local memory and does not unroll constant loops, so a fragment that must stay in
// registers is a struct of named fields and every operation on it is written out with constant indices.
// Checked by ptxas: 0 bytes of stack frame and spills for every flash kernel (dsattn ptx).

/// <summary>
/// A thread's 4 x 4 block of a 64 x 32 score tile: rows <c>w·16 + rg + 4r</c> of the group's own tile
/// (warp w, lane = 8·rg + cg) and columns <c>cg + 8k</c> of the 32-row tile in shared memory.
/// </summary>
internal struct Frag4x4
{
    public float S00, S01, S02, S03, S10, S11, S12, S13, S20, S21, S22, S23, S30, S31, S32, S33;
}

/// <summary>Four per-row (or per-column) scalars of a thread: index r or k of <see cref="Frag4x4"/>.</summary>
internal struct Quad
{
    public float X0, X1, X2, X3;
}

/// <summary>Eight accumulator columns of one row: <c>colBase + cg + 8c</c>, c = 0..7.</summary>
internal struct Cols8
{
    public float C0, C1, C2, C3, C4, C5, C6, C7;
}

/// <summary>
/// A thread's slice of a 64 x 128 output accumulator (O, dQ, dK or dV): its 4 rows, columns
/// <c>cg + 8c</c> (Lo: c = 0..7, Hi: 64 + ...). Hi is skipped when the width is at most 64.
/// </summary>
internal struct AccRows
{
    public Cols8 R0Lo, R0Hi, R1Lo, R1Hi, R2Lo, R2Hi, R3Lo, R3Hi;
}

/// <summary>Operations on the register fragments, each written out so every index is a constant.</summary>
internal static class RegisterTile
{
    /// <summary>Index of (row, col) in a shared tile of row length <paramref name="rowLength"/> (32 or 128).
    /// Bits 2..4 of the column are XOR-ed with the low 3 bits of the row, so the 8 rows (or 8 column
    /// groups) a warp reads at once fall in distinct banks without padding the 48 KB budget.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static int Swizzle(int row, int col, int rowLength) => row * rowLength + (col ^ ((row & 7) << 2));

    /// <summary>s[r, k] += a[r] · b[k] for the 16 entries.</summary>
    public static void Outer(ref Frag4x4 s, float a0, float a1, float a2, float a3, float b0, float b1, float b2, float b3)
    {
        s.S00 += a0 * b0; s.S01 += a0 * b1; s.S02 += a0 * b2; s.S03 += a0 * b3;
        s.S10 += a1 * b0; s.S11 += a1 * b1; s.S12 += a1 * b2; s.S13 += a1 * b3;
        s.S20 += a2 * b0; s.S21 += a2 * b1; s.S22 += a2 * b2; s.S23 += a2 * b3;
        s.S30 += a3 * b0; s.S31 += a3 * b1; s.S32 += a3 * b2; s.S33 += a3 * b3;
    }

    /// <summary>
    /// s[r, k] += Σ_c a[row_r, c] · b[col_k, c] over columns [0, width) of two swizzled shared tiles:
    /// a has the group's 64 rows (row length aLen), b the 32-row tile (row length bLen), b's columns
    /// starting at bCol.
    /// </summary>
    public static void Product(ref Frag4x4 s, ArrayView<float> a, int aLen, int row0, ArrayView<float> b, int bLen, int bCol, int cg, int width)
    {
        int r1 = row0 + 4, r2 = row0 + 8, r3 = row0 + 12;
        int k1 = cg + 8, k2 = cg + 16, k3 = cg + 24;
        for (int c = 0; c < width; c++)
        {
            int bc = bCol + c;
            Outer(ref s,
                a[Swizzle(row0, c, aLen)], a[Swizzle(r1, c, aLen)], a[Swizzle(r2, c, aLen)], a[Swizzle(r3, c, aLen)],
                b[Swizzle(cg, bc, bLen)], b[Swizzle(k1, bc, bLen)], b[Swizzle(k2, bc, bLen)], b[Swizzle(k3, bc, bLen)]);
        }
    }

    /// <summary>The largest entry of each row, over the 32 columns (4 per thread, 8 threads per row).</summary>
    public static Quad RowMax(in Frag4x4 s)
    {
        Quad m;
        m.X0 = Math.Max(Math.Max(s.S00, s.S01), Math.Max(s.S02, s.S03));
        m.X1 = Math.Max(Math.Max(s.S10, s.S11), Math.Max(s.S12, s.S13));
        m.X2 = Math.Max(Math.Max(s.S20, s.S21), Math.Max(s.S22, s.S23));
        m.X3 = Math.Max(Math.Max(s.S30, s.S31), Math.Max(s.S32, s.S33));
        for (int mask = 1; mask < 8; mask <<= 1)
        {
            m.X0 = Math.Max(m.X0, Warp.ShuffleXor(m.X0, mask));
            m.X1 = Math.Max(m.X1, Warp.ShuffleXor(m.X1, mask));
            m.X2 = Math.Max(m.X2, Warp.ShuffleXor(m.X2, mask));
            m.X3 = Math.Max(m.X3, Warp.ShuffleXor(m.X3, mask));
        }
        return m;
    }

    /// <summary>The sum of each row over the 32 columns.</summary>
    public static Quad RowSum(in Frag4x4 s)
    {
        Quad m;
        m.X0 = s.S00 + s.S01 + s.S02 + s.S03;
        m.X1 = s.S10 + s.S11 + s.S12 + s.S13;
        m.X2 = s.S20 + s.S21 + s.S22 + s.S23;
        m.X3 = s.S30 + s.S31 + s.S32 + s.S33;
        for (int mask = 1; mask < 8; mask <<= 1)
        {
            m.X0 += Warp.ShuffleXor(m.X0, mask);
            m.X1 += Warp.ShuffleXor(m.X1, mask);
            m.X2 += Warp.ShuffleXor(m.X2, mask);
            m.X3 += Warp.ShuffleXor(m.X3, mask);
        }
        return m;
    }

    /// <summary>Row of a swizzled shared tile (row length 128): the 8 columns colBase + cg + 8c.</summary>
    public static Cols8 LoadCols(ArrayView<float> tile, int row, int colBase, int cg)
    {
        int rowStart = row * 128, x = (row & 7) << 2, c0 = colBase + cg;
        Cols8 v;
        v.C0 = tile[rowStart + ((c0 + 0) ^ x)];
        v.C1 = tile[rowStart + ((c0 + 8) ^ x)];
        v.C2 = tile[rowStart + ((c0 + 16) ^ x)];
        v.C3 = tile[rowStart + ((c0 + 24) ^ x)];
        v.C4 = tile[rowStart + ((c0 + 32) ^ x)];
        v.C5 = tile[rowStart + ((c0 + 40) ^ x)];
        v.C6 = tile[rowStart + ((c0 + 48) ^ x)];
        v.C7 = tile[rowStart + ((c0 + 56) ^ x)];
        return v;
    }

    /// <summary>acc += p · v.</summary>
    public static void Axpy(ref Cols8 acc, float p, in Cols8 v)
    {
        acc.C0 += p * v.C0; acc.C1 += p * v.C1; acc.C2 += p * v.C2; acc.C3 += p * v.C3; acc.C4 += p * v.C4; acc.C5 += p * v.C5; acc.C6 += p * v.C6; acc.C7 += p * v.C7;
    }

    /// <summary>acc *= f.</summary>
    public static void Scale(ref Cols8 acc, float f)
    {
        acc.C0 *= f; acc.C1 *= f; acc.C2 *= f; acc.C3 *= f; acc.C4 *= f; acc.C5 *= f; acc.C6 *= f; acc.C7 *= f;
    }

    /// <summary>Every row of the accumulator times its own factor.</summary>
    public static void ScaleRows(ref AccRows acc, in Quad f, bool wide)
    {
        Scale(ref acc.R0Lo, f.X0);
        Scale(ref acc.R1Lo, f.X1);
        Scale(ref acc.R2Lo, f.X2);
        Scale(ref acc.R3Lo, f.X3);
        if (!wide) return;
        Scale(ref acc.R0Hi, f.X0);
        Scale(ref acc.R1Hi, f.X1);
        Scale(ref acc.R2Hi, f.X2);
        Scale(ref acc.R3Hi, f.X3);
    }

    /// <summary>
    /// Writes the thread's fragment into a 64 x 32 swizzled shared tile (row length 32), so the 8 threads of
    /// a row can each read the whole row of P (or dS). Only the thread's own warp reads these rows back.
    /// </summary>
    public static void StoreFragment(ArrayView<float> tile, in Frag4x4 s, int row0, int cg)
    {
        tile[Swizzle(row0 + 0, cg + 0, 32)] = s.S00;
        tile[Swizzle(row0 + 0, cg + 8, 32)] = s.S01;
        tile[Swizzle(row0 + 0, cg + 16, 32)] = s.S02;
        tile[Swizzle(row0 + 0, cg + 24, 32)] = s.S03;
        tile[Swizzle(row0 + 4, cg + 0, 32)] = s.S10;
        tile[Swizzle(row0 + 4, cg + 8, 32)] = s.S11;
        tile[Swizzle(row0 + 4, cg + 16, 32)] = s.S12;
        tile[Swizzle(row0 + 4, cg + 24, 32)] = s.S13;
        tile[Swizzle(row0 + 8, cg + 0, 32)] = s.S20;
        tile[Swizzle(row0 + 8, cg + 8, 32)] = s.S21;
        tile[Swizzle(row0 + 8, cg + 16, 32)] = s.S22;
        tile[Swizzle(row0 + 8, cg + 24, 32)] = s.S23;
        tile[Swizzle(row0 + 12, cg + 0, 32)] = s.S30;
        tile[Swizzle(row0 + 12, cg + 8, 32)] = s.S31;
        tile[Swizzle(row0 + 12, cg + 16, 32)] = s.S32;
        tile[Swizzle(row0 + 12, cg + 24, 32)] = s.S33;
    }

    /// <summary>
    /// acc[r, :] += Σ_j p[row_r, j] · tile[j, :] over the 32 rows j of <paramref name="tile"/> (swizzled, row
    /// length 128), with p read from <paramref name="pTile"/> (see <see cref="StoreFragment"/>).
    /// </summary>
    public static void AccumulateProduct(ref AccRows acc, ArrayView<float> pTile, int row0, ArrayView<float> tile, int cg, bool wide)
    {
        for (int j = 0; j < 32; j++)
        {
            float q0 = pTile[Swizzle(row0, j, 32)], q1 = pTile[Swizzle(row0 + 4, j, 32)];
            float q2 = pTile[Swizzle(row0 + 8, j, 32)], q3 = pTile[Swizzle(row0 + 12, j, 32)];
            var lo = LoadCols(tile, j, 0, cg);
            Axpy(ref acc.R0Lo, q0, lo);
            Axpy(ref acc.R1Lo, q1, lo);
            Axpy(ref acc.R2Lo, q2, lo);
            Axpy(ref acc.R3Lo, q3, lo);
            if (!wide) continue;
            var hi = LoadCols(tile, j, 64, cg);
            Axpy(ref acc.R0Hi, q0, hi);
            Axpy(ref acc.R1Hi, q1, hi);
            Axpy(ref acc.R2Hi, q2, hi);
            Axpy(ref acc.R3Hi, q3, hi);
        }
    }

    /// <summary>
    /// Writes row r of the accumulator times <paramref name="scale"/> to dst[rowBase + col] for the
    /// columns col &lt; width, adding to what is there when <paramref name="accumulate"/> is set.
    /// </summary>
    public static void StoreRow(ArrayView<float> dst, long rowBase, in Cols8 lo, in Cols8 hi, int cg, int width, float scale, bool accumulate)
    {
        Store(dst, rowBase, 0 + cg, width, lo.C0 * scale, accumulate);
        Store(dst, rowBase, 8 + cg, width, lo.C1 * scale, accumulate);
        Store(dst, rowBase, 16 + cg, width, lo.C2 * scale, accumulate);
        Store(dst, rowBase, 24 + cg, width, lo.C3 * scale, accumulate);
        Store(dst, rowBase, 32 + cg, width, lo.C4 * scale, accumulate);
        Store(dst, rowBase, 40 + cg, width, lo.C5 * scale, accumulate);
        Store(dst, rowBase, 48 + cg, width, lo.C6 * scale, accumulate);
        Store(dst, rowBase, 56 + cg, width, lo.C7 * scale, accumulate);
        Store(dst, rowBase, 64 + cg, width, hi.C0 * scale, accumulate);
        Store(dst, rowBase, 72 + cg, width, hi.C1 * scale, accumulate);
        Store(dst, rowBase, 80 + cg, width, hi.C2 * scale, accumulate);
        Store(dst, rowBase, 88 + cg, width, hi.C3 * scale, accumulate);
        Store(dst, rowBase, 96 + cg, width, hi.C4 * scale, accumulate);
        Store(dst, rowBase, 104 + cg, width, hi.C5 * scale, accumulate);
        Store(dst, rowBase, 112 + cg, width, hi.C6 * scale, accumulate);
        Store(dst, rowBase, 120 + cg, width, hi.C7 * scale, accumulate);
    }

    private static void Store(ArrayView<float> dst, long rowBase, int col, int width, float value, bool accumulate)
    {
        if (col >= width) return;
        long at = rowBase + col;
        dst[at] = accumulate ? dst[at] + value : value;
    }
}

/// <summary>The masks and exponentials of the flash kernels on a <see cref="Frag4x4"/>, written out.</summary>
internal static class FlashFragments
{
    /// <summary>Scores of query rows i0 + 4r against keys j0 + 8k: scaled, or −∞ where the key is not seen.</summary>
    public static void ForwardScores(ref Frag4x4 s, in FlashParams p, int i0, int j0)
    {
        s.S00 = ForwardScore(s.S00, p, i0 + 0, j0 + 0);
        s.S01 = ForwardScore(s.S01, p, i0 + 0, j0 + 8);
        s.S02 = ForwardScore(s.S02, p, i0 + 0, j0 + 16);
        s.S03 = ForwardScore(s.S03, p, i0 + 0, j0 + 24);
        s.S10 = ForwardScore(s.S10, p, i0 + 4, j0 + 0);
        s.S11 = ForwardScore(s.S11, p, i0 + 4, j0 + 8);
        s.S12 = ForwardScore(s.S12, p, i0 + 4, j0 + 16);
        s.S13 = ForwardScore(s.S13, p, i0 + 4, j0 + 24);
        s.S20 = ForwardScore(s.S20, p, i0 + 8, j0 + 0);
        s.S21 = ForwardScore(s.S21, p, i0 + 8, j0 + 8);
        s.S22 = ForwardScore(s.S22, p, i0 + 8, j0 + 16);
        s.S23 = ForwardScore(s.S23, p, i0 + 8, j0 + 24);
        s.S30 = ForwardScore(s.S30, p, i0 + 12, j0 + 0);
        s.S31 = ForwardScore(s.S31, p, i0 + 12, j0 + 8);
        s.S32 = ForwardScore(s.S32, p, i0 + 12, j0 + 16);
        s.S33 = ForwardScore(s.S33, p, i0 + 12, j0 + 24);
    }

    /// <summary>s[r, k] = exp(s[r, k] − m[r]); a row whose maximum is −∞ sees no key and gets zeros.</summary>
    public static void Exponentiate(ref Frag4x4 s, in Quad m)
    {
        s.S00 = Exp(s.S00, m.X0);
        s.S01 = Exp(s.S01, m.X0);
        s.S02 = Exp(s.S02, m.X0);
        s.S03 = Exp(s.S03, m.X0);
        s.S10 = Exp(s.S10, m.X1);
        s.S11 = Exp(s.S11, m.X1);
        s.S12 = Exp(s.S12, m.X1);
        s.S13 = Exp(s.S13, m.X1);
        s.S20 = Exp(s.S20, m.X2);
        s.S21 = Exp(s.S21, m.X2);
        s.S22 = Exp(s.S22, m.X2);
        s.S23 = Exp(s.S23, m.X2);
        s.S30 = Exp(s.S30, m.X3);
        s.S31 = Exp(s.S31, m.X3);
        s.S32 = Exp(s.S32, m.X3);
        s.S33 = Exp(s.S33, m.X3);
    }

    /// <summary>
    /// dQ kernel, rows are queries i0 + 4r and columns keys j0 + 8k: s becomes P = exp(s·scale − lse[r])
    /// and dp becomes dS = P ∘ (dP − Drow[r]) · scale.
    /// </summary>
    public static void QueryRowGradients(ref Frag4x4 s, ref Frag4x4 dp, in FlashParams p, int i0, int j0, in Quad lse, in Quad drow)
    {
        Gradient(ref s.S00, ref dp.S00, p, i0 + 0, j0 + 0, lse.X0, drow.X0);
        Gradient(ref s.S01, ref dp.S01, p, i0 + 0, j0 + 8, lse.X0, drow.X0);
        Gradient(ref s.S02, ref dp.S02, p, i0 + 0, j0 + 16, lse.X0, drow.X0);
        Gradient(ref s.S03, ref dp.S03, p, i0 + 0, j0 + 24, lse.X0, drow.X0);
        Gradient(ref s.S10, ref dp.S10, p, i0 + 4, j0 + 0, lse.X1, drow.X1);
        Gradient(ref s.S11, ref dp.S11, p, i0 + 4, j0 + 8, lse.X1, drow.X1);
        Gradient(ref s.S12, ref dp.S12, p, i0 + 4, j0 + 16, lse.X1, drow.X1);
        Gradient(ref s.S13, ref dp.S13, p, i0 + 4, j0 + 24, lse.X1, drow.X1);
        Gradient(ref s.S20, ref dp.S20, p, i0 + 8, j0 + 0, lse.X2, drow.X2);
        Gradient(ref s.S21, ref dp.S21, p, i0 + 8, j0 + 8, lse.X2, drow.X2);
        Gradient(ref s.S22, ref dp.S22, p, i0 + 8, j0 + 16, lse.X2, drow.X2);
        Gradient(ref s.S23, ref dp.S23, p, i0 + 8, j0 + 24, lse.X2, drow.X2);
        Gradient(ref s.S30, ref dp.S30, p, i0 + 12, j0 + 0, lse.X3, drow.X3);
        Gradient(ref s.S31, ref dp.S31, p, i0 + 12, j0 + 8, lse.X3, drow.X3);
        Gradient(ref s.S32, ref dp.S32, p, i0 + 12, j0 + 16, lse.X3, drow.X3);
        Gradient(ref s.S33, ref dp.S33, p, i0 + 12, j0 + 24, lse.X3, drow.X3);
    }

    /// <summary>dK/dV kernel, rows are keys j0 + 4r and columns queries i0 + 8k (transposed scores).</summary>
    public static void KeyRowGradients(ref Frag4x4 s, ref Frag4x4 dp, in FlashParams p, int j0, int i0, in Quad lse, in Quad drow)
    {
        Gradient(ref s.S00, ref dp.S00, p, i0 + 0, j0 + 0, lse.X0, drow.X0);
        Gradient(ref s.S01, ref dp.S01, p, i0 + 8, j0 + 0, lse.X1, drow.X1);
        Gradient(ref s.S02, ref dp.S02, p, i0 + 16, j0 + 0, lse.X2, drow.X2);
        Gradient(ref s.S03, ref dp.S03, p, i0 + 24, j0 + 0, lse.X3, drow.X3);
        Gradient(ref s.S10, ref dp.S10, p, i0 + 0, j0 + 4, lse.X0, drow.X0);
        Gradient(ref s.S11, ref dp.S11, p, i0 + 8, j0 + 4, lse.X1, drow.X1);
        Gradient(ref s.S12, ref dp.S12, p, i0 + 16, j0 + 4, lse.X2, drow.X2);
        Gradient(ref s.S13, ref dp.S13, p, i0 + 24, j0 + 4, lse.X3, drow.X3);
        Gradient(ref s.S20, ref dp.S20, p, i0 + 0, j0 + 8, lse.X0, drow.X0);
        Gradient(ref s.S21, ref dp.S21, p, i0 + 8, j0 + 8, lse.X1, drow.X1);
        Gradient(ref s.S22, ref dp.S22, p, i0 + 16, j0 + 8, lse.X2, drow.X2);
        Gradient(ref s.S23, ref dp.S23, p, i0 + 24, j0 + 8, lse.X3, drow.X3);
        Gradient(ref s.S30, ref dp.S30, p, i0 + 0, j0 + 12, lse.X0, drow.X0);
        Gradient(ref s.S31, ref dp.S31, p, i0 + 8, j0 + 12, lse.X1, drow.X1);
        Gradient(ref s.S32, ref dp.S32, p, i0 + 16, j0 + 12, lse.X2, drow.X2);
        Gradient(ref s.S33, ref dp.S33, p, i0 + 24, j0 + 12, lse.X3, drow.X3);
    }

    /// <summary>Whether query i sees key j (both tile-local indices of the chunk).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static bool Sees(in FlashParams p, int i, int j) =>
        i < p.Nq && j < p.Nk && (p.Causal == 0 || p.KeyOffset + j <= p.QueryOffset + i);

    private static float ForwardScore(float s, in FlashParams p, int i, int j) =>
        Sees(p, i, j) ? s * p.Scale : float.NegativeInfinity;

    private static float Exp(float s, float m) => m == float.NegativeInfinity ? 0f : MathF.Exp(s - m);

    private static void Gradient(ref float s, ref float dp, in FlashParams p, int i, int j, float lse, float drow)
    {
        float pr = lse != float.NegativeInfinity && Sees(p, i, j) ? MathF.Exp(s * p.Scale - lse) : 0f;
        s = pr;
        dp = pr * (dp - drow) * p.Scale;
    }
}

/// <summary>The decay mask of the lightning kernels (LightningKernels.cs) on a <see cref="Frag4x4"/>, written out.</summary>
internal static class LightningFragments
{
    /// <summary>
    /// Rows are queries i0 + 4r, columns keys j0 + 8k (block-local indices): s becomes λ^(i−j)·s where
    /// j ≤ i, and 0 above the diagonal. λ^e = exp(e·ln λ) with e ≥ 0, so strong decay underflows to 0.
    /// </summary>
    public static void QueryRows(ref Frag4x4 s, float ln, int i0, int j0)
    {
        s.S00 = Decayed(s.S00, ln, i0 + 0, j0 + 0);
        s.S01 = Decayed(s.S01, ln, i0 + 0, j0 + 8);
        s.S02 = Decayed(s.S02, ln, i0 + 0, j0 + 16);
        s.S03 = Decayed(s.S03, ln, i0 + 0, j0 + 24);
        s.S10 = Decayed(s.S10, ln, i0 + 4, j0 + 0);
        s.S11 = Decayed(s.S11, ln, i0 + 4, j0 + 8);
        s.S12 = Decayed(s.S12, ln, i0 + 4, j0 + 16);
        s.S13 = Decayed(s.S13, ln, i0 + 4, j0 + 24);
        s.S20 = Decayed(s.S20, ln, i0 + 8, j0 + 0);
        s.S21 = Decayed(s.S21, ln, i0 + 8, j0 + 8);
        s.S22 = Decayed(s.S22, ln, i0 + 8, j0 + 16);
        s.S23 = Decayed(s.S23, ln, i0 + 8, j0 + 24);
        s.S30 = Decayed(s.S30, ln, i0 + 12, j0 + 0);
        s.S31 = Decayed(s.S31, ln, i0 + 12, j0 + 8);
        s.S32 = Decayed(s.S32, ln, i0 + 12, j0 + 16);
        s.S33 = Decayed(s.S33, ln, i0 + 12, j0 + 24);
    }

    /// <summary>Transposed: rows are keys j0 + 4r, columns queries i0 + 8k; the same mask and decay.</summary>
    public static void KeyRows(ref Frag4x4 s, float ln, int j0, int i0)
    {
        s.S00 = Decayed(s.S00, ln, i0 + 0, j0 + 0);
        s.S01 = Decayed(s.S01, ln, i0 + 8, j0 + 0);
        s.S02 = Decayed(s.S02, ln, i0 + 16, j0 + 0);
        s.S03 = Decayed(s.S03, ln, i0 + 24, j0 + 0);
        s.S10 = Decayed(s.S10, ln, i0 + 0, j0 + 4);
        s.S11 = Decayed(s.S11, ln, i0 + 8, j0 + 4);
        s.S12 = Decayed(s.S12, ln, i0 + 16, j0 + 4);
        s.S13 = Decayed(s.S13, ln, i0 + 24, j0 + 4);
        s.S20 = Decayed(s.S20, ln, i0 + 0, j0 + 8);
        s.S21 = Decayed(s.S21, ln, i0 + 8, j0 + 8);
        s.S22 = Decayed(s.S22, ln, i0 + 16, j0 + 8);
        s.S23 = Decayed(s.S23, ln, i0 + 24, j0 + 8);
        s.S30 = Decayed(s.S30, ln, i0 + 0, j0 + 12);
        s.S31 = Decayed(s.S31, ln, i0 + 8, j0 + 12);
        s.S32 = Decayed(s.S32, ln, i0 + 16, j0 + 12);
        s.S33 = Decayed(s.S33, ln, i0 + 24, j0 + 12);
    }

    private static float Decayed(float s, float ln, int i, int j) => j <= i ? s * MathF.Exp((i - j) * ln) : 0f;
}
