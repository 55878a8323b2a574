using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Distributed.Cli.Check;

/// <summary>fp64 span kernels of the sampled references, vectorised with <see cref="Vector{T}"/>.</summary>
internal static class VectorMath
{
    /// <summary>Σ a[i]·b[i] over a's length.</summary>
    public static double Dot(ReadOnlySpan<double> a, ReadOnlySpan<double> b)
    {
        if (b.Length < a.Length) throw new ArgumentException("b is shorter than a.", nameof(b));
        int w = Vector<double>.Count, i = 0, n = a.Length;
        ref double ra = ref MemoryMarshal.GetReference(a);
        ref double rb = ref MemoryMarshal.GetReference(b);
        var acc = Vector<double>.Zero;
        for (; i <= n - w; i += w) acc += Vector.LoadUnsafe(ref ra, (nuint)i) * Vector.LoadUnsafe(ref rb, (nuint)i);
        double s = Vector.Sum(acc);
        for (; i < n; i++) s += Unsafe.Add(ref ra, i) * Unsafe.Add(ref rb, i);
        return s;
    }

    /// <summary>y += a·x over x's length.</summary>
    public static void Axpy(double a, ReadOnlySpan<double> x, Span<double> y)
    {
        if (y.Length < x.Length) throw new ArgumentException("y is shorter than x.", nameof(y));
        int w = Vector<double>.Count, i = 0, n = x.Length;
        ref double rx = ref MemoryMarshal.GetReference(x);
        ref double ry = ref MemoryMarshal.GetReference(y);
        var va = new Vector<double>(a);
        for (; i <= n - w; i += w)
            (Vector.LoadUnsafe(ref ry, (nuint)i) + va * Vector.LoadUnsafe(ref rx, (nuint)i)).StoreUnsafe(ref ry, (nuint)i);
        for (; i < n; i++) Unsafe.Add(ref ry, i) += a * Unsafe.Add(ref rx, i);
    }

    /// <summary>y = c·y + a·x over x's length (a decayed rank-1 state row update).</summary>
    public static void ScaleAxpy(double c, Span<double> y, double a, ReadOnlySpan<double> x)
    {
        if (y.Length < x.Length) throw new ArgumentException("y is shorter than x.", nameof(y));
        int w = Vector<double>.Count, i = 0, n = x.Length;
        ref double rx = ref MemoryMarshal.GetReference(x);
        ref double ry = ref MemoryMarshal.GetReference(y);
        var va = new Vector<double>(a);
        var vc = new Vector<double>(c);
        for (; i <= n - w; i += w)
            (vc * Vector.LoadUnsafe(ref ry, (nuint)i) + va * Vector.LoadUnsafe(ref rx, (nuint)i)).StoreUnsafe(ref ry, (nuint)i);
        for (; i < n; i++) Unsafe.Add(ref ry, i) = c * Unsafe.Add(ref ry, i) + a * Unsafe.Add(ref rx, i);
    }

    /// <summary>y *= c over y's length.</summary>
    public static void Scale(double c, Span<double> y)
    {
        for (int i = 0; i < y.Length; i++) y[i] *= c;
    }

    /// <summary>Widens fp32 to fp64.</summary>
    public static void Widen(ReadOnlySpan<float> source, Span<double> destination)
    {
        if (destination.Length < source.Length) throw new ArgumentException("The destination is shorter than the source.", nameof(destination));
        for (int i = 0; i < source.Length; i++) destination[i] = source[i];
    }

    /// <summary>
    /// state = λ·state + kᵀv for a row-major <c>[D, Dv]</c> state, k <c>[D]</c>, v <c>[Dv]</c>.
    /// </summary>
    public static void DecayedOuterUpdate(Span<double> state, double lambda, ReadOnlySpan<double> k, ReadOnlySpan<double> v)
    {
        int dv = v.Length;
        for (int d = 0; d < k.Length; d++) ScaleAxpy(lambda, state.Slice(d * dv, dv), k[d], v);
    }
}
