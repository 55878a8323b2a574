using Distributed.Cluster;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Distributed.Reference;
using Xunit;
using Xunit.Abstractions;
using Dims = Distributed.Reference.ReferenceAttention.Dims;

namespace Distributed.Tests;

/// <summary>
/// LASP-1 (the serial chain of states) on P = 1..4 in-process ranks against the fp64 reference, and its
/// traffic: one state per hop, P−1 hops per causal pass, each hop waiting for the one before it.
/// </summary>
public sealed class Lasp1Tests(ITestOutputHelper output)
{
    private const double Tolerance = 1e-4;

    public static TheoryData<bool, float[]?, int, int> Cases() => new()
    {
        { true, null, 1, 2 },
        { true, [0.99f, 0.9f, 0.5f, 1f], 1, 2 },
        { true, [0.95f, 0.95f, 0.95f, 0.95f], 2, 4 },
        { false, null, 1, 2 },
        { false, [0.9f, 0.9f, 0.9f, 0.9f], 2, 1 },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void ForwardBackward_MatchesReference_ForEveryP(bool causal, float[]? decay, int batch, int kvHeads)
    {
        const int n = 101, h = 4, d = 16, dv = 24;
        var x = new Dims(batch, n, n, h, kvHeads, d, dv);
        var q = ReferenceAttention.Random((long)batch * n * h * d, 11);
        var k = ReferenceAttention.Random((long)batch * n * kvHeads * d, 12, 0.25);
        var v = ReferenceAttention.Random((long)batch * n * kvHeads * dv, 13);
        var dO = ReferenceAttention.Random((long)batch * n * h * dv, 14);
        var lambda = (decay ?? Enumerable.Repeat(1f, h).ToArray()).Select(f => (double)f).ToArray();
        var o = ReferenceAttention.LightningForward(q, k, v, lambda, causal, null, x).O;
        var (dq, dk, dvRef, _) = ReferenceAttention.LightningBackward(q, k, v, lambda, causal, null, dO, null, x);
        var shape = new AttentionShape(batch, n, h, kvHeads, d, dv);
        var options = new SequenceParallelOptions { Attention = AttentionKind.Lightning, Scheme = ParallelScheme.Lasp1, Causal = causal, Decay = decay };
        for (int p = 1; p <= 4; p++)
        {
            var got = Run(shape, options, p, q, k, v, dO);
            double e = new[]
            {
                ReferenceAttention.RelativeError(got[0], o), ReferenceAttention.RelativeError(got[1], dq),
                ReferenceAttention.RelativeError(got[2], dk), ReferenceAttention.RelativeError(got[3], dvRef),
            }.Max();
            output.WriteLine($"causal={causal} decay={(decay is null ? "none" : string.Join(",", decay))} P={p}: max relative error {e:E2}");
            Assert.True(e <= Tolerance, $"P={p}: relative error {e:E2} > {Tolerance:E0}");
        }
    }

    [Theory]
    [InlineData(true, 4)]
    [InlineData(true, 3)]
    [InlineData(false, 4)]
    public void Traffic_OneStatePerHop_SerialChainOfPMinusOneHops(bool causal, int p)
    {
        const int n = 64, h = 2, d = 8, dv = 12;
        long stateBytes = (long)h * d * dv * sizeof(float);
        var shape = new AttentionShape(1, n, h, h, d, dv);
        var options = new SequenceParallelOptions { Attention = AttentionKind.Lightning, Scheme = ParallelScheme.Lasp1, Causal = causal, Decay = [0.9f, 0.8f] };
        var logs = InProcessCommunicator.Run(p, comm =>
        {
            var recording = new RecordingCommunicator(comm);
            using var backend = new CpuBackend(1);
            using var attention = new SequenceParallelAttention(recording, backend, shape, options);
            int nl = attention.LocalTokens;
            using var q = backend.Allocate(1, nl, h, d);
            using var v = backend.Allocate(1, nl, h, dv);
            using var o = backend.Allocate(1, nl, h, dv);
            using var dq = backend.Allocate(1, nl, h, d);
            using var dk = backend.Allocate(1, nl, h, d);
            using var dvt = backend.Allocate(1, nl, h, dv);
            comm.Counters.Reset();
            attention.Forward(q, q, v, o);
            var forward = recording.Hops.ToList();
            var forwardCounts = comm.Counters.Snapshot();
            attention.Backward(o, dq, dk, dvt);
            return (Forward: forward, All: recording.Hops.ToList(), ForwardCounts: forwardCounts, AllCounts: comm.Counters.Snapshot());
        }, TimeSpan.FromSeconds(60));

        int chains = causal ? 1 : 2; // non-causal: a chain up and a chain down per pass
        for (int r = 0; r < p; r++)
        {
            var all = logs[r].AllCounts;
            Assert.Equal([CommOp.SendRecv], all.Keys.ToArray()); // point-to-point only, no collective
            // Per pass and chain, every rank but the chain's last sends one state, every rank but its first receives one.
            // Causal forward: up the ranks; backward: down. Non-causal: both chains in each pass.
            int up = r < p - 1 ? 1 : 0, down = r > 0 ? 1 : 0;
            var forward = logs[r].ForwardCounts[CommOp.SendRecv];
            Assert.Equal((causal ? up : up + down) * stateBytes, forward.BytesSent);
            Assert.Equal((causal ? down : up + down) * stateBytes, forward.BytesReceived);
            Assert.Equal(chains * (up + down) * stateBytes, all[CommOp.SendRecv].BytesSent);
            Assert.Equal(chains * (up + down) * stateBytes, all[CommOp.SendRecv].BytesReceived);
            Assert.Equal(2 * chains * (up + down), all[CommOp.SendRecv].Calls); // one call per hop end, forward and backward
        }
        // Serial steps: a hop's depth is 1 + the deepest hop its sender had received before sending it.
        Assert.Equal(chains * (p - 1), SerialDepth(logs.Select(l => l.Forward).ToArray()));
        Assert.Equal(2 * chains * (p - 1), SerialDepth(logs.Select(l => l.All).ToArray()));
        Assert.Equal(2 * chains * (p - 1), logs.Sum(l => l.All.Count(e => e.SentFloats > 0)));
    }

    [Fact]
    public void Zigzag_IsRefusedNamingTheLayout()
    {
        InProcessCommunicator.Run(2, comm =>
        {
            using var backend = new CpuBackend(1);
            var e = Assert.Throws<ArgumentException>(() => new SequenceParallelAttention(comm, backend, new AttentionShape(1, 64, 2, 2, 8, 8),
                new SequenceParallelOptions { Attention = AttentionKind.Lightning, Scheme = ParallelScheme.Lasp1, Layout = ShardLayout.Zigzag }));
            Assert.Equal("options", e.ParamName);
            Assert.Contains("contiguous", e.Message, StringComparison.Ordinal);
            var s = Assert.Throws<ArgumentException>(() => new SequenceParallelAttention(comm, backend, new AttentionShape(1, 64, 2, 2, 8, 8),
                new SequenceParallelOptions { Attention = AttentionKind.Softmax, Scheme = ParallelScheme.Lasp1 }));
            Assert.Equal("options", s.ParamName);
            return 0;
        }, TimeSpan.FromSeconds(30));
    }

    /// <summary>
    /// The longest chain of dependent hops in the per-rank logs. Messages between one pair of ranks in one
    /// direction match in order; a message sent by rank r depends on every message r received earlier.
    /// </summary>
    private static int SerialDepth(List<Hop>[] logs)
    {
        int p = logs.Length;
        var depthOfMessage = new Dictionary<(int From, int To, int Index), int>();
        var position = new int[p];
        var received = new int[p]; // deepest message received so far, per rank
        var sentCount = new Dictionary<(int, int), int>();
        var receivedCount = new Dictionary<(int, int), int>();
        bool progress = true;
        while (progress)
        {
            progress = false;
            for (int r = 0; r < p; r++)
            {
                while (position[r] < logs[r].Count)
                {
                    var hop = logs[r][position[r]];
                    if (hop.ReceivedFloats > 0)
                    {
                        int index = receivedCount.GetValueOrDefault((hop.Source, r));
                        if (!depthOfMessage.TryGetValue((hop.Source, r, index), out int depth)) break; // not sent yet
                        receivedCount[(hop.Source, r)] = index + 1;
                        received[r] = Math.Max(received[r], depth);
                    }
                    if (hop.SentFloats > 0)
                    {
                        int index = sentCount.GetValueOrDefault((r, hop.Destination));
                        sentCount[(r, hop.Destination)] = index + 1;
                        depthOfMessage[(r, hop.Destination, index)] = received[r] + 1;
                    }
                    position[r]++;
                    progress = true;
                }
            }
        }
        Assert.All(Enumerable.Range(0, p), r => Assert.Equal(logs[r].Count, position[r]));
        return depthOfMessage.Count == 0 ? 0 : depthOfMessage.Values.Max();
    }

    private sealed record Hop(int Destination, int SentFloats, int Source, int ReceivedFloats);

    /// <summary>Passes everything through and logs each SendRecv (the only calls LASP-1 makes).</summary>
    private sealed class RecordingCommunicator(ICommunicator inner) : ICommunicator
    {
        public List<Hop> Hops { get; } = [];
        public int Rank => inner.Rank;
        public int Size => inner.Size;
        public CommunicatorCounters Counters => inner.Counters;
        public long CollectiveSequence => inner.CollectiveSequence;
        public void AllGather(ReadOnlySpan<float> send, Span<float> receive) => inner.AllGather(send, receive);
        public void AllGatherVariable(ReadOnlySpan<float> send, Span<float> receive, ReadOnlySpan<int> counts) => inner.AllGatherVariable(send, receive, counts);
        public void AllReduceSum(ReadOnlySpan<float> send, Span<float> receive) => inner.AllReduceSum(send, receive);
        public void ReduceScatterSum(ReadOnlySpan<float> send, Span<float> receive) => inner.ReduceScatterSum(send, receive);
        public void AllToAll(ReadOnlySpan<float> send, Span<float> receive) => inner.AllToAll(send, receive);
        public void SendRecv(ReadOnlySpan<float> send, int destination, Span<float> receive, int source)
        {
            Hops.Add(new Hop(destination, send.Length, source, receive.Length));
            inner.SendRecv(send, destination, receive, source);
        }
        public CommRequest StartSendRecv(ReadOnlyMemory<float> send, int destination, Memory<float> receive, int source) =>
            throw new InvalidOperationException("LASP-1 hops are blocking by design; a started exchange would hide the chain.");
        public CommRequest StartAllGather(ReadOnlyMemory<float> send, Memory<float> receive) => inner.StartAllGather(send, receive);
        public CommRequest StartAllReduceSum(ReadOnlyMemory<float> send, Memory<float> receive) => inner.StartAllReduceSum(send, receive);
        public void Barrier() => inner.Barrier();
        public ICommunicator Split(int color, int key) => inner.Split(color, key);
        public void Dispose() { }
    }

    private static float[][] Run(AttentionShape s, SequenceParallelOptions options, int ranks, double[] q, double[] k, double[] v, double[] dO)
    {
        var global = new[] { new float[(long)s.Batch * s.SeqLen * s.Heads * s.ValueDim], new float[q.Length], new float[k.Length], new float[v.Length] };
        InProcessCommunicator.Run(ranks, comm =>
        {
            using var backend = new CpuBackend(1);
            using var attention = new SequenceParallelAttention(comm, backend, s, options);
            var r = attention.LocalTokenRanges;
            int n = attention.LocalTokens;
            DeviceTensor Local(double[] g, int heads, int width)
            {
                var local = new float[(long)s.Batch * n * heads * width];
                Sharding.TakeLocal(g.Select(x => (float)x).ToArray(), local, s.Batch, s.SeqLen, heads * width, r);
                var t = backend.Allocate(s.Batch, n, heads, width);
                t.CopyFromHost(local);
                return t;
            }
            using var tq = Local(q, s.Heads, s.HeadDim);
            using var tk = Local(k, s.KvHeads, s.HeadDim);
            using var tv = Local(v, s.KvHeads, s.ValueDim);
            using var tdo = Local(dO, s.Heads, s.ValueDim);
            using var o = backend.Allocate(s.Batch, n, s.Heads, s.ValueDim);
            using var dq = backend.Allocate(s.Batch, n, s.Heads, s.HeadDim);
            using var dk = backend.Allocate(s.Batch, n, s.KvHeads, s.HeadDim);
            using var dv = backend.Allocate(s.Batch, n, s.KvHeads, s.ValueDim);
            attention.Forward(tq, tk, tv, o);
            attention.Backward(tdo, dq, dk, dv);
            void Put(DeviceTensor t, float[] g, int width)
            {
                var local = new float[t.Length];
                t.CopyToHost(local);
                lock (global) Sharding.PutLocal(local, g, s.Batch, s.SeqLen, width, r);
            }
            Put(o, global[0], s.Heads * s.ValueDim);
            Put(dq, global[1], s.Heads * s.HeadDim);
            Put(dk, global[2], s.KvHeads * s.HeadDim);
            Put(dv, global[3], s.KvHeads * s.ValueDim);
            return 0;
        }, TimeSpan.FromSeconds(120));
        return global;
    }
}
