namespace Distributed.Cli.Train;

/// <summary>
/// SplitMix64 (Steele, Lea and Flood 2014): a tiny generator whose output depends only on its seed, so every
/// rank, every rank count and every .NET version draws the same weights and the same sequences.
/// </summary>
internal struct SplitMix64(ulong seed)
{
    private ulong _state = seed;

    /// <summary>A seed for stream <paramref name="stream"/> of <paramref name="seed"/>: streams do not overlap in practice.</summary>
    public static ulong Mix(ulong seed, ulong stream)
    {
        var g = new SplitMix64(seed ^ (stream * 0xD1B54A32D192ED03UL));
        g.Next();
        return g.Next();
    }

    public ulong Next()
    {
        ulong z = _state += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    /// <summary>Uniform in [0, n).</summary>
    public int NextInt(int n) => (int)((Next() >> 33) % (ulong)n);

    /// <summary>Uniform in (0, 1).</summary>
    public double NextDouble() => ((Next() >> 11) + 0.5) / (1UL << 53);

    /// <summary>Standard normal (Box–Muller).</summary>
    public double NextNormal() => Math.Sqrt(-2 * Math.Log(NextDouble())) * Math.Cos(2 * Math.PI * NextDouble());
}
