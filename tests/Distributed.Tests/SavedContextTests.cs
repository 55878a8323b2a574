using Distributed.Cluster;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Distributed.Reference;
using Xunit;
using Dims = Distributed.Reference.ReferenceAttention.Dims;

namespace Distributed.Tests;

/// <summary>
/// The training API: saved contexts (several alive at once, consumed by Backward, refused after), the
/// reference and copy modes of saved inputs, gradient accumulation, the pool, span overloads, Shard/Gather
/// and wrapped host memory. Each case runs on in-process ranks with the CPU backend.
/// </summary>
[Collection(nameof(ProcessMemoryCollection))] // one test reads the process-wide native allocation counter
public sealed class SavedContextTests
{
    public sealed record Case(string Name, AttentionKind Attention, ParallelScheme Scheme, bool Causal = true, int Ranks = 2)
    {
        public override string ToString() => Name;
    }

    public static TheoryData<Case> Schemes() =>
    [
        new("lasp2", AttentionKind.Lightning, ParallelScheme.Lasp2),
        new("allgather", AttentionKind.Softmax, ParallelScheme.AllGather),
        new("ring", AttentionKind.Softmax, ParallelScheme.Ring),
        new("partial", AttentionKind.Softmax, ParallelScheme.Partial),
        new("ulysses lightning", AttentionKind.Lightning, ParallelScheme.Ulysses),
        new("hybrid softmax, 4 ranks", AttentionKind.Softmax, ParallelScheme.Hybrid, Ranks: 4),
        new("hybrid lightning, 4 ranks", AttentionKind.Lightning, ParallelScheme.Hybrid, Ranks: 4),
    ];

    private const int B = 1, N = 96, H = 4, Hk = 2, D = 16, Dv = 8;
    private static readonly AttentionShape Shape = new(B, N, H, Hk, D, Dv);

    private static SequenceParallelOptions Options(Case c) => new()
    {
        Attention = c.Attention, Scheme = c.Scheme, Causal = c.Causal,
        Decay = c.Attention == AttentionKind.Lightning ? [1f, 0.95f, 0.9f, 0.5f] : null,
        UlyssesDegree = c.Scheme == ParallelScheme.Hybrid ? 2 : 0,
    };

    /// <summary>Global q, k, v, dO for micro-batch <paramref name="batch"/> (different data per batch).</summary>
    private static float[][] Inputs(int batch, AttentionKind kind) =>
    [
        F(ReferenceAttention.Random((long)B * N * H * D, 10 + 4 * batch)),
        F(ReferenceAttention.Random((long)B * N * Hk * D, 11 + 4 * batch, kind == AttentionKind.Lightning ? 0.25 : 1)),
        F(ReferenceAttention.Random((long)B * N * Hk * Dv, 12 + 4 * batch)),
        F(ReferenceAttention.Random((long)B * N * H * Dv, 13 + 4 * batch)),
    ];

    private static float[] F(double[] x) => x.Select(d => (float)d).ToArray();

    /// <summary>Global o, dQ, dK, dV of each micro-batch, gathered from every rank.</summary>
    private sealed record Result(float[][] O, float[][] DQ, float[][] DK, float[][] DV);

    /// <summary>Runs <paramref name="step"/> on every rank with local tensors made by Shard, and gathers the results.</summary>
    private static Result Run(Case c, int batches, Action<SequenceParallelAttention[], Local[]> step, bool oneLayerPerBatch = false)
    {
        var inputs = Enumerable.Range(0, batches).Select(i => Inputs(i, c.Attention)).ToArray();
        var results = InProcessCommunicator.Run(c.Ranks, comm =>
        {
            using var backend = new CpuBackend(1);
            var layers = Enumerable.Range(0, oneLayerPerBatch ? batches : 1).Select(_ => new SequenceParallelAttention(comm, backend, Shape, Options(c))).ToArray();
            try
            {
                var locals = inputs.Select(x => new Local(layers[0], x)).ToArray();
                step(layers, locals);
                var r = new Result(locals.Select(l => layers[0].Gather(l.O)).ToArray(), locals.Select(l => layers[0].Gather(l.DQ)).ToArray(),
                    locals.Select(l => layers[0].Gather(l.DK)).ToArray(), locals.Select(l => layers[0].Gather(l.DV)).ToArray());
                foreach (var l in locals) l.Dispose();
                return r;
            }
            finally { foreach (var l in layers) l.Dispose(); }
        }, TimeSpan.FromSeconds(120));
        return results[0];
    }

