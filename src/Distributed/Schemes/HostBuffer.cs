using System.Runtime.CompilerServices;
using Distributed.Kernels.Ilgpu;
using ILGPU.Runtime;

namespace Distributed.Schemes;

/// <summary>
/// Host staging arrays at the communicator boundary: grown when a step needs more, then reused. A
/// communicator moves a <c>Span&lt;float&gt;</c> (at most 2^31 − 1 floats) per call, so a scheme that must
/// move more splits the transfer into pieces of at most <see cref="PieceFloats"/> floats each (which
/// also bounds its staging memory).
/// <para>
/// Page-locked staging. When the rank's backend is an <see cref="IlgpuBackend"/> (<see cref="PageLockWith"/>,
/// set by <see cref="SequenceParallelAttention"/>), <see cref="Grow"/> allocates the array as ILGPU
/// page-locked host memory (<c>AllocatePageLocked1D</c>: a pinned .NET array registered with the driver),
/// so a device tensor's <c>CopyToHost</c> / <c>CopyFromHost</c> into it is one DMA each way, with no
/// driver bounce buffer, and MPI reads and writes the same pinned array (device → page-locked host → MPI,
/// and back). The page lock lives as long as the array and is released when <see cref="Grow"/> replaces
/// it. CPU tensors keep plain managed arrays: they copy host to host and MPI reads them directly.
/// </para>
/// </summary>
internal static class HostBuffer
{
    /// <summary>The most floats one staged collective moves: 4M floats, 16 MiB (all-gather KV: 4K tokens at Hk·(D+Dv) = 1024).</summary>
    public const long DefaultPieceFloats = 1L << 22;

    /// <summary>Tests lower the piece size for the ranks they start (it flows to their threads).</summary>
    internal static readonly AsyncLocal<long> PieceOverride = new();

    /// <summary>
    /// The ILGPU backend whose accelerator page-locks this rank's staging arrays, or null for plain managed
    /// arrays. Flows to the rank's threads and tasks like <see cref="PieceOverride"/>.
    /// </summary>
    internal static readonly AsyncLocal<IlgpuBackend?> PageLockWith = new();

    // The page-locked array behind each staging array: kept alive by the array, released by Grow.
    private static readonly ConditionalWeakTable<float[], PageLockedArray1D<float>> Locked = new();

    // Page-locked allocations per backend, for tests: a reused buffer allocates nothing after its first step.
    private static readonly ConditionalWeakTable<IlgpuBackend, StrongBox<long>> Allocations = new();

    /// <summary>The most floats one staged collective moves.</summary>
    public static long PieceFloats => PieceOverride.Value > 0 ? PieceOverride.Value : DefaultPieceFloats;

    /// <summary>
    /// Makes <paramref name="buffer"/> hold at least <paramref name="length"/> floats (contents not kept):
    /// page-locked for the rank's ILGPU backend (<see cref="PageLockWith"/>), a managed array otherwise.
    /// </summary>
    /// <exception cref="InvalidOperationException">More than one managed array can hold: the caller must split.</exception>
    public static void Grow(ref float[] buffer, long length)
    {
        if (buffer.Length >= length) return;
        if (length > Array.MaxLength)
            throw new InvalidOperationException($"A host staging buffer of {length} floats is more than one array holds ({Array.MaxLength}); the transfer must be split into pieces.");
        // Let the old array (and its page lock) go before the new one is allocated.
        if (Locked.TryGetValue(buffer, out var old))
        {
            Locked.Remove(buffer);
            old.Dispose();
        }
        buffer = [];
        var backend = PageLockWith.Value;
        if (backend is null || backend.IsDisposed)
        {
            buffer = GC.AllocateUninitializedArray<float>((int)length);
            return;
        }
        var locked = backend.AllocatePageLocked((int)length);
        buffer = locked.GetArray();
        Locked.Add(buffer, locked);
        Interlocked.Increment(ref Allocations.GetOrCreateValue(backend).Value);
    }

    /// <summary>A new staging array of <paramref name="length"/> floats, allocated as <see cref="Grow"/> does.</summary>
    public static float[] Allocate(long length)
    {
        float[] buffer = [];
        Grow(ref buffer, length);
        return buffer;
    }

    /// <summary>Whether <paramref name="buffer"/> is page-locked staging memory made by <see cref="Grow"/>.</summary>
    internal static bool IsPageLocked(float[] buffer) => Locked.TryGetValue(buffer, out _);

    /// <summary>How many page-locked arrays <see cref="Grow"/> has allocated for <paramref name="backend"/>.</summary>
    internal static long PageLockedAllocations(IlgpuBackend backend) =>
        Allocations.TryGetValue(backend, out var count) ? Interlocked.Read(ref count.Value) : 0;

    /// <summary>
    /// How many pieces a transfer of <paramref name="floats"/> floats (<paramref name="paddedFloats"/> with the
    /// padding of equal per-rank blocks) needs so that each piece stays within <see cref="PieceFloats"/>.
    /// </summary>
    public static int Pieces(long floats, long paddedFloats)
    {
        long most = Math.Max(floats, paddedFloats);
        return (int)Math.Max(1, (most + PieceFloats - 1) / PieceFloats);
    }
}
