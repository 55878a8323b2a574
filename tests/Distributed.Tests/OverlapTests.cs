using Distributed.Cluster;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Distributed.Reference;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// LASP-2 with the state all-gather hidden behind the intra-chunk work, and ring attention with its K/V blocks
/// (and, in backward, dK/dV accumulators) in flight during block compute: the same results as the blocking path
/// (within fp32 rounding), bitwise the same from run to run, and on an emulated slow link the rank waits for
/// clearly less than the link's time. (Both paths against the fp64 reference for P = 1..4: <see cref="SchemeTests"/>.)
/// </summary>
public sealed class OverlapTests(ITestOutputHelper output)
{
    private static SchemeTests.Case Lasp2(bool overlap, bool causal = true, bool zigzag = true) =>
        new($"lasp2 overlap {overlap}", AttentionKind.Lightning, ParallelScheme.Lasp2, causal, zigzag ? ShardLayout.Zigzag : ShardLayout.Contiguous,
            [1f, 0.99f, 0.9f, 0.5f], N: 200, Hk: 2, Overlap: overlap);

    private static (double[] q, double[] k, double[] v, double[] dO) Inputs(SchemeTests.Case c) =>
        (ReferenceAttention.Random((long)c.B * c.N * c.H * c.D, 11), ReferenceAttention.Random((long)c.B * c.N * c.Hk * c.D, 12, 0.25),
         ReferenceAttention.Random((long)c.B * c.N * c.Hk * c.Dv, 13), ReferenceAttention.Random((long)c.B * c.N * c.H * c.Dv, 14));

    [Theory]
    [InlineData(true, 2, true)]
    [InlineData(true, 4, true)]
    [InlineData(true, 3, false)]
    [InlineData(false, 3, false)]
    [InlineData(false, 4, true)]
    public void Lasp2_OverlapOnAndOff_EqualWithinFp32Rounding_OnBitwiseRepeatable(bool causal, int ranks, bool zigzag)
    {
        // Zigzag overlapped: two all-gathers per pass (one per half), with the inter-chunk terms added as their halves arrive.
        var on = Lasp2(true, causal, zigzag);
        var (q, k, v, dO) = Inputs(on);
        var a = SchemeTests.RunDistributed(on, ranks, q, k, v, dO);
        var b = SchemeTests.RunDistributed(on, ranks, q, k, v, dO);
        var off = SchemeTests.RunDistributed(Lasp2(false, causal, zigzag), ranks, q, k, v, dO);
        foreach (var (name, x, y, z) in new[] { ("O", a.O, b.O, off.O), ("dQ", a.DQ, b.DQ, off.DQ), ("dK", a.DK, b.DK, off.DK), ("dV", a.DV, b.DV, off.DV) })
        {
            Assert.True(x.AsSpan().SequenceEqual(y), $"{name}: two overlapped runs differ");
            double e = ReferenceAttention.RelativeError(x, z.Select(f => (double)f).ToArray());
            output.WriteLine($"P={ranks} {(zigzag ? "zigzag" : "contiguous")} {name}: overlap on vs off relative difference {e:E2}");
            Assert.True(e <= 1e-5, $"{name}: overlap on and off differ by {e:E2} (more than fp32 rounding)");
        }
    }

    private static SchemeTests.Case Ring(bool overlap, bool causal) =>
        new($"ring overlap {overlap}", AttentionKind.Softmax, ParallelScheme.Ring, causal, causal ? ShardLayout.Zigzag : ShardLayout.Contiguous,
            null, N: 203, Hk: 2, Overlap: overlap);

    [Theory]
    [InlineData(true, 2)]
    [InlineData(true, 4)]
    [InlineData(false, 3)]
    public void Ring_OverlapOnAndOff_EqualWithinFp32Rounding_OnBitwiseRepeatable(bool causal, int ranks)
    {
        // The backward overlaps both streams (the next K/V block and the travelling dK/dV accumulator).
        var on = Ring(true, causal);
        var (q, k, v, dO) = Inputs(on);
        var a = SchemeTests.RunDistributed(on, ranks, q, k, v, dO);
        var b = SchemeTests.RunDistributed(on, ranks, q, k, v, dO);
        var off = SchemeTests.RunDistributed(Ring(false, causal), ranks, q, k, v, dO);
        foreach (var (name, x, y, z) in new[] { ("O", a.O, b.O, off.O), ("dQ", a.DQ, b.DQ, off.DQ), ("dK", a.DK, b.DK, off.DK), ("dV", a.DV, b.DV, off.DV) })
        {
            Assert.True(x.AsSpan().SequenceEqual(y), $"{name}: two overlapped runs differ");
            double e = ReferenceAttention.RelativeError(x, z.Select(f => (double)f).ToArray());
            output.WriteLine($"P={ranks} {name}: overlap on vs off relative difference {e:E2} (bitwise equal: {x.AsSpan().SequenceEqual(z)})");
            Assert.True(e <= 1e-5, $"{name}: overlap on and off differ by {e:E2} (more than fp32 rounding)");
        }
    }

    /// <summary>Each rank's hidden share of its link time over one ring forward + backward step on 3 ranks.</summary>
    /// <summary>A [1, n, 4, 64] tensor of uniform values in ±scale/2, drawn from <paramref name="rng"/>.</summary>
    private static DeviceTensor RandomRows(CpuBackend backend, int n, Random rng, float scale)
    {
        var t = backend.Allocate(1, n, 4, 64);
        t.CopyFromHost(Enumerable.Range(0, n * 4 * 64).Select(_ => (float)(rng.NextDouble() - 0.5) * scale).ToArray());
        return t;
    }

