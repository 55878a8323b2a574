namespace Distributed.Schemes;

/// <summary>
/// Host staging arrays at the communicator boundary: grown when a step needs more, then reused. A
/// communicator moves a <c>Span&lt;float&gt;</c> (at most 2^31 − 1 floats) per call, so a scheme that must
/// move more splits the transfer into pieces of at most <see cref="PieceFloats"/> floats each (which
/// also bounds its staging memory).
/// </summary>
internal static class HostBuffer
{
    /// <summary>The most floats one staged collective moves: 4M floats, 16 MiB (all-gather KV: 4K tokens at Hk·(D+Dv) = 1024).</summary>
    public const long DefaultPieceFloats = 1L << 22;

    /// <summary>Tests lower the piece size for the ranks they start (it flows to their threads).</summary>
    internal static readonly AsyncLocal<long> PieceOverride = new();

    /// <summary>The most floats one staged collective moves.</summary>
    public static long PieceFloats => PieceOverride.Value > 0 ? PieceOverride.Value : DefaultPieceFloats;

    /// <summary>Makes <paramref name="buffer"/> hold at least <paramref name="length"/> floats (contents not kept).</summary>
    /// <exception cref="InvalidOperationException">More than one managed array can hold: the caller must split.</exception>
    public static void Grow(ref float[] buffer, long length)
    {
        if (buffer.Length >= length) return;
        if (length > Array.MaxLength)
            throw new InvalidOperationException($"A host staging buffer of {length} floats is more than one array holds ({Array.MaxLength}); the transfer must be split into pieces.");
        buffer = []; // let the old array go before the new one is allocated
        buffer = GC.AllocateUninitializedArray<float>((int)length);
    }

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
