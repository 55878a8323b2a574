using Xunit;

namespace Distributed.Kernels.Tests;

/// <summary>Which backend and GPU each rank gets, with a fake device count (no GPU needed).</summary>
public sealed class DevicePlacementTests
{
    [Theory]
    [InlineData(4, 2, new[] { 0, 1, 0, 1 })]
    [InlineData(3, 4, new[] { 0, 1, 2 })]
    [InlineData(5, 1, new[] { 0, 0, 0, 0, 0 })]
    public void Choose_CudaRanks_MapToLocalRankModuloDeviceCount(int ranks, int devices, int[] expected)
    {
        foreach (string backend in new[] { "ilgpu-cuda", "auto" })
        {
            var placed = Enumerable.Range(0, ranks).Select(r => DevicePlacement.Choose(backend, r, ranks, null, devices)).ToList();
            Assert.Equal(expected, placed.Select(p => p.Device));
            Assert.All(placed, p => Assert.Equal("ilgpu-cuda", p.Backend));
        }
    }

    [Fact]
    public void Choose_Auto_NeverMixesCudaAndCpuRanks()
    {
        // Before: a rank at or above the GPU count silently got the CPU backend.
        for (int devices = 0; devices <= 3; devices++)
        {
            var backends = Enumerable.Range(0, 8).Select(r => DevicePlacement.Choose("auto", r, 8, null, devices).Backend).Distinct().ToList();
            Assert.Equal([devices == 0 ? "cpu" : "ilgpu-cuda"], backends);
        }
    }

    [Fact]
    public void Choose_MoreRanksThanGpus_WarnsOnEveryRank()
    {
        var shared = DevicePlacement.Choose("auto", 1, 4, null, 2);
        Assert.NotNull(shared.Warning);
        Assert.Contains("4 ranks", shared.Warning);
        Assert.Contains("2 GPU", shared.Warning);
        Assert.Null(DevicePlacement.Choose("auto", 1, 2, null, 2).Warning);
    }

    [Fact]
    public void Choose_GivenDevice_OverridesTheLocalRank()
    {
        var p = DevicePlacement.Choose("ilgpu-cuda", 3, 4, 1, 2);
        Assert.Equal(("ilgpu-cuda", 1), (p.Backend, p.Device));
        Assert.Null(p.Warning);
    }

    [Fact]
    public void Choose_GivenDeviceBeyondTheHost_IsRefused()
    {
        var e = Assert.Throws<ArgumentException>(() => DevicePlacement.Choose("ilgpu-cuda", 0, 1, 2, 2));
        Assert.Equal("device", e.ParamName);
        Assert.Contains("0..1", e.Message);
        Assert.Equal("device", Assert.Throws<ArgumentException>(() => DevicePlacement.Choose("auto", 0, 1, -1, 2)).ParamName);
    }

    [Fact]
    public void Choose_CudaWithoutAGpu_IsRefusedNotFallenBack()
    {
        var e = Assert.Throws<ArgumentException>(() => DevicePlacement.Choose("ilgpu-cuda", 0, 1, null, 0));
        Assert.Equal("backend", e.ParamName);
    }

    [Theory]
    [InlineData("cpu")]
    [InlineData("ilgpu-cpu")]
    [InlineData("ilgpu")]
    public void Choose_NonCudaBackends_PassThroughWithDeviceZero(string backend)
    {
        var p = DevicePlacement.Choose(backend, 3, 4, null, 2);
        Assert.Equal((backend, 0, (string?)null), (p.Backend, p.Device, p.Warning));
    }
}