    private static double[] RingHiddenOnEmulatedLink(bool overlap, bool backwardOnly)
    {
        // Causal softmax, 3 ranks, 1,536 tokens: each block step computes for tens of milliseconds per rank on
        // one thread; every transfer gets 5 ms of link time. The backward's last transfer (every block going
        // home) has nothing left to hide behind, so a fully overlapped backward hides about 4 of its 5 transfers.
        var shape = new AttentionShape(1, 1536, 4, 4, 64, 64);
        var options = new SequenceParallelOptions { Attention = AttentionKind.Softmax, Scheme = ParallelScheme.Ring, Causal = true, Overlap = overlap };
        var link = EmulatedLink.FromGigabytesPerSecond(1000, 5_000);
        return InProcessCommunicator.Run(3, inner =>
        {
            using var comm = new EmulatedLinkCommunicator(inner, link);
            using var backend = new CpuBackend(1);
            using var attention = new SequenceParallelAttention(comm, backend, shape, options);
            int n = attention.LocalTokens;
            var rng = new Random(7 + comm.Rank);
            using DeviceTensor q = RandomRows(backend, n, rng, 1f), k = RandomRows(backend, n, rng, 1f), v = RandomRows(backend, n, rng, 1f), dO = RandomRows(backend, n, rng, 1f);
            using DeviceTensor o = backend.Allocate(1, n, 4, 64), dq = backend.Allocate(1, n, 4, 64), dk = backend.Allocate(1, n, 4, 64), dv = backend.Allocate(1, n, 4, 64);
            comm.Statistics.Reset();
            attention.Forward(q, k, v, o);
            if (backwardOnly) comm.Statistics.Reset();
            attention.Backward(dO, dq, dk, dv);
            return comm.Statistics.HiddenFraction;
        }, TimeSpan.FromSeconds(120));
    }

    [Fact]
    public void Ring_Backward_OnAnEmulatedSlowLink_OverlapHidesCommunication_BlockingHidesNone()
    {
        var on = RingHiddenOnEmulatedLink(overlap: true, backwardOnly: true);
        var off = RingHiddenOnEmulatedLink(overlap: false, backwardOnly: true);
        output.WriteLine($"ring backward hidden with overlap: {string.Join(", ", on.Select(h => h.ToString("P0")))}; without: {string.Join(", ", off.Select(h => h.ToString("P0")))}");
        // Loose, and over the ranks' mean: on a loaded machine one rank can spend its whole link time waiting
        // for a descheduled peer (that counts as waited, never hidden); the benchmark reports the real figure.
        Assert.True(on.Average() > 0.15, $"the ring backward's overlap hid only {on.Average():P0} of the link time on average");
        Assert.All(off, h => Assert.Equal(0, h));
    }

    /// <summary>Each rank's hidden share of its link time over one forward + backward step.</summary>
    private static double[] HiddenOnEmulatedLink(bool overlap)
    {
        // 4 heads of 64 × 64 over 32,768 tokens: each rank's intra-chunk work takes tens of milliseconds on one
        // thread (more on a loaded machine). A state half is 4·64·64 floats = 64 KiB, so at 0.0064 GB/s each
        // all-gather takes about 10 ms of link (bandwidth, not latency: two pieces per pass must not pay a fixed
        // latency twice for the test to mean anything), which the overlapped path hides behind that work.
        var shape = new AttentionShape(1, 32768, 4, 4, 64, 64);
        var options = new SequenceParallelOptions { Attention = AttentionKind.Lightning, Scheme = ParallelScheme.Lasp2, Causal = true, Decay = [1f, 0.99f, 0.9f, 0.5f], Overlap = overlap };
        var link = EmulatedLink.FromGigabytesPerSecond(0.0064, 0);
        return InProcessCommunicator.Run(2, inner =>
        {
            using var comm = new EmulatedLinkCommunicator(inner, link);
            using var backend = new CpuBackend(1);
            using var attention = new SequenceParallelAttention(comm, backend, shape, options);
            int n = attention.LocalTokens;
            var rng = new Random(5 + comm.Rank);
            using DeviceTensor q = RandomRows(backend, n, rng, 0.2f), k = RandomRows(backend, n, rng, 0.2f), v = RandomRows(backend, n, rng, 0.2f), dO = RandomRows(backend, n, rng, 0.2f);
            using DeviceTensor o = backend.Allocate(1, n, 4, 64), dq = backend.Allocate(1, n, 4, 64), dk = backend.Allocate(1, n, 4, 64), dv = backend.Allocate(1, n, 4, 64);
            comm.Statistics.Reset();
            attention.Forward(q, k, v, o);
            attention.Backward(dO, dq, dk, dv);
            Assert.Equal(overlap ? 4 : 2, comm.Statistics.Collectives); // overlapped: one all-gather per zigzag half
            return comm.Statistics.HiddenFraction;
        }, TimeSpan.FromSeconds(120));
    }

    [Fact]
    public void Lasp2_OnAnEmulatedSlowLink_OverlapHidesCommunication_BlockingHidesNone()
    {
        var on = HiddenOnEmulatedLink(overlap: true);
        var off = HiddenOnEmulatedLink(overlap: false);
        output.WriteLine($"hidden with overlap: {string.Join(", ", on.Select(h => h.ToString("P0")))}; without: {string.Join(", ", off.Select(h => h.ToString("P0")))}");
        // Loose, and over the ranks' mean, as for the ring: on a loaded machine a descheduled rank starts its
        // all-gather late and its peer's wait for it counts as waited, never hidden (seen once in a full-suite run:
        // 100% and 5%); the benchmark reports the smallest share.
        Assert.True(on.Average() > 0.25, $"overlap hid only {on.Average():P0} of the link time on average ({string.Join(", ", on.Select(h => h.ToString("P0")))})");
        Assert.All(off, h => Assert.Equal(0, h));
    }
}
