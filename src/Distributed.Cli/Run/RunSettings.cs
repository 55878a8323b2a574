using System.Globalization;

namespace Distributed.Cli.Run;

/// <summary>One attention job of a run: which family and which parallel scheme.</summary>
internal sealed record JobSpec(AttentionKind Attention, ParallelScheme Scheme, bool Causal, string DecaySpec);

/// <summary>The shape options as given on the command line (null: not given).</summary>
internal sealed record ShapeOptions(int? Batch, int? SeqLen, int? Heads, int? KvHeads, int? HeadDim, int? ValueDim);

/// <summary>How <c>--check</c> verifies a run.</summary>
internal enum CheckMode
{
    /// <summary>No check.</summary>
    None,
    /// <summary>An independent fp64 reference, computed from the inputs on sampled rows (cost small at any N).</summary>
    Sampled,
    /// <summary>Rank 0 reruns the same kernels over the whole sequence on one device.</summary>
    Full,
}

/// <summary>The .npy files a run reads and writes (null: synthetic inputs, no output written).</summary>
internal sealed record RunFiles
{
    /// <summary>Q <c>[B, N, H, D]</c>.</summary>
    public string? Q { get; init; }

    /// <summary>K <c>[B, N, Hk, D]</c>.</summary>
    public string? K { get; init; }

    /// <summary>V <c>[B, N, Hk, Dv]</c>.</summary>
    public string? V { get; init; }

    /// <summary>dO <c>[B, N, H, Dv]</c> (backward).</summary>
    public string? DOut { get; init; }

    /// <summary>O <c>[B, N, H, Dv]</c> is written here.</summary>
    public string? Out { get; init; }

    /// <summary>LSE <c>[B, H, N]</c> is written here (softmax).</summary>
    public string? Lse { get; init; }

    /// <summary>Gradients go to PREFIX.dq.npy, PREFIX.dk.npy, PREFIX.dv.npy.</summary>
    public string? GradsPrefix { get; init; }

    /// <summary>True when the inputs come from files.</summary>
    public bool HasInputs => Q is not null;

    /// <summary>Every output path this run writes, by tensor name.</summary>
    public IReadOnlyList<(string Tensor, string Path)> Outputs
    {
        get
        {
            var list = new List<(string, string)>();
            if (Out is not null) list.Add(("O", Out));
            if (Lse is not null) list.Add(("LSE", Lse));
            if (GradsPrefix is not null)
            {
                list.Add(("dQ", GradsPrefix + ".dq.npy"));
                list.Add(("dK", GradsPrefix + ".dk.npy"));
                list.Add(("dV", GradsPrefix + ".dv.npy"));
            }
            return list;
        }
    }
}

/// <summary>Everything <c>dsattn run</c> was asked to do, after parsing and validation.</summary>
internal sealed record RunSettings
{
    public required IReadOnlyList<JobSpec> Jobs { get; init; }
    public int Ranks { get; init; } = 4;
    public int Batch { get; init; } = 1;
    public int SeqLen { get; init; } = 8192;
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
    /// <summary>--warmup: untimed steps before the timed <see cref="Iterations"/>.</summary>
    public int Warmup { get; init; }
    public CheckMode Check { get; init; }
    /// <summary>--check-finite: scan the inputs for NaN and ±Inf before the first step.</summary>
    public bool CheckFinite { get; init; }
    public int CheckRows { get; init; } = 8;
    public double Tolerance { get; init; } = 1e-4;
    public int FailRank { get; init; } = -1;
    public string FailAt { get; init; } = "start";
    public string? JsonPath { get; init; }
    public bool Progress { get; init; } = true;
    /// <summary>--control-plane: null = default (on under MPI).</summary>
    public bool? ControlPlane { get; init; }
    /// <summary>--hang-timeout in seconds; null = not given (300 s under MPI, no limit in-process).</summary>
    public double? HangTimeout { get; init; }
    public string CoordinatorBind { get; init; } = "127.0.0.1";
    public RunFiles Files { get; init; } = new();
    /// <summary>--link-bandwidth / --link-latency: an emulated slower network; null = the real one.</summary>
    public Distributed.Cluster.EmulatedLink? Link { get; init; }
    /// <summary>False with --no-overlap.</summary>
    public bool Overlap { get; init; } = true;

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
