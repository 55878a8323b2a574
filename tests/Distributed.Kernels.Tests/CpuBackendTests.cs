using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Distributed.Reference;
using Xunit;

namespace Distributed.Kernels.Tests;

/// <summary>The contract on the vectorised CPU backend, plus the large shapes only it can afford here.</summary>
public sealed class CpuBackendTests : KernelBackendContract
{
    protected override IKernelBackend CreateBackend() => new CpuBackend(2);

    [Theory]
    [MemberData(nameof(LargeFlashCases))]
    public void FlashForward_Large_MatchesReference(FlashCase c) => CheckFlashForward(c);

    [Theory]
    [MemberData(nameof(LargeFlashBackwardCases))]
    public void FlashBackward_Large_MatchesReference(FlashCase c) => CheckFlashBackward(c);

    [Theory]
    [MemberData(nameof(LargeLightningCases))]
    public void LightningForward_Large_MatchesReference(LightningCase c) => CheckLightningForward(c);

    [Theory]
    [MemberData(nameof(LargeLightningBackwardCases))]
    public void LightningBackward_Large_MatchesReference(LightningCase c) => CheckLightningBackward(c);

    /// <summary>
    /// Shapes past <see cref="CpuRowOps.ParallelFloats"/> take the threaded, vectorised path of the per-row
    /// steps (the contract's small shapes run on one thread); Dv = 40 leaves a vector tail.
    /// </summary>
    [Fact]
    public void RowSteps_AtThreadedSizes_MatchTheReference()
    {
        const int b = 2, n = 700, h = 3, dv = 40;
        long len = (long)b * n * h * dv, rows = (long)b * h * n;
        Assert.True(len >= CpuRowOps.ParallelFloats);
        var oa = ReferenceAttention.Random(len, 1);
        var ob = ReferenceAttention.Random(len, 2);
        var la = ReferenceAttention.Random(rows, 3, 4.0);
        var lb = ReferenceAttention.Random(rows, 4, 4.0);
        la[5] = double.NegativeInfinity; // takes B
        lb[7] = double.NegativeInfinity; // keeps A
        var (eo, expectedLse) = ReferenceAttention.MergeSoftmax(oa, la, ob, lb, b, n, h, dv);
        using var toa = Upload(oa, b, n, h, dv);
        using var tla = Upload(la, b, h, n);
        using var tob = Upload(ob, b, n, h, dv);
        using var tlb = Upload(lb, b, h, n);
        Backend.MergeSoftmax(toa, tla, tob, tlb);
        AssertClose(eo, toa, "merged O");
        AssertClose(expectedLse, tla, "merged LSE");

        // Drow[b, h, i] = Σ_e O·dO, from the definition in fp64.
        var drow = new double[rows];
        for (int bb = 0; bb < b; bb++)
            for (int i = 0; i < n; i++)
                for (int hh = 0; hh < h; hh++)
                    for (int e = 0; e < dv; e++)
                    {
                        long off = (((long)bb * n + i) * h + hh) * dv + e;
                        drow[((long)bb * h + hh) * n + i] += oa[off] * ob[off];
                    }
        using var to = Upload(oa, b, n, h, dv);
        using var tdrow = Stale(b, h, n);
        Backend.SoftmaxRowDot(to, tob, tdrow);
        AssertClose(drow, tdrow, "Drow");

        // Tokens [100, 100 + 500) of O to [50, 550) of a 600-token tensor; the rest stays as it was.
        using var dst = Stale(b, 600, h, dv);
        Backend.CopySlice(to, 100, dst, 50, 500, 1);
        var got = Download(dst);
        for (int bb = 0; bb < b; bb++)
            for (int t = 0; t < 600; t++)
                for (int c = 0; c < h * dv; c++)
                {
                    float want = t is >= 50 and < 550 ? (float)oa[((long)bb * n + t + 50) * h * dv + c] : 7.25f;
                    Assert.Equal(want, got[((long)bb * 600 + t) * h * dv + c]);
                }
    }

    [Fact]
    public void OneThreadAndTwoThreads_GiveTheSameBits()
    {
        using var one = new CpuBackend(1);
        using var two = new CpuBackend(2);
        float[] Run(IKernelBackend be)
        {
            var q = ReferenceAttention.Random(300L * 4 * 64, 7);
            using var tq = be.Allocate(1, 300, 4, 64); tq.CopyFromHost(q.Select(d => (float)d).ToArray());
            using var o = be.Allocate(1, 300, 4, 64);
            using var lse = be.Allocate(1, 4, 300);
            be.FlashForward(tq, tq, tq, o, lse, new FlashOptions(Causal: true));
            var r = new float[o.Length];
            o.CopyToHost(r);
            return r;
        }
        Assert.Equal(Run(one), Run(two));
    }
}

/// <summary>
/// The contract with a packing budget of one float: the softmax forward packs K and V one KV head per
/// pass, the path very long sequences take (the buffer never holds all of K and V).
/// </summary>
public sealed class CpuBackendOneHeadPackingTests : KernelBackendContract
{
    protected override IKernelBackend CreateBackend() => new CpuBackend(2) { PackBudget = 1 };

