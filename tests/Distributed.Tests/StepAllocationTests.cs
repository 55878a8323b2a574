using Distributed.Cluster;
using Distributed.Kernels.Cpu;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// Steady-state steps allocate (almost) no managed memory: after two warm-up steps, a forward+backward step of
/// every scheme on 4 in-process ranks allocates less than 1 MB of managed memory per rank (the runtime's
/// process-wide counter, divided by the ranks).
/// </summary>
[Collection(nameof(ProcessMemoryCollection))]
public sealed class StepAllocationTests(ITestOutputHelper output)
{
    public static TheoryData<string, AttentionKind, ParallelScheme> Schemes() => new()
    {
        { "lasp2", AttentionKind.Lightning, ParallelScheme.Lasp2 },
        { "allgather", AttentionKind.Softmax, ParallelScheme.AllGather },
        { "ring", AttentionKind.Softmax, ParallelScheme.Ring },
        { "partial", AttentionKind.Softmax, ParallelScheme.Partial },
        { "ulysses softmax", AttentionKind.Softmax, ParallelScheme.Ulysses },
        { "ulysses lightning", AttentionKind.Lightning, ParallelScheme.Ulysses },
        { "hybrid softmax", AttentionKind.Softmax, ParallelScheme.Hybrid },
        { "hybrid lightning", AttentionKind.Lightning, ParallelScheme.Hybrid },
    };

    [Theory]
    [MemberData(nameof(Schemes))]
    public void ASteadyStateStep_AllocatesUnder1MbOfManagedMemoryPerRank(string name, AttentionKind kind, ParallelScheme scheme)
    {
        const int ranks = 4, steps = 3;
        var shape = new AttentionShape(1, 4096, 8, 8, 32, 32);
        var options = new SequenceParallelOptions
        {
            Attention = kind, Scheme = scheme, Causal = true, UlyssesDegree = scheme == ParallelScheme.Hybrid ? 2 : 0,
            Decay = kind == AttentionKind.Lightning ? SequenceParallelAttention.DefaultDecay(8) : null,
        };
        using var start = new Barrier(ranks);
        long[] before = new long[1], after = new long[1];
        InProcessCommunicator.Run(ranks, comm =>
        {
            using var backend = new CpuBackend(1);
            using var a = new SequenceParallelAttention(comm, backend, shape, options);
            using var q = a.AllocateLocal(8, 32);
            using var k = a.AllocateLocal(8, 32);
            using var v = a.AllocateLocal(8, 32);
            using var o = a.AllocateLocal(8, 32);
            using var dO = a.AllocateLocal(8, 32);
            using var dQ = a.AllocateLocal(8, 32);
            using var dK = a.AllocateLocal(8, 32);
            using var dV = a.AllocateLocal(8, 32);
            for (int step = 0; step < 2 + steps; step++)
            {
                if (step == 2)
                {
                    start.SignalAndWait();
                    if (comm.Rank == 0) before[0] = GC.GetTotalAllocatedBytes(precise: true);
                    start.SignalAndWait();
                }
                a.Forward(q, k, v, o);
                a.Backward(dO, dQ, dK, dV);
            }
            start.SignalAndWait();
            if (comm.Rank == 0) after[0] = GC.GetTotalAllocatedBytes(precise: true);
            start.SignalAndWait();
            return 0;
        }, TimeSpan.FromSeconds(120));
        double perRankStep = (after[0] - before[0]) / (double)ranks / steps;
        output.WriteLine($"{name}: {perRankStep / 1024:F1} KiB of managed memory per rank and step");
        Assert.True(perRankStep < 1 << 20, $"{name}: {perRankStep / (1 << 20):F2} MiB per rank and step");
    }
}
