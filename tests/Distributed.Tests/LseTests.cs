using Distributed.Cluster;
using Distributed.Kernels.Cpu;
using Distributed.Reference;
using Xunit;
using Dims = Distributed.Reference.ReferenceAttention.Dims;

namespace Distributed.Tests;

/// <summary>
/// <see cref="SequenceParallelAttention.CopyLse"/>: each rank's <c>[B, H, Nloc]</c> log-sum-exp, put back in
/// global order, equals the fp64 reference's LSE over the whole sequence, for every softmax scheme that
/// exposes it and P = 1..4.
/// </summary>
public sealed class LseTests
{
    public static TheoryData<ParallelScheme, ShardLayout?, bool> Cases() => new()
    {
        { ParallelScheme.AllGather, ShardLayout.Zigzag, true },
        { ParallelScheme.AllGather, ShardLayout.Contiguous, false },
        { ParallelScheme.Ring, ShardLayout.Zigzag, true },
        { ParallelScheme.Partial, null, true },
        { ParallelScheme.Partial, ShardLayout.Zigzag, false },
        { ParallelScheme.Ulysses, ShardLayout.Zigzag, true },
        { ParallelScheme.Ulysses, null, false },
        { ParallelScheme.Hybrid, null, true },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void CopyLse_EqualsReferenceLse_ForEveryP(ParallelScheme scheme, ShardLayout? layout, bool causal)
    {
        const int B = 2, N = 77, H = 4, Hk = 2, D = 8, Dv = 12;
        var x = new Dims(B, N, N, H, Hk, D, Dv);
        var q = ReferenceAttention.Random((long)B * N * H * D, 11);
        var k = ReferenceAttention.Random((long)B * N * Hk * D, 12);
        var v = ReferenceAttention.Random((long)B * N * Hk * Dv, 13);
        var expected = ReferenceAttention.FlashForward(q, k, v, x, 0, 0, causal, 1 / Math.Sqrt(D)).Lse;
        foreach (int p in new[] { 1, 2, 3, 4 })
        {
            if (scheme is ParallelScheme.Ulysses or ParallelScheme.Hybrid && H % p != 0) continue;
            var global = new float[expected.Length];
            InProcessCommunicator.Run(p, comm =>
            {
                using var backend = new CpuBackend(1);
                var options = new SequenceParallelOptions { Attention = AttentionKind.Softmax, Scheme = scheme, Causal = causal, Layout = layout, UlyssesDegree = scheme == ParallelScheme.Hybrid && p % 2 == 0 ? 2 : 0 };
                using var attention = new SequenceParallelAttention(comm, backend, new AttentionShape(B, N, H, Hk, D, Dv), options);
                var r = attention.LocalTokenRanges;
                int n = attention.LocalTokens;
                Kernels.DeviceTensor Local(double[] g, int width, params int[] s)
                {
                    var local = new float[(long)B * n * width];
                    Sharding.TakeLocal(g.Select(d => (float)d).ToArray(), local, B, N, width, r);
                    var t = backend.Allocate(s);
                    t.CopyFromHost(local);
                    return t;
                }
                using var tq = Local(q, H * D, B, n, H, D);
                using var tk = Local(k, Hk * D, B, n, Hk, D);
                using var tv = Local(v, Hk * Dv, B, n, Hk, Dv);
                using var to = backend.Allocate(B, n, H, Dv);
                using var lse = backend.Allocate(B, H, n);
                Assert.Throws<InvalidOperationException>(() => attention.CopyLse(lse));
                attention.Forward(tq, tk, tv, to);
                attention.CopyLse(lse);
                var mine = new float[lse.Length];
                lse.CopyToHost(mine);
                // [B·H, Nloc] rows go back to [B·H, N].
                lock (global) Sharding.PutLocal(mine, global, B * H, N, 1, r);
                return 0;
            }, TimeSpan.FromSeconds(60));
            double e = ReferenceAttention.RelativeError(global, expected);
            Assert.True(e < 1e-5, $"{scheme} P={p}: LSE relative error {e:E2}");
        }
    }

    [Fact]
    public void CopyLse_Lightning_IsRefusedNamingSoftmax()
    {
        InProcessCommunicator.Run(1, comm =>
        {
            using var backend = new CpuBackend(1);
            var options = new SequenceParallelOptions { Attention = AttentionKind.Lightning, Scheme = ParallelScheme.Lasp2 };
            using var attention = new SequenceParallelAttention(comm, backend, new AttentionShape(1, 16, 2, 2, 8, 8), options);
            using var t = backend.Allocate(1, 16, 2, 8);
            using var lse = backend.Allocate(1, 2, 16);
            attention.Forward(t, t, t, t);
            var e = Assert.Throws<NotSupportedException>(() => attention.CopyLse(lse));
            Assert.Contains("softmax", e.Message, StringComparison.Ordinal);
            return 0;
        });
    }
}
