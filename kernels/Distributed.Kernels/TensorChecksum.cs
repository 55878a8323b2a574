using System.Numerics;
using System.Runtime.InteropServices;
using Distributed.Kernels.Cpu;

namespace Distributed.Kernels;

/// <summary>
/// Whole-tensor operations that training code needs between the kernels: a checksum that tells whether a
/// tensor changed, and an element-wise add. CPU tensors are read in place (vectorised, both cores); other
/// backends go through host staging in 1M-float pieces (correct, not fast: a device kernel is future work).
/// </summary>
public static class TensorChecksum
{
    private const int PieceFloats = 1 << 20;

    /// <summary>
    /// A 64-bit checksum of every element's bits, position-sensitive (a Fletcher sum per 32-bit lane, the
    /// pieces folded in order). It detects any single changed element and reordered elements with
    /// overwhelming probability; it is not a cryptographic hash.
    /// </summary>
    public static unsafe ulong Of(DeviceTensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        ObjectDisposedException.ThrowIf(tensor.IsDisposed, tensor);
        long n = tensor.Length;
        int pieces = (int)((n + PieceFloats - 1) / PieceFloats);
        var sums = new ulong[pieces];
        if (tensor is CpuTensor cpu)
        {
            float* p = cpu.Pointer;
            Parallel.For(0, pieces, i =>
            {
                long start = (long)i * PieceFloats;
                int count = (int)Math.Min(PieceFloats, n - start);
                sums[i] = Piece(new ReadOnlySpan<float>(p + start, count));
            });
        }
        else
        {
            var host = new float[(int)Math.Min(PieceFloats, Math.Max(1, n))];
            for (int i = 0; i < pieces; i++)
            {
                long start = (long)i * PieceFloats;
                var span = host.AsSpan(0, (int)Math.Min(PieceFloats, n - start));
                tensor.CopyToHost(span, start);
                sums[i] = Piece(span);
            }
        }
        ulong h = 0x9E3779B97F4A7C15UL ^ (ulong)n;
        foreach (var s in sums) h = Mix(h ^ s) + 0x632BE59BD9B4E019UL;
        return h;
    }

    /// <summary><c>destination += source</c>, element-wise, for two tensors of the same shape on one backend.</summary>
    /// <exception cref="ArgumentException">The shapes differ.</exception>
    public static unsafe void AddInto(DeviceTensor source, DeviceTensor destination)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(destination);
        if (!source.Shape.SequenceEqual(destination.Shape))
            throw new ArgumentException($"Cannot add {source} into {destination}: the shapes differ.", nameof(destination));
        long n = source.Length;
        int pieces = (int)((n + PieceFloats - 1) / PieceFloats);
        if (source is CpuTensor s && destination is CpuTensor d)
        {
            float* ps = s.Pointer, pd = d.Pointer;
            Parallel.For(0, pieces, i =>
            {
                long start = (long)i * PieceFloats;
                int count = (int)Math.Min(PieceFloats, n - start);
                Add(new ReadOnlySpan<float>(ps + start, count), new Span<float>(pd + start, count));
            });
            return;
        }
        int buffer = (int)Math.Min(PieceFloats, Math.Max(1, n));
        var a = new float[buffer];
        var b = new float[buffer];
        for (int i = 0; i < pieces; i++)
        {
            long start = (long)i * PieceFloats;
            int count = (int)Math.Min(PieceFloats, n - start);
            source.CopyToHost(a.AsSpan(0, count), start);
            destination.CopyToHost(b.AsSpan(0, count), start);
            Add(a.AsSpan(0, count), b.AsSpan(0, count));
            destination.CopyFromHost(b.AsSpan(0, count), start);
        }
    }

    private static void Add(ReadOnlySpan<float> source, Span<float> destination)
    {
        int width = Vector<float>.Count, i = 0;
        for (; i + width <= source.Length; i += width)
            (new Vector<float>(destination.Slice(i, width)) + new Vector<float>(source.Slice(i, width))).CopyTo(destination.Slice(i, width));
        for (; i < source.Length; i++) destination[i] += source[i];
    }

    private static ulong Piece(ReadOnlySpan<float> values)
    {
        var bits = MemoryMarshal.Cast<float, uint>(values);
        var a = Vector<uint>.Zero;
        var b = Vector<uint>.Zero;
        int width = Vector<uint>.Count, i = 0;
        for (; i + width <= bits.Length; i += width)
        {
            a += new Vector<uint>(bits.Slice(i, width));
            b += a;
        }
        ulong h = (ulong)values.Length;
        for (int lane = 0; lane < width; lane++) h = Mix(h ^ (((ulong)b[lane] << 32) | a[lane])) + (ulong)lane;
        for (; i < bits.Length; i++) h = Mix(h ^ bits[i]) + (ulong)i;
        return h;
    }

    private static ulong Mix(ulong x)
    {
        x ^= x >> 30;
        x *= 0xBF58476D1CE4E5B9UL;
        x ^= x >> 27;
        x *= 0x94D049BB133111EBUL;
        return x ^ (x >> 31);
    }
}
