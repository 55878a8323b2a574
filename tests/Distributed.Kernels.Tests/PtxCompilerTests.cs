using Distributed.Kernels.Ilgpu;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Kernels.Tests;

/// <summary>A fact that is skipped, with the reason shown, when ptxas is not on PATH.</summary>
public sealed class PtxasFactAttribute : FactAttribute
{
    public PtxasFactAttribute()
    {
        if (PtxAssembler.Find() is null) Skip = PtxAssembler.InstallHint;
    }
}

/// <summary>A theory that is skipped, with the reason shown, when ptxas is not on PATH.</summary>
public sealed class PtxasTheoryAttribute : TheoryAttribute
{
    public PtxasTheoryAttribute()
    {
        if (PtxAssembler.Find() is null) Skip = PtxAssembler.InstallHint;
    }
}

/// <summary>Every ILGPU kernel compiles to PTX without a GPU, and assembles without spills.</summary>
public sealed class PtxCompilerTests(ITestOutputHelper output)
{
    private static readonly string[] ExpectedKernels =
    [
        "FlashForward", "FlashBackwardDq", "FlashBackwardDkDv", "SoftmaxRowDot", "MergeSoftmax", "CopySlice",
        "LightningBlockState", "LightningBlockGrad", "LightningScanForward", "LightningScanBackward",
        "LightningForward", "LightningGradQ", "LightningGradKV",
    ];

    [Theory]
    [InlineData("sm_80")]
    [InlineData("sm_90")]
    public void CompileAll_EveryKernel_HasItsEntryPoint(string arch)
    {
        var kernels = PtxCompiler.CompileAll(arch);
        Assert.Equal(ExpectedKernels, kernels.Select(k => k.Name));
        foreach (var k in kernels)
        {
            Assert.Equal(arch, k.Architecture);
            // ILGPU 1.5.3 pairs sm_90 with ISA 8.0; under ISA 7.8 it writes .target sm_80, which ptxas
            // still assembles for sm_90 (see the ptxas test).
            Assert.Contains(".version 7.8", k.Assembly);
            Assert.Contains(".target sm_", k.Assembly);
            Assert.Contains($".entry {k.EntryName}", k.Assembly);
            // ILGPU names the entry after the kernel method; a mix-up of methods would show here.
            Assert.Contains(KernelMethodName(k.Name), k.EntryName);
        }
    }

    [Fact]
    public void CompileAll_UnknownArchitecture_NamesTheParameter()
    {
        var e = Assert.Throws<ArgumentException>(() => PtxCompiler.CompileAll("sm_75"));
        Assert.Equal("architecture", e.ParamName);
    }

    [Fact]
    public void Parse_ReadsEveryField()
    {
        const string report = """
            ptxas info    : 0 bytes gmem
            ptxas info    : Compiling entry function 'Kernel' for 'sm_90'
            ptxas info    : Function properties for Kernel
                48 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
            ptxas info    : Used 72 registers, 35328 bytes smem, 400 bytes cmem[0]
            """;
        Assert.Equal(new PtxUsage("K", 72, 8, 12, 48, 35328), PtxAssembler.Parse("K", report));
    }

    [PtxasTheory]
    [InlineData("sm_80")]
    [InlineData("sm_90")]
    public void Ptxas_EveryKernel_HasNoSpillsAndFitsOnAnSm(string arch)
    {
        var kernels = PtxCompiler.CompileAll(arch);
        var usages = kernels.Select(PtxAssembler.Assemble).ToList();
        foreach (var u in usages) output.WriteLine(u.ToString());
        Assert.Equal(ExpectedKernels.Length, usages.Count);
        Assert.All(usages, u =>
        {
            Assert.True(u.Registers > 0, $"{u.Kernel}: no registers reported");
            Assert.Equal(0, u.SpillStoreBytes);
            Assert.Equal(0, u.SpillLoadBytes);
        });
        // The flash kernels stage tiles in shared memory; zero would mean the tiles were optimized away.
        // Static shared memory is capped at 48 KB per group.
        Assert.All(usages.Where(u => u.Kernel.StartsWith("Flash", StringComparison.Ordinal)), u => Assert.InRange(u.SharedMemoryBytes, 1, 48 * 1024));
        // Their accumulators live in registers: no stack frame (a per-thread array would put one there).
        Assert.All(usages.Where(u => u.Kernel.StartsWith("Flash", StringComparison.Ordinal)), u => Assert.Equal(0, u.StackFrameBytes));
        for (int n = 0; n < kernels.Count; n++)
            Assert.True(PtxOccupancy.GroupsPerSm(arch, usages[n].Registers, usages[n].SharedMemoryBytes, kernels[n].ThreadsPerGroup) >= 1, usages[n].Kernel);
    }

    [Theory]
    // 255 registers x 128 threads: 8,192 registers a warp-group of 4 → 8 warps, 2 groups.
    [InlineData("sm_80", 255, 41216, 128, 2)]
    // 160 registers (5,120 a warp): 12 warps → 3 groups; shared 40 KB + 1 KB reserved fits 4 on sm_80.
    [InlineData("sm_80", 160, 40960, 128, 3)]
    // 64 registers: 32 warps → 8 groups, but 41 KB of shared memory fits only 3 on sm_80 (164 KB) ...
    [InlineData("sm_80", 64, 41 * 1024, 128, 3)]
    // ... and 5 on sm_90 (228 KB).
    [InlineData("sm_90", 64, 41 * 1024, 128, 5)]
    // 32 registers and no shared memory: the 2,048-thread limit, 8 groups of 256.
    [InlineData("sm_90", 32, 0, 256, 8)]
    // 32-thread groups of few registers: the 32-groups-per-SM limit.
    [InlineData("sm_90", 16, 0, 32, 32)]
    // 40 registers (1,280 a warp) allow 51 one-warp groups, but 8,320 B of shared memory + 1 KB reserved allow 17.
    [InlineData("sm_80", 40, 8320, 32, 17)]
    public void GroupsPerSm_FollowsTheOccupancyRules(string arch, int registers, int shared, int threads, int expected)
    {
        Assert.Equal(expected, PtxOccupancy.GroupsPerSm(arch, registers, shared, threads));
    }

    [Fact]
    public void GroupsPerSm_UnknownArchitecture_NamesTheParameter()
    {
        var e = Assert.Throws<ArgumentException>(() => PtxOccupancy.GroupsPerSm("sm_75", 32, 0, 128));
        Assert.Equal("architecture", e.ParamName);
    }

    private static string KernelMethodName(string name) => name switch
    {
        "FlashForward" => "Forward",
        "FlashBackwardDq" => "BackwardDq",
        "FlashBackwardDkDv" => "BackwardDkDv",
        "SoftmaxRowDot" => "RowDot",
        "MergeSoftmax" => "Merge",
        "CopySlice" => "CopySlice",
        "LightningForward" => "Output",
        _ => name["Lightning".Length..],
    };
}
