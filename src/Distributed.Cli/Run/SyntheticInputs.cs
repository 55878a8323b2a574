namespace Distributed.Cli.Run;

/// <summary>
/// Deterministic inputs that any rank can generate for any global row without the others: element
/// values are a hash of (seed, tensor, global index), so a rank materialises only its own shard and the
/// checks can read any row (<see cref="Check.SyntheticTokenRows"/>).
/// </summary>
internal static class SyntheticInputs
{
    public const int Query = 1, Key = 2, Values = 3, OutputGradient = 4;

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
