using Distributed.Cluster;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Distributed.Reference;
using Xunit;
using Xunit.Abstractions;
using Dims = Distributed.Reference.ReferenceAttention.Dims;

namespace Distributed.Tests;

/// <summary>
/// Every scheme on P in-process ranks (P = 1..4) against the single-device fp64 reference over the whole
/// sequence: outputs and gradients, relative error ≤ 1e-4, and the error must not grow with P.
/// Every rank computes its own shard; the test puts the shards back in global order.
/// </summary>
public sealed class SchemeTests(ITestOutputHelper output)
{
    private const double Tolerance = 1e-4;

    public sealed record Case(string Name, AttentionKind Attention, ParallelScheme Scheme, bool Causal, ShardLayout? Layout, float[]? Decay,
        int N = 100, int H = 4, int Hk = 2, int D = 16, int Dv = 24, int B = 1, int Ph = 0, ParallelScheme Across = ParallelScheme.AllGather, long Piece = 0, bool Overlap = true)
    {
        public override string ToString() => Name;
    }

    public static TheoryData<Case> Cases() =>
    [
        new("lasp2 causal zigzag λ=1", AttentionKind.Lightning, ParallelScheme.Lasp2, true, ShardLayout.Zigzag, null),
        new("lasp2 causal zigzag λ=0.99", AttentionKind.Lightning, ParallelScheme.Lasp2, true, ShardLayout.Zigzag, [0.99f, 0.99f, 0.99f, 0.99f]),
        new("lasp2 causal contiguous λ=0.5", AttentionKind.Lightning, ParallelScheme.Lasp2, true, ShardLayout.Contiguous, [0.5f, 0.5f, 0.5f, 0.5f]),
        new("lasp2 causal zigzag per-head λ, B=2, MHA", AttentionKind.Lightning, ParallelScheme.Lasp2, true, ShardLayout.Zigzag, [1f, 0.99f, 0.9f, 0.5f], Hk: 4, B: 2),
        new("lasp2 non-causal", AttentionKind.Lightning, ParallelScheme.Lasp2, false, ShardLayout.Contiguous, null),
        new("lasp2 non-causal zigzag GQA 4/1", AttentionKind.Lightning, ParallelScheme.Lasp2, false, ShardLayout.Zigzag, null, Hk: 1),
        new("lasp2 causal zigzag per-head λ, no overlap", AttentionKind.Lightning, ParallelScheme.Lasp2, true, ShardLayout.Zigzag, [1f, 0.99f, 0.9f, 0.5f], Overlap: false),
        new("lasp2 non-causal GQA 4/1, no overlap", AttentionKind.Lightning, ParallelScheme.Lasp2, false, ShardLayout.Contiguous, null, Hk: 1, Overlap: false),
        new("allgather causal zigzag", AttentionKind.Softmax, ParallelScheme.AllGather, true, ShardLayout.Zigzag, null),
        new("allgather causal contiguous B=2", AttentionKind.Softmax, ParallelScheme.AllGather, true, ShardLayout.Contiguous, null, B: 2),
        new("allgather causal zigzag B=2, staged in 500-float pieces", AttentionKind.Softmax, ParallelScheme.AllGather, true, ShardLayout.Zigzag, null, B: 2, Piece: 500),
        new("allgather non-causal GQA 4/1", AttentionKind.Softmax, ParallelScheme.AllGather, false, null, null, Hk: 1),
        new("ring causal zigzag", AttentionKind.Softmax, ParallelScheme.Ring, true, ShardLayout.Zigzag, null),
        new("ring causal contiguous B=2 GQA 4/1", AttentionKind.Softmax, ParallelScheme.Ring, true, ShardLayout.Contiguous, null, Hk: 1, B: 2),
        new("ring non-causal", AttentionKind.Softmax, ParallelScheme.Ring, false, null, null),
        new("ring causal zigzag, no overlap", AttentionKind.Softmax, ParallelScheme.Ring, true, ShardLayout.Zigzag, null, Overlap: false),
        new("ring non-causal contiguous GQA 4/1 N=101, no overlap", AttentionKind.Softmax, ParallelScheme.Ring, false, ShardLayout.Contiguous, null, N: 101, Hk: 1, Overlap: false),
        new("ring non-causal contiguous GQA 4/1 N=101", AttentionKind.Softmax, ParallelScheme.Ring, false, ShardLayout.Contiguous, null, N: 101, Hk: 1),
        new("partial causal", AttentionKind.Softmax, ParallelScheme.Partial, true, null, null),
        new("partial causal zigzag B=2 GQA 4/1", AttentionKind.Softmax, ParallelScheme.Partial, true, ShardLayout.Zigzag, null, Hk: 1, B: 2),
        new("partial non-causal", AttentionKind.Softmax, ParallelScheme.Partial, false, null, null),
        new("hybrid softmax Ph=2 × all-gather, causal", AttentionKind.Softmax, ParallelScheme.Hybrid, true, null, null, Ph: 2),
        new("hybrid softmax Ph=2 × ring, KV 4/1 replicated", AttentionKind.Softmax, ParallelScheme.Hybrid, true, null, null, Hk: 1, Ph: 2, Across: ParallelScheme.Ring),
        new("hybrid softmax Ph=2 × partial, non-causal", AttentionKind.Softmax, ParallelScheme.Hybrid, false, null, null, Ph: 2, Across: ParallelScheme.Partial),
        new("hybrid softmax default Ph", AttentionKind.Softmax, ParallelScheme.Hybrid, true, null, null),
        new("hybrid lightning Ph=2 × LASP-2, per-head λ", AttentionKind.Lightning, ParallelScheme.Hybrid, true, null, [1f, 0.99f, 0.9f, 0.5f], Ph: 2),
        new("ulysses softmax causal GQA 4/2", AttentionKind.Softmax, ParallelScheme.Ulysses, true, null, null),
        new("ulysses softmax non-causal, KV 4/1 replicated", AttentionKind.Softmax, ParallelScheme.Ulysses, false, null, null, Hk: 1),
        new("ulysses lightning causal per-head λ", AttentionKind.Lightning, ParallelScheme.Ulysses, true, null, [1f, 0.99f, 0.9f, 0.5f]),
        new("ulysses lightning non-causal zigzag", AttentionKind.Lightning, ParallelScheme.Ulysses, false, ShardLayout.Zigzag, null, Hk: 4),
    ];

