using System.Globalization;

namespace Distributed.Cli.Run;

/// <summary>One attention job of a run: which family and which parallel scheme.</summary>
internal sealed record JobSpec(AttentionKind Attention, ParallelScheme Scheme, bool Causal, string DecaySpec);

/// <summary>Everything <c>dsattn run</c> was asked to do, after parsing and validation.</summary>
internal sealed record RunSettings
{
    public required IReadOnlyList<JobSpec> Jobs { get; init; }
    public int Ranks { get; init; } = 4;
    public int Batch { get; init; } = 1;
    public int SeqLen { get; init; } = 32768;
    public int Heads { get; init; } = 8;
    public int KvHeads { get; init; } = 8;
    public int HeadDim { get; init; } = 64;
    public int ValueDim { get; init; } = 64;
    public ShardLayout? Layout { get; init; }
    public int UlyssesDegree { get; init; }
    public ParallelScheme HybridSequenceScheme { get; init; } = ParallelScheme.AllGather;
    public bool Backward { get; init; }
    public string Backend { get; init; } = "auto";
    public int? Device { get; init; }
    public ulong Seed { get; init; } = 1234;
    public int Iterations { get; init; } = 1;
    public bool Check { get; init; }
    public double Tolerance { get; init; } = 1e-4;
    public int FailRank { get; init; } = -1;
    public string? JsonPath { get; init; }

    /// <summary>
    /// Parses <c>--decay</c>: <c>none</c>, <c>auto</c> (TransNormerLLM slopes), one λ for every head, or
    /// a comma-separated λ per head. Returns null for no decay.
    /// </summary>
    public static float[]? ParseDecay(string spec, int heads)
    {
        ArgumentNullException.ThrowIfNull(spec);
        string s = spec.Trim().ToLowerInvariant();
        if (s is "none" or "" or "1") return null;
        if (s == "auto") return SequenceParallelAttention.DefaultDecay(heads);
        string[] parts = s.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        var values = new float[parts.Length];
        for (int i = 0; i < parts.Length; i++)
        {
            if (!float.TryParse(parts[i], NumberStyles.Float, CultureInfo.InvariantCulture, out values[i]) || !(values[i] > 0f && values[i] <= 1f))
                throw new ArgumentException($"--decay: '{parts[i]}' is not a decay λ in (0, 1]. Use none, auto, one λ such as 0.99, or one λ per head separated by commas.", "decay");
        }
        if (values.Length == 1) return Enumerable.Repeat(values[0], heads).ToArray();
        if (values.Length != heads)
            throw new ArgumentException($"--decay lists {values.Length} values but there are {heads} heads. Give one λ, or exactly one per head.", "decay");
        return values;
    }
}
