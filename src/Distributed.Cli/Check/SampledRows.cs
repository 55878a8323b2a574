namespace Distributed.Cli.Check;

/// <summary>
/// Which rows a rank checks against the sampled references: the first and last token of each of its ranges
/// (in batch 0 and in batch B−1), plus <c>extra</c> tokens drawn uniformly from its ranges, each in a batch drawn
/// uniformly from [0, B), deterministic from the seed.
/// </summary>
internal static class SampledRows
{
    /// <summary>
    /// The rows, sorted by (batch, token) and distinct, with each token's position in the concatenation of
    /// <paramref name="ranges"/> (the local index). Random draws that repeat a row are retried a bounded number
    /// of times, so fewer than <paramref name="extra"/> extra rows come back only when the ranges are nearly exhausted.
    /// </summary>
    /// <param name="ranges">The rank's global token ranges, in local order (as <c>Sharding.Ranges</c> gives them).</param>
    /// <param name="batch">Batch size B.</param>
    /// <param name="seed">Seed of the draws (mix in the rank for different rows per rank).</param>
    /// <param name="extra">How many random rows to add.</param>
    public static IReadOnlyList<SampledRow> Choose(IReadOnlyList<(int Start, int Count)> ranges, int batch, ulong seed, int extra)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        ArgumentOutOfRangeException.ThrowIfLessThan(batch, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(extra);
        var offsets = new int[ranges.Count];
        int localTokens = 0;
        for (int i = 0; i < ranges.Count; i++)
        {
            if (ranges[i].Start < 0 || ranges[i].Count < 0)
                throw new ArgumentOutOfRangeException(nameof(ranges), $"Range {i} {ranges[i]} has a negative start or count.");
            offsets[i] = localTokens;
            localTokens = checked(localTokens + ranges[i].Count);
        }
        var chosen = new SortedSet<(int Batch, int Local)>();
        for (int i = 0; i < ranges.Count; i++)
        {
            if (ranges[i].Count == 0) continue;
            foreach (int local in (ReadOnlySpan<int>)[offsets[i], offsets[i] + ranges[i].Count - 1])
            {
                chosen.Add((0, local));
                chosen.Add((batch - 1, local));
            }
        }
        if (localTokens > 0)
        {
            ulong state = seed;
            int added = 0;
            for (long attempt = 0; added < extra && attempt < 4L * extra + 64; attempt++)
            {
                int local = (int)(Next(ref state) % (ulong)localTokens);
                int b = (int)(Next(ref state) % (ulong)batch);
                if (chosen.Add((b, local))) added++;
            }
        }
        var result = new List<SampledRow>(chosen.Count);
        foreach (var (b, local) in chosen)
        {
            int i = Array.FindLastIndex(offsets, o => o <= local);
            while (ranges[i].Count == 0) i--; // empty ranges share the offset of the next one
            result.Add(new SampledRow(b, ranges[i].Start + (local - offsets[i]), local));
        }
        result.Sort((x, y) => x.Batch != y.Batch ? x.Batch.CompareTo(y.Batch) : x.Token.CompareTo(y.Token));
        for (int r = 1; r < result.Count; r++)
            if (result[r].Row == result[r - 1].Row)
                throw new ArgumentException($"The ranges overlap: token {result[r].Token} appears twice.", nameof(ranges));
        return result;
    }

    /// <summary>SplitMix64.</summary>
    private static ulong Next(ref ulong state)
    {
        ulong z = state += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