    /// <summary>Schemes that split heads need H % P == 0; P = 3 is refused with the fix, for H = 4.</summary>
    private static bool Refuses(Case c, int p) =>
        (c.Scheme == ParallelScheme.Ulysses && c.H % p != 0) || (c.Scheme == ParallelScheme.Hybrid && c.Ph > 0 && p % c.Ph != 0);

    [Theory]
    [MemberData(nameof(Cases))]
    public void ForwardBackward_MatchesSingleDeviceReference_ForEveryP(Case c)
    {
        var x = new Dims(c.B, c.N, c.N, c.H, c.Hk, c.D, c.Dv);
        var q = ReferenceAttention.Random((long)c.B * c.N * c.H * c.D, 1);
        double kvAmp = c.Attention == AttentionKind.Lightning ? 0.25 : 1.0;
        var k = ReferenceAttention.Random((long)c.B * c.N * c.Hk * c.D, 2, kvAmp);
        var v = ReferenceAttention.Random((long)c.B * c.N * c.Hk * c.Dv, 3);
        var dO = ReferenceAttention.Random((long)c.B * c.N * c.H * c.Dv, 4);
        double[] o, dq, dk, dv;
        if (c.Attention == AttentionKind.Softmax)
        {
            o = ReferenceAttention.FlashForward(q, k, v, x, 0, 0, c.Causal, 1 / Math.Sqrt(c.D)).O;
            (dq, dk, dv) = ReferenceAttention.FlashBackward(q, k, v, dO, x, 0, 0, c.Causal, 1 / Math.Sqrt(c.D));
        }
        else
        {
            var decay = (c.Decay ?? Enumerable.Repeat(1f, c.H).ToArray()).Select(f => (double)f).ToArray();
            o = ReferenceAttention.LightningForward(q, k, v, decay, c.Causal, null, x).O;
            (dq, dk, dv, _) = ReferenceAttention.LightningBackward(q, k, v, decay, c.Causal, null, dO, null, x);
        }

        var errors = new double[5];
        for (int p = 1; p <= 4; p++)
        {
            if (Refuses(c, p))
            {
                var refused = Assert.Throws<RankFailedException>(() => RunDistributed(c, p, q, k, v, dO));
                Assert.Contains(c.Scheme == ParallelScheme.Ulysses ? "H % P == 0" : "must divide", refused.InnerException!.Message, StringComparison.Ordinal);
                errors[p] = 0;
                continue;
            }
            var got = RunDistributed(c, p, q, k, v, dO);
            double e = new[]
            {
                ReferenceAttention.RelativeError(got.O, o), ReferenceAttention.RelativeError(got.DQ, dq),
                ReferenceAttention.RelativeError(got.DK, dk), ReferenceAttention.RelativeError(got.DV, dv),
            }.Max();
            errors[p] = e;
            output.WriteLine($"{c.Name}: P={p} max relative error {e:E2}");
            Assert.True(e <= Tolerance, $"P={p}: relative error {e:E2} > {Tolerance:E0}");
        }
        // More ranks must not mean less accuracy (2x of P=1, with a floor at fp32 noise).
        for (int p = 2; p <= 4; p++)
            if (!Refuses(c, p)) Assert.True(errors[p] <= Math.Max(2 * errors[1], 1e-6), $"error grows with P: P=1 {errors[1]:E2}, P={p} {errors[p]:E2}");
    }

