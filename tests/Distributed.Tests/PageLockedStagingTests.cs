using Distributed.Cluster;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Distributed.Kernels.Ilgpu;
using Distributed.Reference;
using Distributed.Schemes;
using Xunit;

namespace Distributed.Tests;

/// <summary>
/// Staging of ILGPU tensors through page-locked host memory (<see cref="HostBuffer"/>): the arrays are
/// page-locked, reused across steps (no allocation after the first step), and the results equal those of
/// plain staging. Runs on ILGPU's CPU accelerator, whose page lock is a no-op: the bookkeeping and the data
/// path are what is checked here; the DMA itself needs a GPU.
/// </summary>
public sealed class PageLockedStagingTests
{
    [Fact]
    public void Grow_ForAnIlgpuRank_PageLocksOnceAndReusesTheArray()
    {
        using var backend = IlgpuBackend.CreateCpu();
        var before = HostBuffer.PageLockWith.Value;
        try
        {
            HostBuffer.PageLockWith.Value = backend;
            float[] buffer = [];
            HostBuffer.Grow(ref buffer, 100);
            Assert.True(HostBuffer.IsPageLocked(buffer));
            Assert.Equal(1, HostBuffer.PageLockedAllocations(backend));

            // Device → page-locked host → device carries the data unchanged.
            float[] data = [.. Enumerable.Range(0, 100).Select(i => 0.5f * i - 7f)];
            using var a = backend.Allocate(1, 100);
            using var b = backend.Allocate(1, 100);
            a.CopyFromHost(data);
            a.CopyToHost(buffer.AsSpan(0, 100));
            b.CopyFromHost(buffer.AsSpan(0, 100));
            var back = new float[100];
            b.CopyToHost(back);
            Assert.Equal(data, back);

            // A smaller or equal request reuses the array; a larger one replaces it and releases the old lock.
            var first = buffer;
            HostBuffer.Grow(ref buffer, 60);
            HostBuffer.Grow(ref buffer, 100);
            Assert.Same(first, buffer);
            Assert.Equal(1, HostBuffer.PageLockedAllocations(backend));
            HostBuffer.Grow(ref buffer, 101);
            Assert.NotSame(first, buffer);
            Assert.False(HostBuffer.IsPageLocked(first));
            Assert.True(HostBuffer.IsPageLocked(buffer));
            Assert.Equal(2, HostBuffer.PageLockedAllocations(backend));

            // CPU ranks keep managed arrays.
            HostBuffer.PageLockWith.Value = null;
            float[] plain = [];
            HostBuffer.Grow(ref plain, 100);
            Assert.False(HostBuffer.IsPageLocked(plain));
        }
        finally
        {
            HostBuffer.PageLockWith.Value = before;
        }
    }

    /// <summary>Ulysses stages through <see cref="HostBuffer.Grow"/>, LASP-2 its states through <see cref="HostBuffer.Allocate"/>.</summary>
    [Fact]
    public void Schemes_OnIlgpuRanks_StagePageLockedReuseItAndMatchTheCpuBackend()
    {
        var shape = new AttentionShape(1, 16, 2, 2, 16, 16);
        // One ILGPU backend per rank for both schemes, so the kernels compile once.
        var ilgpu = new[] { IlgpuBackend.CreateCpu(), IlgpuBackend.CreateCpu() };
        try
        {
            foreach (var (scheme, kind) in new[] { (ParallelScheme.Ulysses, AttentionKind.Softmax), (ParallelScheme.Lasp2, AttentionKind.Lightning) })
            {
                var options = new SequenceParallelOptions
                {
                    Attention = kind, Scheme = scheme, Causal = true,
                    Decay = kind == AttentionKind.Lightning ? [0.9f, 0.5f] : null,
                };
                var cpu = InProcessCommunicator.Run(2, comm =>
                {
                    using var backend = new CpuBackend(1);
                    return Steps(comm, backend, shape, options, null);
                }, TimeSpan.FromSeconds(300));
                var gpu = InProcessCommunicator.Run(2, comm => Steps(comm, ilgpu[comm.Rank], shape, options, ilgpu[comm.Rank]), TimeSpan.FromSeconds(300));
                for (int r = 0; r < 2; r++)
                {
                    var (g1, g2, locked0, locked1, locked2, pageLocked) = gpu[r];
                    Assert.True(pageLocked, $"{scheme} rank {r}: the rank does not stage page-locked");
                    Assert.True(locked1 > locked0, $"{scheme} rank {r}: no page-locked staging array was allocated");
                    Assert.Equal(locked1, locked2);
                    Assert.Equal(g1, g2);
                    double e = ReferenceAttention.RelativeError(g1, Array.ConvertAll(cpu[r].First, x => (double)x));
                    Assert.True(e <= 1e-5, $"{scheme} rank {r}: ILGPU vs CPU relative error {e:E2}");
                }
            }
        }
        finally
        {
            foreach (var b in ilgpu) b.Dispose();
        }
    }

    /// <summary>
    /// Two forward + backward steps of one rank: O, dQ, dK, dV of each step, the page-locked allocations
    /// before the scheme is built and after each step, and whether the rank's thread stages page-locked.
    /// </summary>
    private static (float[] First, float[] Second, long Locked0, long Locked1, long Locked2, bool PageLocked) Steps(
        ICommunicator comm, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options, IlgpuBackend? ilgpu)
    {
        long locked0 = ilgpu is null ? 0 : HostBuffer.PageLockedAllocations(ilgpu);
        using var attention = new SequenceParallelAttention(comm, backend, shape, options);
        int n = attention.LocalTokens, h = shape.Heads, d = shape.HeadDim;
        DeviceTensor Input(int seed)
        {
            var t = backend.Allocate(1, n, h, d);
            t.CopyFromHost([.. ReferenceAttention.Random((long)n * h * d, 100 * comm.Rank + seed).Select(x => (float)x)]);
            return t;
        }
        using var q = Input(1);
        using var k = Input(2);
        using var v = Input(3);
        using var dO = Input(4);
        using var o = backend.Allocate(1, n, h, d);
        using var dq = backend.Allocate(1, n, h, d);
        using var dk = backend.Allocate(1, n, h, d);
        using var dv = backend.Allocate(1, n, h, d);
        float[] Step()
        {
            attention.Forward(q, k, v, o);
            attention.Backward(dO, dq, dk, dv);
            return [.. new[] { o, dq, dk, dv }.SelectMany(t => { var a = new float[t.Length]; t.CopyToHost(a); return a; })];
        }
        var first = Step();
        long locked1 = ilgpu is null ? 0 : HostBuffer.PageLockedAllocations(ilgpu);
        var second = Step();
        long locked2 = ilgpu is null ? 0 : HostBuffer.PageLockedAllocations(ilgpu);
        return (first, second, locked0, locked1, locked2, ReferenceEquals(HostBuffer.PageLockWith.Value, ilgpu));
    }
}
