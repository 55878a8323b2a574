using System.Numerics;
using System.Runtime.InteropServices;

namespace Distributed.Cli.Train;

/// <summary>
/// Row-major dense math of the model's per-token parts, on host arrays: three GEMM shapes (forward, the
/// input gradient, the weight gradient), vectorised with <see cref="Vector{T}"/> and split over rows across
/// <see cref="Threads"/> workers when the work is large enough to pay for it.
/// </summary>
internal sealed class HostMath(int threads)
{
    private const long ParallelMinimumFlops = 1 << 18;

    /// <summary>Workers per call (this rank's share of the cores).</summary>
    public int Threads { get; } = Math.Max(1, threads);

    /// <summary>C[m,n] = A[m,k]·B[k,n] (overwrites C); B starts at <paramref name="bOffset"/>.</summary>
    public void MatMul(float[] a, int m, int k, float[] b, int bOffset, int n, float[] c) =>
        Rows(m, (long)m * n * k, (lo, hi) =>
        {
            for (int i = lo; i < hi; i++)
            {
                var row = c.AsSpan(i * n, n);
                row.Clear();
                for (int p = 0; p < k; p++) Axpy(a[i * k + p], b.AsSpan(bOffset + p * n, n), row);
            }
        });

    /// <summary>dA[m,k] (+)= dC[m,n]·B[k,n]ᵀ; B starts at <paramref name="bOffset"/>.</summary>
    public void MatMulTransposedB(float[] dc, int m, int n, float[] b, int bOffset, int k, float[] da, bool accumulate) =>
        Rows(m, (long)m * n * k, (lo, hi) =>
        {
            for (int i = lo; i < hi; i++)
            {
                var g = dc.AsSpan(i * n, n);
                for (int p = 0; p < k; p++)
                {
                    float d = Dot(g, b.AsSpan(bOffset + p * n, n));
                    da[i * k + p] = accumulate ? da[i * k + p] + d : d;
                }
            }
        });

    /// <summary>dB[k,n] += A[m,k]ᵀ·dC[m,n] (accumulates: weight gradients sum over rows); dB starts at <paramref name="dbOffset"/>.</summary>
    public void AddMatMulTransposedA(float[] a, int m, int k, float[] dc, int n, float[] db, int dbOffset) =>
        Rows(k, (long)m * n * k, (lo, hi) =>
        {
            for (int i = 0; i < m; i++)
            {
                var g = dc.AsSpan(i * n, n);
                for (int p = lo; p < hi; p++) Axpy(a[i * k + p], g, db.AsSpan(dbOffset + p * n, n));
            }
        });

    private void Rows(int rows, long flops, Action<int, int> body)
    {
        int workers = flops < ParallelMinimumFlops ? 1 : Math.Min(Threads, rows);
        if (workers <= 1)
        {
            body(0, rows);
            return;
        }
        Parallel.For(0, workers, new ParallelOptions { MaxDegreeOfParallelism = workers },
            w => body((int)((long)rows * w / workers), (int)((long)rows * (w + 1) / workers)));
    }

    /// <summary>y += a·x.</summary>
    public static void Axpy(float a, ReadOnlySpan<float> x, Span<float> y)
    {
        if (a == 0f) return;
        int i = 0;
        if (Vector.IsHardwareAccelerated && x.Length >= Vector<float>.Count)
        {
            var xv = MemoryMarshal.Cast<float, Vector<float>>(x);
            var yv = MemoryMarshal.Cast<float, Vector<float>>(y);
            var av = new Vector<float>(a);
            for (int v = 0; v < xv.Length; v++) yv[v] += av * xv[v];
            i = xv.Length * Vector<float>.Count;
        }
        for (; i < x.Length; i++) y[i] += a * x[i];
    }

    /// <summary>Σ x·y in fp32.</summary>
    public static float Dot(ReadOnlySpan<float> x, ReadOnlySpan<float> y)
    {
        float s = 0f;
        int i = 0;
        if (Vector.IsHardwareAccelerated && x.Length >= Vector<float>.Count)
        {
            var xv = MemoryMarshal.Cast<float, Vector<float>>(x);
            var yv = MemoryMarshal.Cast<float, Vector<float>>(y);
            var acc = Vector<float>.Zero;
            for (int v = 0; v < xv.Length; v++) acc += xv[v] * yv[v];
            s = Vector.Sum(acc);
            i = xv.Length * Vector<float>.Count;
        }
        for (; i < x.Length; i++) s += x[i] * y[i];
        return s;
    }
}