    /// <summary>One forward + backward of the case on <paramref name="ranks"/> in-process ranks, in global order.</summary>
    internal static Reliability.GlobalOutputs RunDistributed(Case c, int ranks, double[] q, double[] k, double[] v, double[] dO)
    {
        var shape = new AttentionShape(c.B, c.N, c.H, c.Hk, c.D, c.Dv);
        var options = new SequenceParallelOptions
        {
            Attention = c.Attention, Scheme = c.Scheme, Causal = c.Causal, Layout = c.Layout, Decay = c.Decay,
            UlyssesDegree = c.Ph, HybridSequenceScheme = c.Across, Overlap = c.Overlap,
        };
        // A small staging piece makes the schemes split their collectives, as they do past 2^26 floats.
        Distributed.Schemes.HostBuffer.PieceOverride.Value = c.Piece;
        static float[] F(double[] x) => [.. x.Select(d => (float)d)];
        return Reliability.SchemeRun.Run(new Reliability.SchemeCase(c.Name, shape, options), ranks, new Reliability.GlobalInputs(F(q), F(k), F(v), F(dO)));
    }

    /// <summary>Runs forward+backward on 4 ranks and returns rank 0's counters of that step.</summary>
    private static IReadOnlyDictionary<CommOp, CommOpCount> CountOneStep(AttentionKind kind, ParallelScheme scheme, int n, int h = 1, int d = 16, bool backward = true, bool overlap = true)
    {
        var shape = new AttentionShape(1, n, h, h, d, d);
        var options = new SequenceParallelOptions { Attention = kind, Scheme = scheme, Causal = true, Decay = kind == AttentionKind.Lightning ? Enumerable.Repeat(0.9f, h).ToArray() : null, Overlap = overlap };
        return InProcessCommunicator.Run(4, comm =>
        {
            using var backend = new CpuBackend(1);
            using var attention = new SequenceParallelAttention(comm, backend, shape, options);
            int nl = attention.LocalTokens;
            using var q = backend.Allocate(1, nl, h, d);
            using var o = backend.Allocate(1, nl, h, d);
            using var g = backend.Allocate(1, nl, h, d);
            using var g2 = backend.Allocate(1, nl, h, d);
            using var g3 = backend.Allocate(1, nl, h, d);
            comm.Counters.Reset();
            attention.Forward(q, q, q, o);
            if (backward) attention.Backward(o, g, g2, g3);
            return comm.Counters.Snapshot();
        }, TimeSpan.FromSeconds(300))[0];
    }

