using Distributed.Cluster;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>Runs alone: it measures the allocations of the whole process.</summary>
[CollectionDefinition(nameof(ProcessMemoryCollection), DisableParallelization = true)]
public sealed class ProcessMemoryCollection;

/// <summary>
/// 64-bit sizes: shard arithmetic past 2^31 elements (proved on index arithmetic, nothing that large is
/// allocated), the per-rank memory estimate, and the refusal of a shape no rank can hold.
/// </summary>
public sealed class LargeShapeTests
{
    [Fact]
    public void GlobalOffset_Is64Bit_PastTwoToThe31Elements()
    {
        const int n = int.MaxValue, w = 1024;
        Assert.Equal(((long)n - 1) * w + (w - 1), Sharding.GlobalOffset(0, n - 1, w - 1, n, w));
        Assert.Equal((3L * n + 5) * w + 7, Sharding.GlobalOffset(3, 5, 7, n, w));
        Assert.True(Sharding.GlobalOffset(1, 0, 0, n, w) > int.MaxValue);
    }

    [Theory]
    [InlineData(ShardLayout.Contiguous)]
    [InlineData(ShardLayout.Zigzag)]
    public void Segments_AtNearTwoToThe31Tokens_WithBNWPastTwoToThe31_AreExact(ShardLayout layout)
    {
        // B·N·W = 2 · (2^31 − 1) · 1024 ≈ 2^42 elements: the runs of every rank, as 64-bit element offsets.
        const int b = 2, n = int.MaxValue, w = 1024, p = 4;
        long covered = 0;
        for (int r = 0; r < p; r++)
        {
            var ranges = Sharding.Ranges(n, p, r, layout);
            var segments = Sharding.Segments(b, n, w, ranges);
            Assert.Equal(b * ranges.Count, segments.Count);
            long local = 0;
            int i = 0;
            for (int bb = 0; bb < b; bb++)
                foreach (var (start, count) in ranges)
                {
                    var s = segments[i++];
                    Assert.Equal(((long)bb * n + start) * w, s.GlobalOffset);
                    Assert.Equal(local, s.LocalOffset);
                    Assert.Equal((long)count * w, s.Length);
                    Assert.True(s.GlobalOffset + s.Length <= (long)b * n * w);
                    local += s.Length;
                }
            covered += local;
        }
        Assert.Equal((long)b * n * w, covered); // every element exactly once over the ranks
    }

    [Fact]
    public void TakeLocalAndPutLocal_SmallShards_RoundTripThroughSegments()
    {
        const int b = 2, n = 37, w = 3;
        var global = Enumerable.Range(0, b * n * w).Select(i => (float)i).ToArray();
        var back = new float[global.Length];
        for (int r = 0; r < 3; r++)
        {
            var ranges = Sharding.Ranges(n, 3, r, ShardLayout.Zigzag);
            var local = new float[b * ranges.Sum(x => x.Count) * w];
            Sharding.TakeLocal(global, local, b, n, w, ranges);
            foreach (var s in Sharding.Segments(b, n, w, ranges))
                for (long e = 0; e < s.Length; e++) Assert.Equal(global[s.GlobalOffset + e], local[s.LocalOffset + e]);
            Sharding.PutLocal(local, back, b, n, w, ranges);
        }
        Assert.Equal(global, back);
    }

    [Fact]
    public void EstimateBytesPerRank_AllGather_CountsShardsGatheredKvAndStaging()
    {
        // N = 16K, P = 4, H = Hk = 8, D = Dv = 64: 8 local shards of 4096 tokens · 512 floats (64 MiB),
        // gathered K, V, dK, dV of 16K tokens (128 MiB), host staging about 80 MiB.
        var shape = new AttentionShape(1, 16384, 8, 8, 64, 64);
        var options = new SequenceParallelOptions { Scheme = ParallelScheme.AllGather };
        long bytes = SequenceParallelAttention.EstimateBytesPerRank(shape, options, 4);
        long tensors = 4L * (8L * 4096 * 512 + 4L * 16384 * 512);
        Assert.InRange(bytes, tensors, tensors + (96L << 20));
        // Twice the tokens: twice the tensors (plus the LSE and Drow rows); the staging piece stays the same.
        long longer = SequenceParallelAttention.EstimateBytesPerRank(shape with { SeqLen = 32768 }, options, 4);
        Assert.InRange(longer - bytes, tensors, tensors + (1L << 20));
        // One rank stages nothing and keeps no second K, V: only its own eight tensors and LSE rows.
        Assert.InRange(SequenceParallelAttention.EstimateBytesPerRank(shape, options, 1), 4L * 8 * 16384 * 512, 4L * 8 * 16384 * 512 + (2L << 20));
    }

