namespace Distributed;

/// <summary>
/// How the global sequence is cut into per-rank shards, and host helpers that move a rank's rows between a
/// global array and its local one. Shards may be uneven: chunk boundaries are <c>⌊i·N/chunks⌋</c>.
/// </summary>
public static class Sharding
{
    /// <summary>
    /// The global token ranges rank <paramref name="rank"/> of <paramref name="ranks"/> owns, in local order.
    /// Contiguous: one chunk of the P chunks. Zigzag: chunks r and 2P−1−r of 2P chunks, so causal work
    /// (which grows along the sequence) is balanced across ranks.
    /// </summary>
    /// <exception cref="ArgumentException">Fewer tokens than chunks.</exception>
    public static IReadOnlyList<(int Start, int Count)> Ranges(int seqLen, int ranks, int rank, ShardLayout layout)
    {
        int chunks = layout == ShardLayout.Zigzag ? 2 * ranks : ranks;
        if (seqLen < chunks)
            throw new ArgumentException($"seqLen {seqLen} is shorter than the {chunks} chunks a {layout.ToString().ToLowerInvariant()} layout over {ranks} ranks needs; use a longer sequence or fewer ranks.", nameof(seqLen));
        return layout == ShardLayout.Zigzag
            ? [Chunk(seqLen, chunks, rank), Chunk(seqLen, chunks, chunks - 1 - rank)]
            : [Chunk(seqLen, chunks, rank)];
    }

    /// <summary>The ranges of every rank, indexed by rank (what each scheme needs to place other ranks' rows).</summary>
    internal static IReadOnlyList<(int Start, int Count)>[] AllRanges(int seqLen, int ranks, ShardLayout layout) =>
        Enumerable.Range(0, ranks).Select(r => Ranges(seqLen, ranks, r, layout)).ToArray();

    /// <summary>Tokens per rank: Σ of each rank's range counts.</summary>
    internal static int[] TokenCounts(IReadOnlyList<(int Start, int Count)>[] rankRanges) =>
        rankRanges.Select(rs => rs.Sum(x => x.Count)).ToArray();

    /// <summary>Chunk <paramref name="index"/> of <paramref name="chunks"/> equal-as-possible chunks of N tokens.</summary>
    public static (int Start, int Count) Chunk(int seqLen, int chunks, int index)
    {
        int start = (int)((long)index * seqLen / chunks);
        int end = (int)((long)(index + 1) * seqLen / chunks);
        return (start, end - start);
    }

    /// <summary>
    /// Copies this rank's rows out of a global row-major <c>[B, N, rowWidth]</c> array into a local
    /// <c>[B, Σ counts, rowWidth]</c> array, ranges in order.
    /// </summary>
    public static void TakeLocal(ReadOnlySpan<float> global, Span<float> local, int batch, int seqLen, int rowWidth, IReadOnlyList<(int Start, int Count)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        int tokens = Check(global.Length, local.Length, batch, seqLen, rowWidth, ranges);
        for (int b = 0; b < batch; b++)
        {
            int dst = b * tokens * rowWidth;
            foreach (var (start, count) in ranges)
            {
                global.Slice((b * seqLen + start) * rowWidth, count * rowWidth).CopyTo(local.Slice(dst, count * rowWidth));
                dst += count * rowWidth;
            }
        }
    }

    /// <summary>The inverse of <see cref="TakeLocal"/>: writes the local rows back into the global array.</summary>
    public static void PutLocal(ReadOnlySpan<float> local, Span<float> global, int batch, int seqLen, int rowWidth, IReadOnlyList<(int Start, int Count)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        int tokens = Check(global.Length, local.Length, batch, seqLen, rowWidth, ranges);
        for (int b = 0; b < batch; b++)
        {
            int src = b * tokens * rowWidth;
            foreach (var (start, count) in ranges)
            {
                local.Slice(src, count * rowWidth).CopyTo(global.Slice((b * seqLen + start) * rowWidth, count * rowWidth));
                src += count * rowWidth;
            }
        }
    }

    private static int Check(int globalLength, int localLength, int batch, int seqLen, int rowWidth, IReadOnlyList<(int Start, int Count)> ranges)
    {
        int tokens = 0;
        foreach (var (start, count) in ranges)
        {
            if (start < 0 || count < 0 || start + count > seqLen)
                throw new ArgumentException($"Range [{start}, {start + count}) is outside the sequence of {seqLen} tokens.", nameof(ranges));
            tokens += count;
        }
        if (globalLength != (long)batch * seqLen * rowWidth)
            throw new ArgumentException($"The global array has {globalLength} floats; [B={batch}, N={seqLen}, {rowWidth}] needs {(long)batch * seqLen * rowWidth}.", "global");
        if (localLength != (long)batch * tokens * rowWidth)
            throw new ArgumentException($"The local array has {localLength} floats; [B={batch}, {tokens} tokens, {rowWidth}] needs {(long)batch * tokens * rowWidth}.", "local");
        return tokens;
    }
}