    [Theory]
    [InlineData(false, 1)]  // blocking: one all-gather of both zigzag states per pass
    [InlineData(true, 2)]   // overlapped: the same states as one all-gather per zigzag half, started as each is ready
    public void Lasp2_StatesGatheredOncePerPass_BytesIndependentOfSequenceLength(bool overlap, int allGathersPerPass)
    {
        var small = CountOneStep(AttentionKind.Lightning, ParallelScheme.Lasp2, 4096, overlap: overlap);
        var large = CountOneStep(AttentionKind.Lightning, ParallelScheme.Lasp2, 65536, overlap: overlap);
        Assert.Equal(2 * allGathersPerPass, small[CommOp.AllGather].Calls); // forward and backward
        Assert.Equal(small[CommOp.AllGather].BytesSent, large[CommOp.AllGather].BytesSent);
        Assert.Equal(small.Values.Sum(c => c.BytesSent), large.Values.Sum(c => c.BytesSent));
        // Zigzag: two [B,H,D,Dv] states per rank per pass.
        Assert.Equal(2 * 2 * 16 * 16 * sizeof(float), small[CommOp.AllGather].BytesSent);
    }

    [Fact]
    public void AllGather_BytesGrowLinearlyWithSequenceLength_OneReduceScatterBackward()
    {
        var a = CountOneStep(AttentionKind.Softmax, ParallelScheme.AllGather, 1024);
        var b = CountOneStep(AttentionKind.Softmax, ParallelScheme.AllGather, 2048);
        Assert.Equal(1, a[CommOp.AllGather].Calls);
        Assert.Equal(1, a[CommOp.ReduceScatter].Calls);
        Assert.Equal(2 * a[CommOp.AllGather].BytesSent, b[CommOp.AllGather].BytesSent);
        Assert.Equal(2 * a[CommOp.ReduceScatter].BytesSent, b[CommOp.ReduceScatter].BytesSent);
    }

    [Fact]
    public void Hybrid_SubGroupTrafficShowsOnTheCallersCounters()
    {
        // H = 2 on 4 ranks: Ph = 2, Ps = 2. Each pass is one Ulysses all-to-all each way in the head group
        // plus the LASP-2 state all-gather across groups (overlapped: one per zigzag half); all of it must
        // reach the caller's counters.
        var c = CountOneStep(AttentionKind.Lightning, ParallelScheme.Hybrid, 256, h: 2);
        Assert.Equal(4, c[CommOp.AllGather].Calls);
        Assert.Equal(4, c[CommOp.AllToAll].Calls);
        // One head per rank after the shuffle: two [1,1,16,16] zigzag states per pass.
        Assert.Equal(2 * 2 * 16 * 16 * sizeof(float), c[CommOp.AllGather].BytesSent);
        Assert.True(c[CommOp.AllToAll].BytesSent > 0);
    }

    [Fact]
    public void PartialStates_BytesIndependentOfKvLength()
    {
        // The same 2 new tokens against a 4K and a 64K cache: the partial states exchanged are the same size.
        long small = DecodeBytes(1 << 12);
        Assert.Equal(small, DecodeBytes(1 << 16));
        Assert.Equal(2L * 2 * (16 + 1) * sizeof(float), small); // B·Nq·H·(Dv+1) floats
    }

    [Fact]
    public void Partial_OneQueryAllGatherAndOneAllToAllForward_OneReduceScatterBackward()
    {
        var counts = CountOneStep(AttentionKind.Softmax, ParallelScheme.Partial, 1024);
        Assert.Equal(2, counts[CommOp.AllGather].Calls); // Q forward; [dO | LSE | Drow] backward
        Assert.Equal(1, counts[CommOp.AllToAll].Calls);
        Assert.Equal(1, counts[CommOp.ReduceScatter].Calls);
    }

