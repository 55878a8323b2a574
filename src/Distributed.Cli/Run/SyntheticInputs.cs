namespace Distributed.Cli.Run;

/// <summary>
/// Deterministic inputs that any rank can generate for any global row without the others: element
/// values are a hash of (seed, tensor, global index), so a rank materialises only its own shard and
/// rank 0 can rebuild the whole sequence for the single-device check.
/// </summary>
internal static class SyntheticInputs
{
    public const int Query = 1, Key = 2, Values = 3, OutputGradient = 4;

    /// <summary>
    /// Fills <paramref name="local"/> (<c>[B, Σcounts, rowWidth]</c>) with the rows of a global
    /// <c>[B, seqLen, rowWidth]</c> tensor that the ranges name, in range order.
    /// </summary>
    public static void Fill(Span<float> local, int tensor, ulong seed, int batch, int seqLen, int rowWidth,
        IReadOnlyList<(int Start, int Count)> ranges, float amplitude)
    {
        int localTokens = 0;
        foreach (var r in ranges) localTokens += r.Count;
        if (local.Length != (long)batch * localTokens * rowWidth)
            throw new ArgumentException($"Expected {(long)batch * localTokens * rowWidth} elements, got {local.Length}.", nameof(local));
        int dst = 0;
        for (int b = 0; b < batch; b++)
        {
            foreach (var (start, count) in ranges)
            {
                long globalBase = ((long)b * seqLen + start) * rowWidth;
                int n = count * rowWidth;
                for (int i = 0; i < n; i++) local[dst + i] = amplitude * Value(seed, tensor, globalBase + i);
                dst += n;
            }
        }
    }

    /// <summary>A value in [-1, 1) from SplitMix64 of (seed, tensor, index).</summary>
    public static float Value(ulong seed, int tensor, long index)
    {
        ulong z = seed * 0x9E3779B97F4A7C15UL ^ ((ulong)tensor << 56) ^ (ulong)index;
        z += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        z ^= z >> 31;
        return (float)((z >> 40) * (1.0 / (1UL << 24)) * 2.0 - 1.0);
    }
}
