using Distributed.Schemes;

namespace Distributed;

/// <summary>
/// What one rank of a scheme holds, in floats: the caller's local tensors, the scheme's device tensors and
/// its host staging, and the largest single buffer or collective (which must fit one array unless the
/// scheme stages in pieces). Counted from the same sizes the schemes allocate; each scheme's descriptor
/// (<see cref="SchemeDescriptor.Estimate"/>) gives its own part from the <see cref="EstimateSizes"/>.
/// </summary>
internal readonly record struct MemoryEstimate(long CallerFloats, long SchemeFloats, long StagingFloats, long LargestSingleFloats)
{
    public long TotalBytes => (CallerFloats + SchemeFloats + StagingFloats) * sizeof(float);

    public static MemoryEstimate For(AttentionShape s, SequenceParallelOptions o, int ranks, ShardLayout layout) =>
        SchemeRegistry.Get(o.Scheme).Estimate(s, o, ranks, layout);
}

/// <summary>The sizes every estimate starts from, 64-bit.</summary>
internal readonly record struct EstimateSizes
{
    public EstimateSizes(AttentionShape s, int ranks, ShardLayout layout)
    {
        B = s.Batch; N = s.SeqLen; H = s.Heads; Hk = s.KvHeads; D = s.HeadDim; Dv = s.ValueDim;
        QRow = H * D; KRow = Hk * D; VRow = Hk * Dv; ORow = H * Dv;
        Chunks = layout == ShardLayout.Zigzag ? 2 * ranks : ranks;
        // The longest shard: ⌈N / chunks⌉ tokens per chunk, one or two chunks per rank.
        T = (N + Chunks - 1) / Chunks * (Chunks / ranks);
        CopiedParts = layout == ShardLayout.Zigzag && s.Batch > 1; // zigzag parts are views only when B = 1
        Caller = B * T * 2 * (QRow + KRow + VRow + ORow);           // q, k, v, o, dO, dQ, dK, dV
    }

    public long B { get; }
    public long N { get; }
    public long H { get; }
    public long Hk { get; }
    public long D { get; }
    public long Dv { get; }
    public long QRow { get; }
    public long KRow { get; }
    public long VRow { get; }
    public long ORow { get; }
    public int Chunks { get; }
    /// <summary>The longest local shard, in tokens.</summary>
    public long T { get; }
    /// <summary>Whether zigzag parts are device copies rather than views.</summary>
    public bool CopiedParts { get; }
    /// <summary>The caller's q, k, v, o, dO, dQ, dK, dV.</summary>
    public long Caller { get; }
}