    [Theory]
    [InlineData(ParallelScheme.AllGather)]
    [InlineData(ParallelScheme.Ring)]
    [InlineData(ParallelScheme.Partial)]
    [InlineData(ParallelScheme.Ulysses)]
    [InlineData(ParallelScheme.Hybrid)]
    public void EstimateBytesPerRank_AtTwoToThe31Tokens_Is64Bit(ParallelScheme scheme)
    {
        var shape = new AttentionShape(1, int.MaxValue, 64, 64, 64, 64);
        long bytes = SequenceParallelAttention.EstimateBytesPerRank(shape, new SequenceParallelOptions { Scheme = scheme }, 4);
        // At least the rank's own q shard: (2^31 − 1) / 4 tokens · 64 · 64 floats.
        Assert.True(bytes >= 4L * (int.MaxValue / 4) * 64 * 64, $"{bytes}");
    }

    [Fact]
    public void ImpossibleShape_FailsWithTheBytesPerRank_NotAnOverflow()
    {
        // What `dsattn run --seq 2147483647 --heads 64` asks for: terabytes per rank.
        InProcessCommunicator.Run(4, comm =>
        {
            using var backend = new CpuBackend(1);
            var shape = new AttentionShape(1, int.MaxValue, 64, 64, 64, 64);
            foreach (var scheme in new[] { ParallelScheme.AllGather, ParallelScheme.Ring, ParallelScheme.Ulysses })
            {
                var e = Assert.Throws<ArgumentException>(() => new SequenceParallelAttention(comm, backend, shape, new SequenceParallelOptions { Scheme = scheme }));
                Assert.Equal("shape", e.ParamName);
                Assert.Contains("GiB per rank", e.Message, StringComparison.Ordinal);
                Assert.Contains("use more ranks", e.Message, StringComparison.Ordinal);
            }
            return 0;
        }, TimeSpan.FromSeconds(60));
    }
}

/// <summary>
/// A steady-state step allocates nothing large: after a first Forward+Backward, a second one allocates no
/// native memory and no managed memory beyond what the in-process communicator copies (one copy of every
/// send buffer) plus a small allowance, for every scheme.
/// </summary>
[Collection(nameof(ProcessMemoryCollection))]
public sealed class SteadyStateMemoryTests(ITestOutputHelper output)
{
    [Theory]
    [InlineData(AttentionKind.Softmax, ParallelScheme.AllGather)]
    [InlineData(AttentionKind.Softmax, ParallelScheme.Ring)]
    [InlineData(AttentionKind.Softmax, ParallelScheme.Partial)]
    [InlineData(AttentionKind.Softmax, ParallelScheme.Ulysses)]
    [InlineData(AttentionKind.Softmax, ParallelScheme.Hybrid)]
    [InlineData(AttentionKind.Lightning, ParallelScheme.Lasp2)]
    [InlineData(AttentionKind.Lightning, ParallelScheme.Ulysses)]
    public void SecondStep_AllocatesNothingLarge(AttentionKind kind, ParallelScheme scheme)
    {
        // A full-sequence tensor here is 4096 · 4 · 32 floats = 2 MiB; the allowance is a quarter of that.
        const int n = 4096, h = 4, d = 32, p = 4;
        const long allowance = 512 << 10;
        var shape = new AttentionShape(1, n, h, h, d, d);
        var options = new SequenceParallelOptions { Attention = kind, Scheme = scheme, UlyssesDegree = scheme == ParallelScheme.Hybrid ? 2 : 0 };
        var managed = new long[2];
        var native = new long[2];
        var sent = InProcessCommunicator.Run(p, comm =>
        {
            using var backend = new CpuBackend(1);
            using var attention = new SequenceParallelAttention(comm, backend, shape, options);
            int nl = attention.LocalTokens;
            using var q = backend.Allocate(1, nl, h, d);
            using var k = backend.Allocate(1, nl, h, d);
            using var v = backend.Allocate(1, nl, h, d);
            using var o = backend.Allocate(1, nl, h, d);
            using var dO = backend.Allocate(1, nl, h, d);
            using var dQ = backend.Allocate(1, nl, h, d);
            using var dK = backend.Allocate(1, nl, h, d);
            using var dV = backend.Allocate(1, nl, h, d);
            attention.Forward(q, k, v, o);
            attention.Backward(dO, dQ, dK, dV);
            comm.Barrier();
            if (comm.Rank == 0) { managed[0] = GC.GetTotalAllocatedBytes(true); native[0] = CpuTensor.TotalAllocatedBytes; }
            comm.Barrier();
            comm.Counters.Reset();
            attention.Forward(q, k, v, o);
            attention.Backward(dO, dQ, dK, dV);
            long mine = comm.Counters.TotalBytesSent;
            comm.Barrier();
            if (comm.Rank == 0) { managed[1] = GC.GetTotalAllocatedBytes(true); native[1] = CpuTensor.TotalAllocatedBytes; }
            comm.Barrier();
            return mine;
        }, TimeSpan.FromSeconds(120));
        long copies = sent.Sum();
        long extra = managed[1] - managed[0] - copies;
        output.WriteLine($"{kind} {scheme}: second step allocated {managed[1] - managed[0]:N0} managed bytes ({copies:N0} of them the communicator's send copies), {native[1] - native[0]:N0} native bytes");
        Assert.Equal(0, native[1] - native[0]);
        Assert.True(extra <= allowance, $"the second step allocated {extra:N0} managed bytes beyond the communicator's copies");
    }
}