    /// <summary>One micro-batch's local tensors on one rank.</summary>
    private sealed class Local : IDisposable
    {
        public Local(SequenceParallelAttention a, float[][] x)
        {
            Q = a.AllocateLocal(H, D); K = a.AllocateLocal(Hk, D); V = a.AllocateLocal(Hk, Dv); DO = a.AllocateLocal(H, Dv);
            O = a.AllocateLocal(H, Dv); DQ = a.AllocateLocal(H, D); DK = a.AllocateLocal(Hk, D); DV = a.AllocateLocal(Hk, Dv);
            a.Shard(x[0], Q); a.Shard(x[1], K); a.Shard(x[2], V); a.Shard(x[3], DO);
        }

        public DeviceTensor Q, K, V, DO, O, DQ, DK, DV;

        public void Dispose()
        {
            foreach (var t in new[] { Q, K, V, DO, O, DQ, DK, DV }) t.Dispose();
        }
    }

    [Theory]
    [MemberData(nameof(Schemes))]
    public void TwoContextsAliveAtOnce_GiveTheGradientsOfTwoSeparateInstances_AndMatchTheReference(Case c)
    {
        // One layer, two micro-batches in flight, backward in reverse order (as a pipeline or checkpointing does).
        var shared = Run(c, 2, (a, x) =>
        {
            var first = a[0].Forward(x[0].Q, x[0].K, x[0].V, x[0].O, SavedInputs.Reference);
            var second = a[0].Forward(x[1].Q, x[1].K, x[1].V, x[1].O, SavedInputs.Reference);
            Assert.Equal(2, a[0].LiveContexts);
            a[0].Backward(second, x[1].DO, x[1].DQ, x[1].DK, x[1].DV);
            a[0].Backward(first, x[0].DO, x[0].DQ, x[0].DK, x[0].DV);
            Assert.Equal(0, a[0].LiveContexts);
            Assert.Equal(2, a[0].PooledContexts);
        });
        // Two layers, one micro-batch each, with the one-context convenience.
        var separate = Run(c, 2, (a, x) =>
        {
            for (int i = 0; i < 2; i++) a[i].Forward(x[i].Q, x[i].K, x[i].V, x[i].O);
            for (int i = 1; i >= 0; i--) a[i].Backward(x[i].DO, x[i].DQ, x[i].DK, x[i].DV);
        }, oneLayerPerBatch: true);
        for (int i = 0; i < 2; i++)
        {
            Assert.Equal(separate.O[i], shared.O[i]);
            Assert.Equal(separate.DQ[i], shared.DQ[i]);
            Assert.Equal(separate.DK[i], shared.DK[i]);
            Assert.Equal(separate.DV[i], shared.DV[i]);
        }
        // And the gradients are the single-device ones (independent fp64 reference).
        for (int i = 0; i < 2; i++)
        {
            var x = Inputs(i, c.Attention).Select(a => a.Select(f => (double)f).ToArray()).ToArray();
            var dims = new Dims(B, N, N, H, Hk, D, Dv);
            double[] o, dq, dk, dv;
            if (c.Attention == AttentionKind.Softmax)
            {
                o = ReferenceAttention.FlashForward(x[0], x[1], x[2], dims, 0, 0, c.Causal, 1 / Math.Sqrt(D)).O;
                (dq, dk, dv) = ReferenceAttention.FlashBackward(x[0], x[1], x[2], x[3], dims, 0, 0, c.Causal, 1 / Math.Sqrt(D));
            }
            else
            {
                double[] decay = [1, 0.95f, 0.9f, 0.5];
                o = ReferenceAttention.LightningForward(x[0], x[1], x[2], decay, c.Causal, null, dims).O;
                (dq, dk, dv, _) = ReferenceAttention.LightningBackward(x[0], x[1], x[2], decay, c.Causal, null, x[3], null, dims);
            }
            double e = new[]
            {
                ReferenceAttention.RelativeError(shared.O[i], o), ReferenceAttention.RelativeError(shared.DQ[i], dq),
                ReferenceAttention.RelativeError(shared.DK[i], dk), ReferenceAttention.RelativeError(shared.DV[i], dv),
            }.Max();
            Assert.True(e < 1e-4, $"micro-batch {i}: relative error {e:E2}");
        }
    }

