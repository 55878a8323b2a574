using Distributed.Kernels.Ilgpu;
using Distributed.Reference;
using Xunit;

namespace Distributed.Kernels.Tests;

/// <summary>
/// The kernel contract on ILGPU's CPU accelerator: the same kernels that compile to PTX, run by ILGPU's
/// debugging engine, so every grouping, barrier and tail path is checked without a GPU.
/// </summary>
[Collection(nameof(IlgpuAcceleratorCollection))]
public sealed class IlgpuBackendTests(IlgpuBackendFixture fixture) : KernelBackendContract, IClassFixture<IlgpuBackendFixture>
{
    /// <summary>
    /// One backend for every test of the class: making one compiles every kernel for ILGPU's CPU accelerator,
    /// which cost about 2–3 s per test when each test made its own. The tests run one at a time (the
    /// collection is not parallel), as a scheme's calls do.
    /// </summary>
    protected override IKernelBackend CreateBackend() => fixture.Backend;

    protected override bool DisposesBackend => false;

    /// <summary>Longer chunks than the contract's, so several 64-row blocks chain through strong decay.</summary>
    public static TheoryData<LightningCase> LongChunkLightningCases() =>
    [
        new LightningCase(1, 300, 4, 2, 16, 16, true, [0.01f, 0.3f, 0.9f, 1f], true),
    ];

    [Theory]
    [MemberData(nameof(LongChunkLightningCases))]
    public void LightningForward_LongChunkStrongDecay_MatchesReference(LightningCase c) => CheckLightningForward(c);

    [Theory]
    [MemberData(nameof(LongChunkLightningCases))]
    public void LightningBackward_LongChunkStrongDecay_MatchesReference(LightningCase c) => CheckLightningBackward(c);

    /// <summary>
    /// The tiled lightning kernels' own edges beyond the contract's: the upper accumulator half (D = Dv = 128,
    /// and D ≠ Dv with both above 64) in 64-row tiles with a tail, MQA with per-head decay from 1 to 0.01,
    /// and the non-causal whole-chunk state with 32-wide slices that end part-way (D = 96).
    /// </summary>
    public static TheoryData<LightningCase> RegisterTileLightningCases() =>
    [
        new LightningCase(1, 70, 2, 2, 128, 128, true, [1f, 0.05f], true),
        new LightningCase(1, 45, 4, 1, 128, 96, true, [0.9f, 1f, 0.3f, 0.01f], true),
        new LightningCase(1, 40, 2, 1, 96, 128, false, [1f, 1f], true),
    ];

    [Theory]
    [MemberData(nameof(RegisterTileLightningCases))]
    public void LightningForward_RegisterTileEdges_MatchesReference(LightningCase c) => CheckLightningForward(c);

    [Theory]
    [MemberData(nameof(RegisterTileLightningCases))]
    public void LightningBackward_RegisterTileEdges_MatchesReference(LightningCase c) => CheckLightningBackward(c);

    [Theory]
    [MemberData(nameof(RegisterTileLightningCases))]
    public void LightningInterChunkForward_RegisterTileEdges_MatchesReference(LightningCase c) =>
        LightningInterChunkForward_AddedToTheLocalOutput_EqualsTheWholeChunkWithS0(c);

    [Theory]
    [MemberData(nameof(RegisterTileLightningCases))]
    public void LightningInterChunkBackward_RegisterTileEdges_MatchesReference(LightningCase c) =>
        LightningInterChunkBackward_AddedToTheLocalGradients_EqualsTheWholeChunk(c);

    [Fact]
    public void LightningForward_HeadDimAbove128_NamesQ()
    {
        using var q = Backend.Allocate(1, 4, 1, 129);
        using var v = Backend.Allocate(1, 4, 1, 16);
        using var o = Backend.Allocate(1, 4, 1, 16);
        var e = Assert.Throws<ArgumentException>(() => Backend.LightningForward(q, q, v, [1f], true, null, o, null));
        Assert.Equal("q", e.ParamName);
        Assert.Contains("128", e.Message);
    }

    /// <summary>
    /// The FlashAttention-2 kernels' own edges beyond the contract's: two 64-row tiles with a tail and the
    /// upper accumulator half (D, Dv > 64) with Dv ≠ D under GQA (the contract's D = 128 case has Dv = D, H = Hk).
    /// </summary>
    public static TheoryData<FlashCase> RegisterTileFlashCases() =>
    [
        new FlashCase(1, 70, 70, 2, 1, 128, 96, false),
    ];

