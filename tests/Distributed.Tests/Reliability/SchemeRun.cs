using Distributed.Cluster;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;

namespace Distributed.Tests.Reliability;

/// <summary>One scheme configuration of the reliability suites (global shape and options).</summary>
public sealed record SchemeCase(string Name, AttentionShape Shape, SequenceParallelOptions Options)
{
    public override string ToString() => Name;

    /// <summary>Whether the scheme can run on <paramref name="ranks"/> ranks (Ulysses and hybrid split heads).</summary>
    public bool RunsOn(int ranks)
    {
        try
        {
            SequenceParallelAttention.CheckFits(Shape, Options, ranks, 1, checkHostMemory: false);
            return true;
        }
        catch (ArgumentException) { return false; }
    }
}

/// <summary>Global inputs (C order, fp32) of one forward + backward: Q [B,N,H,D], K, V [B,N,Hk,·], dO [B,N,H,Dv].</summary>
public sealed record GlobalInputs(float[] Q, float[] K, float[] V, float[] DO)
{
    /// <summary>Uniform in [-amplitude, amplitude) from a fixed seed (K scaled by <paramref name="kAmplitude"/>).</summary>
    public static GlobalInputs Random(AttentionShape s, int seed, float amplitude = 1f, float kAmplitude = 1f)
    {
        var rng = new Random(seed);
        float[] Fill(long n, float a)
        {
            var x = new float[n];
            for (long i = 0; i < n; i++) x[i] = (float)((rng.NextDouble() * 2 - 1) * a);
            return x;
        }
        long b = s.Batch, n = s.SeqLen;
        return new GlobalInputs(Fill(b * n * s.Heads * s.HeadDim, amplitude), Fill(b * n * s.KvHeads * s.HeadDim, amplitude * kAmplitude),
            Fill(b * n * s.KvHeads * s.ValueDim, amplitude), Fill(b * n * s.Heads * s.ValueDim, 1f));
    }
}

/// <summary>Global outputs put back in token order: O [B,N,H,Dv], dQ, dK, dV.</summary>
public sealed record GlobalOutputs(float[] O, float[] DQ, float[] DK, float[] DV)
{
    /// <summary>True when every output is bit-for-bit equal to <paramref name="other"/>'s (NaN payloads included).</summary>
    public bool BitwiseEquals(GlobalOutputs other) =>
        Same(O, other.O) && Same(DQ, other.DQ) && Same(DK, other.DK) && Same(DV, other.DV);

    private static bool Same(float[] a, float[] b) =>
        System.Runtime.InteropServices.MemoryMarshal.AsBytes(a.AsSpan()).SequenceEqual(System.Runtime.InteropServices.MemoryMarshal.AsBytes(b.AsSpan()));
}

/// <summary>
/// Runs one forward + backward of a scheme on P in-process ranks: each rank takes its shards of the global inputs,
/// and the local outputs are put back in global order. The backend is made per rank by <c>backendFactory</c>.
/// </summary>
public static class SchemeRun
{
    public static GlobalOutputs Run(SchemeCase c, int ranks, GlobalInputs x, Func<IKernelBackend>? backendFactory = null, int steps = 1) =>
        Run(c, ranks, x, backendFactory ?? (() => new CpuBackend(1)), null, steps);

    /// <summary>As <see cref="Run(SchemeCase, int, GlobalInputs, Func{IKernelBackend}?, int)"/>, on backends the caller
    /// keeps (rank r uses <paramref name="perRank"/>[r], not disposed): backends that compile their kernels on first use
    /// compile them once for many runs.</summary>
    public static GlobalOutputs Run(SchemeCase c, GlobalInputs x, IKernelBackend[] perRank) => Run(c, perRank.Length, x, null, perRank, 1);

    private static GlobalOutputs Run(SchemeCase c, int ranks, GlobalInputs x, Func<IKernelBackend>? backendFactory, IKernelBackend[]? perRank, int steps) =>
        Steps(c, ranks, x, backendFactory, perRank, steps)[^1];

    /// <summary>One layer on <paramref name="ranks"/> fresh in-process ranks (CPU backend, 1 thread) running
    /// <paramref name="steps"/> forward + backward steps; the global outputs of every step.</summary>
    public static List<GlobalOutputs> Steps(SchemeCase c, int ranks, GlobalInputs x, int steps) => Steps(c, ranks, x, () => new CpuBackend(1), null, steps);