    [Theory]
    [MemberData(nameof(Schemes))]
    public void ChangingAnInputAfterForward_IsRefusedWithReference_AndHarmlessWithCopy(Case c)
    {
        var clean = Run(c, 1, (a, x) =>
        {
            using var ctx = a[0].Forward(x[0].Q, x[0].K, x[0].V, x[0].O, SavedInputs.Copy);
            a[0].Backward(ctx, x[0].DO, x[0].DQ, x[0].DK, x[0].DV);
        });
        var changed = Run(c, 1, (a, x) =>
        {
            using var copied = a[0].Forward(x[0].Q, x[0].K, x[0].V, x[0].O, SavedInputs.Copy);
            var keep = new float[x[0].K.Length];
            x[0].K.CopyToHost(keep);
            // The caller reuses its k buffer for something else before the backward pass.
            x[0].K.CopyFromHost(Enumerable.Repeat(3f, (int)x[0].K.Length).ToArray());
            a[0].Backward(copied, x[0].DO, x[0].DQ, x[0].DK, x[0].DV);

            x[0].K.CopyFromHost(keep);
            var referenced = a[0].Forward(x[0].Q, x[0].K, x[0].V, x[0].O, SavedInputs.Reference);
            x[0].K.CopyFromHost(Enumerable.Repeat(3f, (int)x[0].K.Length).ToArray());
            using var scratch = a[0].AllocateLocal(H, D);
            var refused = Assert.Throws<InvalidOperationException>(() => a[0].Backward(referenced, x[0].DO, scratch, x[0].DK, x[0].DV));
            Assert.Contains("k changed after Forward", refused.Message, StringComparison.Ordinal);
            Assert.Contains("SavedInputs.Copy", refused.Message, StringComparison.Ordinal);
            referenced.Dispose();
            x[0].K.CopyFromHost(keep);
        });
        Assert.Equal(clean.DQ[0], changed.DQ[0]);
        Assert.Equal(clean.DK[0], changed.DK[0]);
        Assert.Equal(clean.DV[0], changed.DV[0]);
    }

    [Theory]
    [MemberData(nameof(Schemes))]
    public void Accumulate_AddsToTheGradientsAlreadyThere(Case c)
    {
        var once = Run(c, 2, (a, x) =>
        {
            for (int i = 0; i < 2; i++)
            {
                a[0].Forward(x[i].Q, x[i].K, x[i].V, x[i].O);
                a[0].Backward(x[i].DO, x[i].DQ, x[i].DK, x[i].DV);
            }
        });
        var summed = Run(c, 2, (a, x) =>
        {
            // Micro-batch 1's gradients are accumulated on top of micro-batch 0's, in micro-batch 0's tensors.
            for (int i = 0; i < 2; i++)
            {
                using var ctx = a[0].Forward(x[i].Q, x[i].K, x[i].V, x[i].O, i == 0 ? SavedInputs.Reference : SavedInputs.Unchecked);
                a[0].Backward(ctx, x[i].DO, x[0].DQ, x[0].DK, x[0].DV, accumulate: i > 0);
            }
        });
        static float[] Sum(float[] a, float[] b) => a.Zip(b, (x, y) => x + y).ToArray();
        Assert.Equal(Sum(once.DQ[0], once.DQ[1]), summed.DQ[0]);
        Assert.Equal(Sum(once.DK[0], once.DK[1]), summed.DK[0]);
        Assert.Equal(Sum(once.DV[0], once.DV[1]), summed.DV[0]);
    }