    [Theory]
    [MemberData(nameof(RegisterTileFlashCases))]
    public void FlashForward_RegisterTileEdges_MatchesReference(FlashCase c) => CheckFlashForward(c);

    [Theory]
    [MemberData(nameof(RegisterTileFlashCases))]
    public void FlashBackward_RegisterTileEdges_MatchesReference(FlashCase c) => CheckFlashBackward(c);

    [Fact]
    public void CopySlice_OverlappingWithinOneTensor_MovesTheOriginalRows()
    {
        // [1, 6, 2]: rows r0..r5 hold 10·r + column; rows 0..2 move to 2..4, overlapping rows 2.
        float[] data = [.. Enumerable.Range(0, 12).Select(e => 10f * (e / 2) + e % 2)];
        using var t = Backend.Allocate(1, 6, 2);
        t.CopyFromHost(data);
        Backend.CopySlice(t, 0, t, 2, 3, 1);
        float[] expected = [0, 1, 10, 11, 0, 1, 10, 11, 20, 21, 50, 51];
        Assert.Equal(expected, Download(t));
    }

    [Fact]
    public void CreateCpu_IsNamedIlgpuCpu()
    {
        Assert.Equal("ilgpu-cpu", Backend.Name);
    }

    [Fact]
    public void CreateBest_GivesAWorkingBackendOfTheBestKind()
    {
        // CUDA where a GPU is present, else OpenCL with the generic address space, else the CPU accelerator.
        using var cuda = IlgpuBackend.TryCreateCuda();
        using var best = IlgpuBackend.CreateBest();
        if (cuda is not null) Assert.Equal("ilgpu-cuda", best.Name);
        else Assert.Contains(best.Name, new[] { "ilgpu-opencl", "ilgpu-cpu" });
        var q = ReferenceAttention.Random(5L * 2 * 16, 3);
        var dims = new ReferenceAttention.Dims(1, 5, 5, 2, 2, 16, 16);
        var (eo, _) = ReferenceAttention.FlashForward(q, q, q, dims, 0, 0, true, 0.25);
        using var t = best.Allocate(1, 5, 2, 16);
        t.CopyFromHost(q.Select(x => (float)x).ToArray());
        using var o = best.Allocate(1, 5, 2, 16);
        using var lse = best.Allocate(1, 2, 5);
        best.FlashForward(t, t, t, o, lse, new FlashOptions(Causal: true));
        best.Synchronize();
        var got = new float[o.Length];
        o.CopyToHost(got);
        Assert.True(ReferenceAttention.RelativeError(got, eo) <= Tolerance);
    }

    [Fact]
    public void TensorFromAnotherBackend_IsRefusedWithItsName()
    {
        using var other = IlgpuBackend.CreateCpu();
        using var foreign = other.Allocate(1, 4, 4, 16);
        using var mine = Backend.Allocate(1, 4, 4, 16);
        using var lse = Backend.Allocate(1, 4, 4);
        var e = Assert.Throws<ArgumentException>(() => Backend.FlashForward(mine, foreign, mine, mine, lse, default));
        Assert.Equal("k", e.ParamName);
    }

    [Fact]
    public void FlashForward_HeadDimAbove128_IsRefused()
    {
        using var q = Backend.Allocate(1, 2, 1, 160);
        using var o = Backend.Allocate(1, 2, 1, 160);
        using var lse = Backend.Allocate(1, 1, 2);
        var e = Assert.Throws<ArgumentException>(() => Backend.FlashForward(q, q, q, o, lse, default));
        Assert.Equal("q", e.ParamName);
    }
}

/// <summary>
/// ILGPU's CPU accelerator runs each group's threads as OS threads that meet at barriers; it gave rare
/// wrong results when the machine was heavily oversubscribed, so its suite runs alone, not beside the others.
/// </summary>
[CollectionDefinition(nameof(IlgpuAcceleratorCollection), DisableParallelization = true)]
public sealed class IlgpuAcceleratorCollection;

/// <summary>The ILGPU CPU backend shared by <see cref="IlgpuBackendTests"/>, disposed after the class.</summary>
public sealed class IlgpuBackendFixture : IDisposable
{
    public IlgpuBackend Backend { get; } = IlgpuBackend.CreateCpu();

    public void Dispose() => Backend.Dispose();
}
