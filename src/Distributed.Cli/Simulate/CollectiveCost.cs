namespace Distributed.Cli.Simulate;

/// <summary>
/// Alpha-beta costs, in seconds, of the collectives the schemes use, over <c>P</c> ranks placed in order
/// on nodes of <c>g</c> GPUs (ranks 0..g−1 on node 0, …). A collective whose ranks span more than one node
/// runs at the inter-node link's pace (a ring through every rank crosses a NIC at each step, and the slowest
/// link sets each step's time). Formulas (b = bytes):
/// <list type="bullet">
/// <item>all-gather, b per rank in (ring): <c>(P−1)·(α + b/β)</c>; reduce-scatter, b per rank out: the same;</item>
/// <item>all-to-all, b per rank in total: <c>(P−1)·α + max(b·(g'−1)/P / β_intra, b·(P−g')/P / β_inter)</c>
/// with <c>g' = min(g, P)</c> (the intra-node share on NVLink and the rest on the NIC, in parallel);</item>
/// <item>one send/receive of b: <c>α + b/β</c> on the link between the two ranks;</item>
/// <item>a serial chain of b over ranks 0 → P−1: the sum of its P−1 hops, <c>⌈P/g⌉−1</c> of them inter-node
/// (stride 1).</item>
/// </list>
/// </summary>
/// <param name="hardware">The links.</param>
/// <param name="ranks">P, the ranks of the group.</param>
/// <param name="stride">Group rank i sits at global rank i·stride (a hybrid's cross-group ranks); 1 for a plain group.</param>
internal sealed class CollectiveCost(ClusterPreset hardware, int ranks, int stride = 1)
{
    /// <summary>P.</summary>
    public int Ranks => ranks;

    /// <summary>Whether the group spans more than one node.</summary>
    public bool SpansNodes => Node(ranks - 1) != Node(0);

    private int Node(int groupRank) => groupRank * stride / hardware.GpusPerNode;

    /// <summary>The link that paces a collective over the whole group.</summary>
    public Link Pacing => SpansNodes ? hardware.Inter : hardware.Intra;

    /// <summary>Ring all-gather: every rank contributes <paramref name="bytesPerRank"/>.</summary>
    public double AllGather(double bytesPerRank) => ranks <= 1 ? 0 : (ranks - 1) * Pacing.Message(bytesPerRank);

    /// <summary>Ring reduce-scatter: every rank ends with <paramref name="bytesPerRankOut"/>.</summary>
    public double ReduceScatter(double bytesPerRankOut) => AllGather(bytesPerRankOut);

    /// <summary>All-to-all: every rank holds <paramref name="bytesPerRank"/> in total, 1/P of it for each rank.</summary>
    public double AllToAll(double bytesPerRank)
    {
        if (ranks <= 1) return 0;
        int local = Math.Min(ranks, Math.Max(1, hardware.GpusPerNode / stride));
        double intra = bytesPerRank * (local - 1) / ranks / hardware.Intra.BytesPerSecond;
        double inter = bytesPerRank * (ranks - local) / ranks / hardware.Inter.BytesPerSecond;
        return (ranks - 1) * Pacing.AlphaSeconds + Math.Max(intra, inter);
    }

    /// <summary>One step of a ring exchange (every rank sends <paramref name="bytes"/> to its successor at once).</summary>
    public double RingStep(double bytes) => ranks <= 1 ? 0 : Pacing.Message(bytes);

    /// <summary>Hops of a serial chain through all ranks that cross a node boundary.</summary>
    public int InterNodeHops => Enumerable.Range(0, Math.Max(0, ranks - 1)).Count(i => Node(i + 1) != Node(i));

    /// <summary>A serial chain through all P ranks, one message of <paramref name="bytes"/> per hop.</summary>
    public double SerialChain(double bytes)
    {
        if (ranks <= 1) return 0;
        int inter = InterNodeHops;
        return (ranks - 1 - inter) * hardware.Intra.Message(bytes) + inter * hardware.Inter.Message(bytes);
    }
}