    /// <summary>Bytes rank 0 sends in one decode step of 2 new tokens against a cache of the given length on 4 ranks.</summary>
    private static long DecodeBytes(int cache)
    {
        return InProcessCommunicator.Run(4, comm =>
        {
            using var backend = new CpuBackend(1);
            int shard = cache / 4;
            using var q = backend.Allocate(1, 2, 2, 16);
            using var k = backend.Allocate(1, shard, 2, 16);
            using var v = backend.Allocate(1, shard, 2, 16);
            using var o = backend.Allocate(1, 2, 2, 16);
            comm.Counters.Reset();
            SequenceParallelAttention.Decode(comm, backend, q, cache, k, v, comm.Rank * shard, o);
            return comm.Counters.TotalBytesSent;
        }, TimeSpan.FromSeconds(60))[0];
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(4)]
    public void Decode_KvCacheShardedOverRanks_MatchesReference(int ranks)
    {
        // 3 new tokens at positions 90..92 attend causally to a 93-token cache split unevenly over the ranks.
        var x = new Dims(1, 3, 93, 4, 2, 16, 24);
        var q = ReferenceAttention.Random(3L * 4 * 16, 5);
        var k = ReferenceAttention.Random(93L * 2 * 16, 6);
        var v = ReferenceAttention.Random(93L * 2 * 24, 7);
        var expected = ReferenceAttention.FlashForward(q, k, v, x, 90, 0, true, 0.25).O;
        var outputs = InProcessCommunicator.Run(ranks, comm =>
        {
            using var backend = new CpuBackend(1);
            var (start, count) = Sharding.Chunk(93, ranks, comm.Rank);
            using var tq = backend.Allocate(1, 3, 4, 16);
            tq.CopyFromHost(q.Select(d => (float)d).ToArray());
            using var tk = backend.Allocate(1, count, 2, 16);
            tk.CopyFromHost(k.Skip(start * 32).Take(count * 32).Select(d => (float)d).ToArray());
            using var tv = backend.Allocate(1, count, 2, 24);
            tv.CopyFromHost(v.Skip(start * 48).Take(count * 48).Select(d => (float)d).ToArray());
            using var o = backend.Allocate(1, 3, 4, 24);
            SequenceParallelAttention.Decode(comm, backend, tq, 90, tk, tv, start, o);
            var r = new float[o.Length];
            o.CopyToHost(r);
            return r;
        }, TimeSpan.FromSeconds(60));
        foreach (var got in outputs)
            Assert.True(ReferenceAttention.RelativeError(got, expected) <= Tolerance);
    }

    [Fact]
    public void BadShapes_FailNamingTheParameterAndFix()
    {
        InProcessCommunicator.Run(2, comm =>
        {
            using var backend = new CpuBackend(1);
            var e1 = Assert.Throws<ArgumentException>(() => new SequenceParallelAttention(comm, backend, new AttentionShape(1, 64, 6, 4, 16, 16), new SequenceParallelOptions()));
            Assert.Equal("shape", e1.ParamName);
            Assert.Contains("H % Hk", e1.Message, StringComparison.Ordinal);
            var e2 = Assert.Throws<ArgumentException>(() => new SequenceParallelAttention(comm, backend, new AttentionShape(1, 3, 4, 4, 16, 16),
                new SequenceParallelOptions { Attention = AttentionKind.Lightning, Scheme = ParallelScheme.Lasp2 }));
            Assert.Contains("shorter than", e2.Message, StringComparison.Ordinal);
            var e3 = Assert.Throws<ArgumentException>(() => new SequenceParallelAttention(comm, backend, new AttentionShape(1, 64, 4, 4, 16, 16),
                new SequenceParallelOptions { Attention = AttentionKind.Softmax, Scheme = ParallelScheme.Lasp2 }));
            Assert.Equal("options", e3.ParamName);
            var e4 = Assert.Throws<ArgumentException>(() => new SequenceParallelAttention(comm, backend, new AttentionShape(1, 64, 4, 4, 16, 16),
                new SequenceParallelOptions { Attention = AttentionKind.Lightning, Scheme = ParallelScheme.Lasp2, Decay = [0.5f, 1.5f, 1f, 1f] }));
            Assert.Contains("(0, 1]", e4.Message, StringComparison.Ordinal);
            return 0;
        }, TimeSpan.FromSeconds(30));
    }

    [Fact]
    public void DefaultDecay_FollowsTheAlibiSlopes()
    {
        var d8 = SequenceParallelAttention.DefaultDecay(8);
        for (int h = 0; h < 8; h++) Assert.Equal(Math.Exp(-Math.Pow(2, -(h + 1))), d8[h], 6);
        var d6 = SequenceParallelAttention.DefaultDecay(6); // 4 slopes of 4 heads, then odd slopes of 8
        Assert.Equal(Math.Exp(-Math.Pow(2, -2)), d6[0], 6);
        Assert.Equal(Math.Exp(-Math.Pow(2, -1)), d6[4], 6);
        Assert.Equal(Math.Exp(-Math.Pow(2, -3)), d6[5], 6);
        Assert.All(d6, l => Assert.InRange(l, 0f, 1f));
    }
}
