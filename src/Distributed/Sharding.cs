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

    /// <summary>
    /// Local tokens <c>[localStart, localEnd)</c> of a rank owning <paramref name="ranges"/> (in local order),
    /// as runs of consecutive global tokens: (first local token, first global token, count).
    /// </summary>
    internal static List<(int Local, int Global, int Count)> LocalToGlobal(IReadOnlyList<(int Start, int Count)> ranges, int localStart, int localEnd)
    {
        var runs = new List<(int, int, int)>(ranges.Count);
        int offset = 0;
        foreach (var (start, count) in ranges)
        {
            int lo = Math.Max(localStart, offset), hi = Math.Min(localEnd, offset + count);
            if (lo < hi) runs.Add((lo, start + lo - offset, hi - lo));
            offset += count;
        }
        return runs;
    }

    /// <summary>Chunk <paramref name="index"/> of <paramref name="chunks"/> equal-as-possible chunks of N tokens.</summary>
    public static (int Start, int Count) Chunk(int seqLen, int chunks, int index)
    {
        int start = (int)((long)index * seqLen / chunks);
        int end = (int)((long)(index + 1) * seqLen / chunks);
        return (start, end - start);
    }

    /// <summary>
    /// Element offset of row <paramref name="token"/>, column <paramref name="column"/> of batch
    /// <paramref name="batch"/> in a global row-major <c>[B, N, rowWidth]</c> array: 64-bit, exact for any
    /// shape whose element count fits a <c>long</c> (the count itself may pass 2^31).
    /// </summary>
    public static long GlobalOffset(int batch, int token, int column, int seqLen, int rowWidth) =>
        ((long)batch * seqLen + token) * rowWidth + column;

    /// <summary>
    /// The contiguous runs a copy between a global <c>[B, N, rowWidth]</c> array and a rank's local
    /// <c>[B, Σ counts, rowWidth]</c> array consists of, in local order: for each batch, one run per range.
    /// Offsets and lengths are in elements and 64-bit, so the global array may be larger than any one
    /// managed array (a file, native memory, a device buffer); multiply by 4 for byte offsets of fp32.
    /// </summary>
    /// <exception cref="ArgumentException">A range outside the sequence, or a non-positive dimension.</exception>
    public static IReadOnlyList<ShardSegment> Segments(int batch, int seqLen, int rowWidth, IReadOnlyList<(int Start, int Count)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        long tokens = CheckRanges(batch, seqLen, rowWidth, ranges);
        var result = new List<ShardSegment>(batch * ranges.Count);
        long local = 0;
        for (int b = 0; b < batch; b++)
            foreach (var (start, count) in ranges)
            {
                long length = (long)count * rowWidth;
                result.Add(new ShardSegment(GlobalOffset(b, start, 0, seqLen, rowWidth), local, length));
                local += length;
            }
        System.Diagnostics.Debug.Assert(local == batch * tokens * rowWidth);
        return result;
    }

    /// <summary>
    /// Copies this rank's rows out of a global row-major <c>[B, N, rowWidth]</c> array into a local
    /// <c>[B, Σ counts, rowWidth]</c> array, ranges in order.
    /// </summary>
    public static void TakeLocal(ReadOnlySpan<float> global, Span<float> local, int batch, int seqLen, int rowWidth, IReadOnlyList<(int Start, int Count)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        Check(global.Length, local.Length, batch, seqLen, rowWidth, ranges);
        foreach (var s in Segments(batch, seqLen, rowWidth, ranges))
            global.Slice((int)s.GlobalOffset, (int)s.Length).CopyTo(local.Slice((int)s.LocalOffset, (int)s.Length));
    }

    /// <summary>The inverse of <see cref="TakeLocal"/>: writes the local rows back into the global array.</summary>
    public static void PutLocal(ReadOnlySpan<float> local, Span<float> global, int batch, int seqLen, int rowWidth, IReadOnlyList<(int Start, int Count)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        Check(global.Length, local.Length, batch, seqLen, rowWidth, ranges);
        foreach (var s in Segments(batch, seqLen, rowWidth, ranges))
            local.Slice((int)s.LocalOffset, (int)s.Length).CopyTo(global.Slice((int)s.GlobalOffset, (int)s.Length));
    }

    private static long CheckRanges(int batch, int seqLen, int rowWidth, IReadOnlyList<(int Start, int Count)> ranges)
    {
        if (batch < 0 || seqLen < 0 || rowWidth < 0)
            throw new ArgumentException($"[B={batch}, N={seqLen}, {rowWidth}] has a negative dimension.", nameof(batch));
        long tokens = 0;
        foreach (var (start, count) in ranges)
        {
            if (start < 0 || count < 0 || (long)start + count > seqLen)
                throw new ArgumentException($"Range [{start}, {(long)start + count}) is outside the sequence of {seqLen} tokens.", nameof(ranges));
            tokens += count;
        }
        return tokens;
    }

    private static void Check(long globalLength, long localLength, int batch, int seqLen, int rowWidth, IReadOnlyList<(int Start, int Count)> ranges)
    {
        long tokens = CheckRanges(batch, seqLen, rowWidth, ranges);
        if (globalLength != (long)batch * seqLen * rowWidth)
            throw new ArgumentException($"The global array has {globalLength} floats; [B={batch}, N={seqLen}, {rowWidth}] needs {(long)batch * seqLen * rowWidth}.", "global");
        if (localLength != batch * tokens * rowWidth)
            throw new ArgumentException($"The local array has {localLength} floats; [B={batch}, {tokens} tokens, {rowWidth}] needs {batch * tokens * rowWidth}.", "local");
    }
}

/// <summary>One contiguous run of a shard copy: elements <c>[GlobalOffset, GlobalOffset + Length)</c> of the
/// global array are elements <c>[LocalOffset, LocalOffset + Length)</c> of the local one.</summary>
/// <param name="GlobalOffset">Element offset in the global <c>[B, N, rowWidth]</c> array.</param>
/// <param name="LocalOffset">Element offset in the local <c>[B, Σ counts, rowWidth]</c> array.</param>
/// <param name="Length">Elements in the run.</param>
public readonly record struct ShardSegment(long GlobalOffset, long LocalOffset, long Length);
