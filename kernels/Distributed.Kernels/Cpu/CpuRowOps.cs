using System.Runtime.Intrinsics;

namespace Distributed.Kernels.Cpu;

/// <summary>
/// The cheap per-row steps between the attention kernels: merging two partial softmax results, the
/// backward's row dot product Drow = rowsum(O ∘ dO), and slice copies. Vectorised (AVX-512, AVX2 or
/// scalar, as <see cref="CpuMath"/> chooses) and split over threads in blocks of 64 rows per head once
/// the tensor is large enough to pay for the hand-off (<see cref="ParallelFloats"/>).
/// </summary>
internal static unsafe class CpuRowOps
{
    private const int Rows = 64;

    /// <summary>Below this many floats touched, an operation runs on the calling thread alone.</summary>
    public const long ParallelFloats = 1L << 16;

    private static int ThreadsFor(long floats, int threads) => floats < ParallelFloats ? 1 : threads;

    /// <summary>
    /// oA ← softmax-merge(oA, oB), lseA ← log(e^lseA + e^lseB); o is [B, N, H, Dv], lse is [B, H, N].
    /// A row whose lseB is −∞ keeps A; a row whose lseA is −∞ takes B.
    /// </summary>
    public static void MergeSoftmax(float* a, float* la, float* ob, float* lb, int b, int n, int h, int dv, int threads)
    {
        int blocks = (n + Rows - 1) / Rows;
        CpuParallel.For(b * h * blocks, ThreadsFor(2L * b * n * h * dv, threads), t =>
        {
            int blk = t % blocks, bh = t / blocks, bb = bh / h, hh = bh % h, i0 = blk * Rows, i1 = Math.Min(n, i0 + Rows);
            for (int i = i0; i < i1; i++)
            {
                long li = ((long)bb * h + hh) * n + i;
                float x = la[li], y = lb[li];
                if (float.IsNegativeInfinity(y)) continue;
                long off = (((long)bb * n + i) * h + hh) * dv;
                if (float.IsNegativeInfinity(x))
                {
                    new ReadOnlySpan<float>(ob + off, dv).CopyTo(new Span<float>(a + off, dv));
                    la[li] = y;
                    continue;
                }
                float d = y - x;
                // sigmoid(d) and log(1 + e^d), both stable for either sign of d.
                float sig = d >= 0 ? 1f / (1f + MathF.Exp(-d)) : MathF.Exp(d) / (1f + MathF.Exp(d));
                float softplus = MathF.Max(d, 0f) + MathF.Log(1f + MathF.Exp(-MathF.Abs(d)));
                Lerp(a + off, ob + off, dv, sig);
                la[li] = x + softplus;
            }
        });
    }

    /// <summary>a[e] ← a[e] + t·(b[e] − a[e]) for e &lt; n.</summary>
    private static void Lerp(float* a, float* b, int n, float t)
    {
        int e = 0;
        if (CpuMath.UseVector512)
        {
            var tv = Vector512.Create(t);
            for (; e + 16 <= n; e += 16)
            {
                var av = Vector512.Load(a + e);
                Vector512.FusedMultiplyAdd(tv, Vector512.Load(b + e) - av, av).Store(a + e);
            }
        }
        else if (CpuMath.UseVector256)
        {
            var tv = Vector256.Create(t);
            for (; e + 8 <= n; e += 8)
            {
                var av = Vector256.Load(a + e);
                Vector256.FusedMultiplyAdd(tv, Vector256.Load(b + e) - av, av).Store(a + e);
            }
        }
        for (; e < n; e++) a[e] += t * (b[e] - a[e]);
    }

    /// <summary>drow[b, h, i] = Σ_e O[b, i, h, e] · dO[b, i, h, e].</summary>
    public static void RowDot(float* o, float* g, float* r, int b, int n, int h, int dv, int threads)
    {
        int blocks = (n + Rows - 1) / Rows;
        CpuParallel.For(b * h * blocks, ThreadsFor(2L * b * n * h * dv, threads), t =>
        {
            int blk = t % blocks, bh = t / blocks, bb = bh / h, hh = bh % h, i0 = blk * Rows, i1 = Math.Min(n, i0 + Rows);
            for (int i = i0; i < i1; i++)
            {
                long off = (((long)bb * n + i) * h + hh) * dv;
                r[((long)bb * h + hh) * n + i] = Dot(o + off, g + off, dv);
            }
        });
    }

    /// <summary>Σ x[e]·y[e] for e &lt; n.</summary>
    private static float Dot(float* x, float* y, int n)
    {
        int e = 0;
        float sum = 0f;
        if (CpuMath.UseVector512 && n >= 16)
        {
            var acc = Vector512<float>.Zero;
            for (; e + 16 <= n; e += 16) acc = Vector512.FusedMultiplyAdd(Vector512.Load(x + e), Vector512.Load(y + e), acc);
            sum = Vector512.Sum(acc);
        }
        else if (CpuMath.UseVector256 && n >= 8)
        {
            var acc = Vector256<float>.Zero;
            for (; e + 8 <= n; e += 8) acc = Vector256.FusedMultiplyAdd(Vector256.Load(x + e), Vector256.Load(y + e), acc);
            sum = Vector256.Sum(acc);
        }
        for (; e < n; e++) sum += x[e] * y[e];
        return sum;
    }

    /// <summary>
    /// <paramref name="outer"/> copies of <paramref name="run"/> contiguous floats, the o-th from
    /// <c>src + o·srcStride</c> to <c>dst + o·dstStride</c>; long runs are split so every thread copies.
    /// </summary>
    public static void CopyRuns(float* src, long srcStride, float* dst, long dstStride, long outer, long run, int threads)
    {
        const long Piece = 1L << 15;
        if (outer <= 0 || run <= 0) return;
        if (ThreadsFor(2 * outer * run, threads) == 1)
        {
            for (long o = 0; o < outer; o++) NativeBuffer.Copy(src + o * srcStride, dst + o * dstStride, run);
            return;
        }
        if (run >= Piece)
        {
            // Long runs: pieces of each run.
            long pieces = (run + Piece - 1) / Piece;
            CpuParallel.For((int)Math.Min(outer * pieces, int.MaxValue), threads, t =>
            {
                long o = t / pieces, p0 = t % pieces * Piece, len = Math.Min(Piece, run - p0);
                NativeBuffer.Copy(src + o * srcStride + p0, dst + o * dstStride + p0, len);
            });
            return;
        }
        // Short runs: several whole runs per task.
        long per = Piece / run, groups = (outer + per - 1) / per;
        CpuParallel.For((int)Math.Min(groups, int.MaxValue), threads, t =>
        {
            for (long o = t * per, end = Math.Min(outer, o + per); o < end; o++)
                NativeBuffer.Copy(src + o * srcStride, dst + o * dstStride, run);
        });
    }
}