    [Fact]
    public void TensorsAreNativeMemory_FreedOnDispose()
    {
        long before = CpuTensor.TotalAllocatedBytes;
        using var backend = new CpuBackend(1);
        var t = backend.Allocate(2, 3, 4, 5);
        Assert.True(CpuTensor.TotalAllocatedBytes - before >= 2 * 3 * 4 * 5 * sizeof(float));
        var x = new float[120];
        t.CopyToHost(x);
        Assert.All(x, v => Assert.Equal(0f, v)); // zero-filled
        t.CopyFromHost([1f, 2f], 118);
        t.CopyToHost(x.AsSpan(0, 2), 118);
        Assert.Equal([1f, 2f], x[..2]);
        Assert.Throws<ArgumentOutOfRangeException>(() => t.CopyFromHost([1f, 2f], 119));
        unsafe { Assert.Equal(0L, (long)((CpuTensor)t).Pointer % 64); }
        t.Dispose();
    }

    [Fact]
    public void TryView_AliasesTokensOfABatchOfOne_AndRefusesLargerBatches()
    {
        using var backend = new CpuBackend(1);
        using var t = backend.Allocate(1, 10, 2, 3);
        t.CopyFromHost(Enumerable.Range(0, 60).Select(i => (float)i).ToArray());
        using var view = backend.TryView(t, 4, 3)!;
        Assert.Equal([1, 3, 2, 3], view.Shape);
        var x = new float[18];
        view.CopyToHost(x);
        Assert.Equal(Enumerable.Range(24, 18).Select(i => (float)i), x);
        view.CopyFromHost([-1f], 17);
        t.CopyToHost(x.AsSpan(0, 1), 41);
        Assert.Equal(-1f, x[0]); // writes reach the source
        using var b2 = backend.Allocate(2, 10, 2, 3);
        Assert.Null(backend.TryView(b2, 0, 5));
    }
}

/// <summary>The same contract with AVX-512 and AVX2 switched off: the scalar fallback must be right too.</summary>
[Collection(nameof(ScalarPathCollection))]
public sealed class CpuScalarPathTests : KernelBackendContract
{
    private readonly (bool V512, bool V256) _was = (CpuMath.UseVector512, CpuMath.UseVector256);

    public CpuScalarPathTests() => (CpuMath.UseVector512, CpuMath.UseVector256) = (false, false);

    protected override IKernelBackend CreateBackend() => new CpuBackend(2);

    protected override void OnDispose() => (CpuMath.UseVector512, CpuMath.UseVector256) = _was;
}

/// <summary>The scalar-path suite flips a process-wide switch, so nothing runs beside it.</summary>
[CollectionDefinition(nameof(ScalarPathCollection), DisableParallelization = true)]
public sealed class ScalarPathCollection;

/// <summary>
/// The same contract on the AVX2 path: on a machine with AVX-512 the vectorised backend would otherwise
/// never run its 8-lane code here. Where AVX2 itself is missing this repeats the scalar suite.
/// </summary>
[Collection(nameof(ScalarPathCollection))]
public sealed class CpuAvx2PathTests : KernelBackendContract
{
    private readonly (bool V512, bool V256) _was = (CpuMath.UseVector512, CpuMath.UseVector256);

    public CpuAvx2PathTests() => (CpuMath.UseVector512, CpuMath.UseVector256) = (false, _was.V256);

    protected override IKernelBackend CreateBackend() => new CpuBackend(2);

    protected override void OnDispose() => (CpuMath.UseVector512, CpuMath.UseVector256) = _was;

    [Fact]
    public void PathName_SaysAvx2WhenAvx512IsOff()
    {
        if (_was.V256) Assert.Equal("avx2", CpuMath.PathName);
        else Assert.Equal("scalar", CpuMath.PathName);
    }

    [Theory]
    [MemberData(nameof(LargeFlashBackwardCases))]
    public void FlashBackward_Large_MatchesReference(FlashCase c) => CheckFlashBackward(c);
}

/// <summary>The register transpose the lightning kernels use for whole 16×16 blocks, against plain indexing.</summary>
public sealed unsafe class CpuTransposeTests
{
    [Theory]
    [InlineData(16, 16)]
    [InlineData(20, 37)]
    public void Transpose16x16_MovesEveryElementToItsTransposedPlace(int ld, int ldDst)
    {
        if (!System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated) return; // the AVX-512 path only exists there
        var src = new float[16 * ld];
        var dst = new float[16 * ldDst];
        for (int i = 0; i < src.Length; i++) src[i] = i + 0.5f;
        fixed (float* s = src, d = dst) CpuMath.Transpose16x16(s, ld, d, ldDst);
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < 16; c++)
                Assert.Equal(src[r * ld + c], dst[c * ldDst + r]);
        for (int c = 0; c < 16; c++)
            for (int r = 16; r < ldDst; r++) Assert.Equal(0f, dst[c * ldDst + r]); // nothing written past the block
    }
}