    [Fact]
    public void AConsumedDisposedOrForeignContext_IsRefusedWithTheReason()
    {
        var c = new Case("allgather", AttentionKind.Softmax, ParallelScheme.AllGather);
        Run(c, 1, (a, x) =>
        {
            var ctx = a[0].Forward(x[0].Q, x[0].K, x[0].V, x[0].O, SavedInputs.Reference);
            a[0].Backward(ctx, x[0].DO, x[0].DQ, x[0].DK, x[0].DV);
            Assert.True(ctx.IsConsumed);
            var again = Assert.Throws<InvalidOperationException>(() => a[0].Backward(ctx, x[0].DO, x[0].DQ, x[0].DK, x[0].DV));
            Assert.Contains("consumed by Backward already", again.Message, StringComparison.Ordinal);
            ctx.Dispose(); // a no-op after Backward

            var dropped = a[0].Forward(x[0].Q, x[0].K, x[0].V, x[0].O, SavedInputs.Reference);
            dropped.Dispose();
            Assert.True(dropped.IsDisposed);
            var gone = Assert.Throws<ObjectDisposedException>(() => a[0].Backward(dropped, x[0].DO, x[0].DQ, x[0].DK, x[0].DV));
            Assert.Contains("keep it alive until Backward", gone.Message, StringComparison.Ordinal);

            var none = Assert.Throws<InvalidOperationException>(() => a[0].Backward(x[0].DO, x[0].DQ, x[0].DK, x[0].DV));
            Assert.Contains("call Forward first", none.Message, StringComparison.Ordinal);
        });
        Run(c, 2, (a, x) =>
        {
            var ctx = a[0].Forward(x[0].Q, x[0].K, x[0].V, x[0].O, SavedInputs.Reference);
            var foreign = Assert.Throws<InvalidOperationException>(() => a[1].Backward(ctx, x[0].DO, x[0].DQ, x[0].DK, x[0].DV));
            Assert.Contains("another layer", foreign.Message, StringComparison.Ordinal);
            ctx.Dispose();
            var disposedInput = a[0].Forward(x[0].Q, x[0].K, x[0].V, x[0].O, SavedInputs.Reference);
            using var q2 = a[0].AllocateLocal(H, D);
            x[0].Q.Dispose();
            var refused = Assert.Throws<InvalidOperationException>(() => a[0].Backward(disposedInput, x[0].DO, x[0].DQ, x[0].DK, x[0].DV));
            Assert.Contains("q was disposed after Forward", refused.Message, StringComparison.Ordinal);
            x[0].Q = q2;
            disposedInput.Dispose();
        }, oneLayerPerBatch: true);
    }

    [Fact]
    public void SteadyStateSteps_ReuseThePool_AndAllocateNoNativeMemory()
    {
        var c = new Case("lasp2", AttentionKind.Lightning, ParallelScheme.Lasp2);
        Run(c, 2, (a, x) =>
        {
            long before = 0;
            for (int step = 0; step < 4; step++)
            {
                // Two micro-batches alive at once, the second accumulating.
                var c0 = a[0].Forward(x[0].Q, x[0].K, x[0].V, x[0].O, SavedInputs.Copy);
                var c1 = a[0].Forward(x[1].Q, x[1].K, x[1].V, x[1].O, SavedInputs.Copy);
                a[0].Backward(c1, x[1].DO, x[1].DQ, x[1].DK, x[1].DV);
                a[0].Backward(c0, x[0].DO, x[1].DQ, x[1].DK, x[1].DV, accumulate: true);
                if (step == 1) before = CpuTensor.TotalAllocatedBytes;
            }
            Assert.Equal(2, a[0].PooledContexts);
            Assert.Equal(0, a[0].LiveContexts);
            // Process-wide counter: this class is in a collection that runs alone.
            Assert.Equal(before, CpuTensor.TotalAllocatedBytes);
        });
    }

