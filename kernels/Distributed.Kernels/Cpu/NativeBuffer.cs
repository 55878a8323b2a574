using System.Runtime.InteropServices;

namespace Distributed.Kernels.Cpu;

/// <summary>
/// Native fp32 memory outside the GC heap: any length a <c>long</c> can count (no 2^31 cap of a managed
/// array), freed by <see cref="SafeHandle.Dispose()"/> or, if forgotten, by the finalizer. The GC is told
/// about the bytes (memory pressure), so forgotten buffers still get collected. Zeroed buffers come from
/// <c>calloc</c>: large ones are fresh zero pages that become resident only when written, as a managed
/// array's would (an explicit clear would make every page resident at once). The first element is
/// 64-byte aligned (the allocation is over-sized by one cache line and the pointer rounded up).
/// </summary>
internal sealed unsafe class NativeBuffer : SafeHandle
{
    private const int Alignment = 64;
    private static long _allocated, _live;

    /// <summary>Allocates <paramref name="floats"/> floats, zero-filled when <paramref name="zero"/>.</summary>
    /// <exception cref="OutOfMemoryException">The bytes are not available; the message gives the size.</exception>
    public NativeBuffer(long floats, bool zero) : base(IntPtr.Zero, ownsHandle: true)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(floats);
        Floats = floats;
        Bytes = Math.Max(floats, 1) * sizeof(float);
        void* p;
        try { p = zero ? NativeMemory.AllocZeroed((nuint)(Bytes + Alignment)) : NativeMemory.Alloc((nuint)(Bytes + Alignment)); }
        catch (OutOfMemoryException e)
        {
            throw new OutOfMemoryException($"Could not allocate {Bytes:N0} bytes ({Bytes / (double)(1L << 30):F2} GiB) of native memory for a CPU tensor or buffer of {floats:N0} floats.", e);
        }
        SetHandle((IntPtr)p);
        Pointer = (float*)(((nuint)p + Alignment - 1) & ~(nuint)(Alignment - 1));
        GC.AddMemoryPressure(Bytes);
        Interlocked.Add(ref _allocated, Bytes);
        Interlocked.Add(ref _live, Bytes);
    }

    /// <summary>Bytes ever allocated by every native buffer of this process.</summary>
    public static long TotalAllocatedBytes => Interlocked.Read(ref _allocated);

    /// <summary>Bytes held now by every native buffer of this process.</summary>
    public static long LiveBytes => Interlocked.Read(ref _live);

    /// <summary>The number of floats.</summary>
    public long Floats { get; }

    /// <summary>The bytes held (at least 4).</summary>
    public long Bytes { get; }

    /// <summary>The first element, 64-byte aligned.</summary>
    public float* Pointer { get; }

    /// <inheritdoc/>
    public override bool IsInvalid => handle == IntPtr.Zero;

    /// <summary>Zeroes <paramref name="count"/> floats at <paramref name="p"/>, in pieces a span can hold.</summary>
    public static void Clear(float* p, long count)
    {
        const int Piece = 1 << 28;
        for (long i = 0; i < count; i += Piece)
            new Span<float>(p + i, (int)Math.Min(Piece, count - i)).Clear();
    }

    /// <summary>Copies <paramref name="count"/> floats, in pieces a span can hold.</summary>
    public static void Copy(float* source, float* destination, long count)
    {
        const int Piece = 1 << 28;
        for (long i = 0; i < count; i += Piece)
        {
            int n = (int)Math.Min(Piece, count - i);
            new ReadOnlySpan<float>(source + i, n).CopyTo(new Span<float>(destination + i, n));
        }
    }

    /// <inheritdoc/>
    protected override bool ReleaseHandle()
    {
        NativeMemory.Free((void*)handle);
        GC.RemoveMemoryPressure(Bytes);
        Interlocked.Add(ref _live, -Bytes);
        return true;
    }
}
