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

/// <summary>Every ILGPU kernel compiles to PTX without a GPU, and assembles without spills.</summary>
public sealed class PtxCompilerTests(ITestOutputHelper output)
{
    private static readonly string[] ExpectedKernels =
    [
        "FlashForward", "FlashBackwardDq", "FlashBackwardDkDv", "SoftmaxRowDot", "MergeSoftmax", "CopySlice",
        "LightningBlockState", "LightningBlockGrad", "LightningScanForward", "LightningScanBackward",
        "LightningForward", "LightningGradQ", "LightningGradK", "LightningGradV",
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

    [PtxasFact]
    public void Ptxas_EveryKernelForSm90_HasNoSpills()
    {
        var usages = PtxCompiler.CompileAll("sm_90").Select(PtxAssembler.Assemble).ToList();
        foreach (var u in usages) output.WriteLine(u.ToString());
        Assert.Equal(ExpectedKernels.Length, usages.Count);
        Assert.All(usages, u =>
        {
            Assert.True(u.Registers > 0, $"{u.Kernel}: no registers reported");
            Assert.Equal(0, u.SpillStoreBytes);
            Assert.Equal(0, u.SpillLoadBytes);
        });
        // The flash kernels stage tiles in shared memory; zero would mean the tiles were optimized away.
        Assert.All(usages.Where(u => u.Kernel.StartsWith("Flash", StringComparison.Ordinal)), u => Assert.True(u.SharedMemoryBytes > 0, u.Kernel));
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