    [Theory]
    [MemberData(nameof(Schemes))]
    public void SpanOverloads_EqualTheTensorOverloads(Case c)
    {
        var tensors = Run(c, 1, (a, x) =>
        {
            using var ctx = a[0].Forward(x[0].Q, x[0].K, x[0].V, x[0].O, SavedInputs.Copy);
            a[0].Backward(ctx, x[0].DO, x[0].DQ, x[0].DK, x[0].DV);
        });
        var spans = Run(c, 1, (a, x) =>
        {
            float[] Host(DeviceTensor t) { var h = new float[t.Length]; t.CopyToHost(h); return h; }
            var o = new float[x[0].O.Length];
            var dq = new float[x[0].DQ.Length];
            var dk = Enumerable.Repeat(1f, (int)x[0].DK.Length).ToArray();
            var dv = new float[x[0].DV.Length];
            var ctx = a[0].Forward(Host(x[0].Q), Host(x[0].K), Host(x[0].V), o);
            a[0].Backward(ctx, Host(x[0].DO), dq, dk, dv);
            // Accumulation through spans: a second step adds onto the first.
            var ctx2 = a[0].Forward(Host(x[0].Q), Host(x[0].K), Host(x[0].V), o);
            var twice = (float[])dv.Clone();
            a[0].Backward(ctx2, Host(x[0].DO), new float[dq.Length], new float[dk.Length], twice, accumulate: true);
            Assert.Equal(dv.Select(f => f + f).ToArray(), twice);
            x[0].O.CopyFromHost(o); x[0].DQ.CopyFromHost(dq); x[0].DK.CopyFromHost(dk); x[0].DV.CopyFromHost(dv);
        });
        Assert.Equal(tensors.O[0], spans.O[0]);
        Assert.Equal(tensors.DQ[0], spans.DQ[0]);
        Assert.Equal(tensors.DK[0], spans.DK[0]);
        Assert.Equal(tensors.DV[0], spans.DV[0]);
        Run(c, 1, (a, x) =>
        {
            var wrong = Assert.Throws<ArgumentException>(() => a[0].Forward(new float[3], new float[3], new float[3], new float[3]));
            Assert.Contains("pass this rank's rows only", wrong.Message, StringComparison.Ordinal);
            Assert.Equal("q", wrong.ParamName);
        });
    }

    [Fact]
    public void ShardThenGather_ReturnsTheWholeTensor_OnEveryRank_ForEveryLayout()
    {
        var global = Enumerable.Range(0, B * N * H * D).Select(i => (float)i).ToArray();
        foreach (var c in new[] { new Case("allgather", AttentionKind.Softmax, ParallelScheme.AllGather, Ranks: 3), new Case("hybrid", AttentionKind.Lightning, ParallelScheme.Hybrid, Ranks: 4), new Case("partial", AttentionKind.Softmax, ParallelScheme.Partial, Ranks: 4) })
        {
            var back = InProcessCommunicator.Run(c.Ranks, comm =>
            {
                using var backend = new CpuBackend(1);
                using var a = new SequenceParallelAttention(comm, backend, Shape, Options(c));
                using var local = a.AllocateLocal(H, D);
                a.Shard(global, local);
                var host = a.Shard(global, H * D);
                var fromTensor = new float[local.Length];
                local.CopyToHost(fromTensor);
                Assert.Equal(host, fromTensor);
                return a.Gather(local);
            });
            foreach (var g in back) Assert.Equal(global, g);
        }
    }

    [Fact]
    public void WrappedHostMemory_IsReadAndWrittenInPlace()
    {
        var c = new Case("lasp2", AttentionKind.Lightning, ParallelScheme.Lasp2, Ranks: 1);
        var x = Inputs(0, c.Attention);
        var o = new float[B * N * H * Dv];
        InProcessCommunicator.Run(1, comm =>
        {
            using var backend = new CpuBackend(1);
            using var a = new SequenceParallelAttention(comm, backend, Shape, Options(c));
            using var q = CpuTensor.Wrap(x[0], B, N, H, D);
            using var k = CpuTensor.Wrap(x[1], B, N, Hk, D);
            using var v = CpuTensor.Wrap(x[2], B, N, Hk, Dv);
            using var to = CpuTensor.Wrap(o, B, N, H, Dv);
            a.Forward(q, k, v, to);
            return 0;
        });
        var decay = new double[] { 1, 0.95f, 0.9f, 0.5 };
        var expected = ReferenceAttention.LightningForward(x[0].Select(f => (double)f).ToArray(), x[1].Select(f => (double)f).ToArray(),
            x[2].Select(f => (double)f).ToArray(), decay, true, null, new Dims(B, N, N, H, Hk, D, Dv)).O;
        Assert.True(ReferenceAttention.RelativeError(o, expected) < 1e-4);
        var bad = Assert.Throws<ArgumentException>(() => CpuTensor.Wrap(new float[10], 3, 4));
        Assert.Contains("needs 12", bad.Message, StringComparison.Ordinal);
    }
}
