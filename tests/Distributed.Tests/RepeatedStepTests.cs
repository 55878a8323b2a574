using Distributed.Cluster;
using Distributed.Kernels.Cpu;
using Distributed.Reference;
using Xunit;

namespace Distributed.Tests;

/// <summary>
/// A training loop calls Forward and Backward every step. Step two on the same inputs must give what step one
/// gave, bit for bit: no scheme may carry state (a stale buffer, an accumulator) from one step into the next.
/// </summary>
public sealed class RepeatedStepTests
{
    public static TheoryData<AttentionKind, ParallelScheme, ShardLayout?> Cases() => new()
    {
        { AttentionKind.Softmax, ParallelScheme.AllGather, ShardLayout.Zigzag },
        { AttentionKind.Softmax, ParallelScheme.AllGather, ShardLayout.Contiguous },
        { AttentionKind.Softmax, ParallelScheme.Ring, ShardLayout.Zigzag },
        { AttentionKind.Softmax, ParallelScheme.Partial, ShardLayout.Zigzag },
        { AttentionKind.Softmax, ParallelScheme.Ulysses, null },
        { AttentionKind.Softmax, ParallelScheme.Hybrid, null },
        { AttentionKind.Lightning, ParallelScheme.Lasp2, ShardLayout.Zigzag },
        { AttentionKind.Lightning, ParallelScheme.Ulysses, null },
        { AttentionKind.Lightning, ParallelScheme.Hybrid, null },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void SecondStep_EqualsFirstStep(AttentionKind kind, ParallelScheme scheme, ShardLayout? layout)
    {
        const int B = 2, N = 90, H = 4, Hk = 2, D = 16, Dv = 8;
        float[] Random(long count, int seed) => ReferenceAttention.Random(count, seed, kind == AttentionKind.Lightning ? 0.25 : 1).Select(d => (float)d).ToArray();
        InProcessCommunicator.Run(4, comm =>
        {
            using var backend = new CpuBackend(1);
            var options = new SequenceParallelOptions
            {
                Attention = kind, Scheme = scheme, Causal = true, Layout = layout,
                Decay = kind == AttentionKind.Lightning ? [0.9f, 0.95f, 0.99f, 1f] : null,
            };
            using var attention = new SequenceParallelAttention(comm, backend, new AttentionShape(B, N, H, Hk, D, Dv), options);
            int n = attention.LocalTokens;
            var tensors = new[] { (B, n, H, D, 1), (B, n, Hk, D, 2), (B, n, Hk, Dv, 3), (B, n, H, Dv, 4) }.Select(t =>
            {
                var x = backend.Allocate(t.Item1, t.Item2, t.Item3, t.Item4);
                x.CopyFromHost(Random(x.Length, t.Item5 + 10 * comm.Rank));
                return x;
            }).ToArray();
            using var o = backend.Allocate(B, n, H, Dv);
            using var dq = backend.Allocate(B, n, H, D);
            using var dk = backend.Allocate(B, n, Hk, D);
            using var dv = backend.Allocate(B, n, Hk, Dv);
            float[][] Step()
            {
                attention.Forward(tensors[0], tensors[1], tensors[2], o);
                attention.Backward(tensors[3], dq, dk, dv);
                return new[] { o, dq, dk, dv }.Select(t => { var a = new float[t.Length]; t.CopyToHost(a); return a; }).ToArray();
            }
            var first = Step();
            var second = Step();
            string[] names = ["O", "dQ", "dK", "dV"];
            for (int i = 0; i < 4; i++)
                Assert.True(first[i].AsSpan().SequenceEqual(second[i]), $"rank {comm.Rank}: {names[i]} of step 2 differs from step 1");
            foreach (var t in tensors) t.Dispose();
            return 0;
        }, TimeSpan.FromSeconds(60));
    }
}
