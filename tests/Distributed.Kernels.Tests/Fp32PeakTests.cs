using Distributed.Kernels.Ilgpu;
using Xunit;

namespace Distributed.Kernels.Tests;

/// <summary>The fp32 peak behind the benchmark's "of peak" column, against the vendors' published figures.</summary>
public sealed class Fp32PeakTests
{
    [Theory]
    // A100 SXM: 108 SMs at 1,410 MHz, 64 fp32 lanes per SM: 19.5 TFLOP/s in NVIDIA's A100 datasheet.
    [InlineData(8, 0, 108, 1_410_000, 19.5)]
    // H100 SXM: 132 SMs at 1,980 MHz, 128 lanes: 67 TFLOP/s in NVIDIA's H100 datasheet.
    [InlineData(9, 0, 132, 1_980_000, 67)]
    public void Tflops_MatchesTheDatasheet(int major, int minor, int sms, int clockKHz, double datasheet)
    {
        double? peak = Fp32Peak.Tflops(major, minor, sms, clockKHz);
        Assert.NotNull(peak);
        Assert.InRange(peak.Value, datasheet * 0.99, datasheet * 1.01);
    }

    [Fact]
    public void Tflops_UnknownCapability_IsNull() => Assert.Null(Fp32Peak.Tflops(5, 0, 10, 1_000_000));

    [Fact]
    public void Of_ACpuBackend_IsNull()
    {
        using var cpu = new Cpu.CpuBackend(1);
        Assert.Null(Fp32Peak.Of(cpu));
    }
}
