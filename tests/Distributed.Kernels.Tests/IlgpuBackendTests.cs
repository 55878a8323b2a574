using Distributed.Kernels.Ilgpu;
using Xunit;

namespace Distributed.Kernels.Tests;

/// <summary>
/// The kernel contract on ILGPU's CPU accelerator: the same kernels that compile to PTX, run by ILGPU's
/// debugging engine, so every grouping, barrier and tail path is checked without a GPU.
/// </summary>
public sealed class IlgpuBackendTests : KernelBackendContract
{
    protected override IKernelBackend CreateBackend() => IlgpuBackend.CreateCpu();

    [Fact]
    public void CreateCpu_IsNamedIlgpuCpu()
    {
        Assert.Equal("ilgpu-cpu", Backend.Name);
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