    private static List<GlobalOutputs> Steps(SchemeCase c, int ranks, GlobalInputs x, Func<IKernelBackend>? backendFactory, IKernelBackend[]? perRank, int steps)
    {
        var s = c.Shape;
        var results = Enumerable.Range(0, steps).Select(_ => new GlobalOutputs(new float[(long)s.Batch * s.SeqLen * s.Heads * s.ValueDim],
            new float[x.Q.Length], new float[x.K.Length], new float[x.V.Length])).ToList();
        InProcessCommunicator.Run(ranks, comm =>
        {
            var backend = perRank?[comm.Rank] ?? backendFactory!();
            using var owned = perRank is null ? backend : null;
            using var attention = new SequenceParallelAttention(comm, backend, s, c.Options);
            var r = attention.LocalTokenRanges;
            int n = attention.LocalTokens;
            DeviceTensor Local(float[] g, int width, params int[] shape)
            {
                var local = new float[(long)s.Batch * n * width];
                Sharding.TakeLocal(g, local, s.Batch, s.SeqLen, width, r);
                var t = backend.Allocate(shape);
                t.CopyFromHost(local);
                return t;
            }
            using var q = Local(x.Q, s.Heads * s.HeadDim, s.Batch, n, s.Heads, s.HeadDim);
            using var k = Local(x.K, s.KvHeads * s.HeadDim, s.Batch, n, s.KvHeads, s.HeadDim);
            using var v = Local(x.V, s.KvHeads * s.ValueDim, s.Batch, n, s.KvHeads, s.ValueDim);
            using var dO = Local(x.DO, s.Heads * s.ValueDim, s.Batch, n, s.Heads, s.ValueDim);
            using var o = backend.Allocate(s.Batch, n, s.Heads, s.ValueDim);
            using var dq = backend.Allocate(s.Batch, n, s.Heads, s.HeadDim);
            using var dk = backend.Allocate(s.Batch, n, s.KvHeads, s.HeadDim);
            using var dv = backend.Allocate(s.Batch, n, s.KvHeads, s.ValueDim);
            for (int step = 0; step < steps; step++)
            {
                attention.Forward(q, k, v, o);
                attention.Backward(dO, dq, dk, dv);
                var into = results[step];
                void Put(DeviceTensor t, float[] g, int width)
                {
                    var local = new float[t.Length];
                    t.CopyToHost(local);
                    lock (results) Sharding.PutLocal(local, g, s.Batch, s.SeqLen, width, r);
                }
                Put(o, into.O, s.Heads * s.ValueDim);
                Put(dq, into.DQ, s.Heads * s.HeadDim);
                Put(dk, into.DK, s.KvHeads * s.HeadDim);
                Put(dv, into.DV, s.KvHeads * s.ValueDim);
            }
            return 0;
        }, TimeSpan.FromSeconds(300));
        return results;
    }

    /// <summary>Every scheme (and the hybrid's sequence schemes) at one shape: H must be divisible by P for Ulysses.</summary>
    public static IEnumerable<SchemeCase> AllSchemes(AttentionShape s, bool causal = true)
    {
        float[] decay = Enumerable.Range(0, s.Heads).Select(h => h % 2 == 0 ? 0.999f : 1f).ToArray();
        SequenceParallelOptions Soft(ParallelScheme p) => new() { Attention = AttentionKind.Softmax, Scheme = p, Causal = causal };
        SequenceParallelOptions Light(ParallelScheme p) => new() { Attention = AttentionKind.Lightning, Scheme = p, Causal = causal, Decay = decay };
        yield return new("lasp2", s, Light(ParallelScheme.Lasp2));
        yield return new("lasp2 contiguous", s, Light(ParallelScheme.Lasp2) with { Layout = ShardLayout.Contiguous });
        yield return new("ulysses lightning", s, Light(ParallelScheme.Ulysses));
        yield return new("hybrid lightning Ph=2", s, Light(ParallelScheme.Hybrid) with { UlyssesDegree = 2 });
        yield return new("allgather", s, Soft(ParallelScheme.AllGather));
        yield return new("ring", s, Soft(ParallelScheme.Ring));
        yield return new("partial", s, Soft(ParallelScheme.Partial));
        yield return new("ulysses softmax", s, Soft(ParallelScheme.Ulysses));
        yield return new("hybrid softmax Ph=2 x allgather", s, Soft(ParallelScheme.Hybrid) with { UlyssesDegree = 2 });
        yield return new("hybrid softmax Ph=2 x ring", s, Soft(ParallelScheme.Hybrid) with { UlyssesDegree = 2, HybridSequenceScheme = ParallelScheme.Ring });
        yield return new("hybrid softmax Ph=2 x partial", s, Soft(ParallelScheme.Hybrid) with { UlyssesDegree = 2, HybridSequenceScheme = ParallelScheme.Partial });
    }
}
