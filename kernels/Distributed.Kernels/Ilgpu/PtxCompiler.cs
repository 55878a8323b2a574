using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using System.Text.RegularExpressions;
using ILGPU;
using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

namespace Distributed.Kernels.Ilgpu;

/// <summary>One kernel compiled to PTX.</summary>
/// <param name="Name">The kernel's short name, e.g. <c>FlashForward</c>; also the file name stem.</param>
/// <param name="Architecture">The target, e.g. <c>sm_90</c>.</param>
/// <param name="EntryName">The <c>.entry</c> name inside <paramref name="Assembly"/>.</param>
/// <param name="Assembly">The PTX text.</param>
/// <param name="ThreadsPerGroup">Threads per group the backend launches it with (for the occupancy estimate).</param>
public sealed record PtxKernel(string Name, string Architecture, string EntryName, string Assembly, int ThreadsPerGroup);

/// <summary>
/// Compiles every ILGPU kernel of <see cref="IlgpuBackend"/> to PTX with ILGPU's PTX backend. No GPU or
/// driver is needed. The instruction set is PTX ISA 7.8, the newest that Debian's CUDA 11.8
/// <c>ptxas</c> accepts, so the output can be assembled and inspected with <see cref="PtxAssembler"/>.
/// </summary>
public static class PtxCompiler
{
    /// <summary>The architectures accepted by <see cref="CompileAll"/>.</summary>
    public static IReadOnlyList<string> Architectures { get; } = ["sm_80", "sm_90"];

    /// <summary>Every kernel the backend launches, by short name.</summary>
    internal static IReadOnlyList<(string Name, MethodInfo Method, int Threads)> Kernels { get; } =
    [
        ("FlashForward", Method(typeof(FlashKernels), nameof(FlashKernels.Forward)), FlashKernels.GroupSize),
        ("FlashBackwardDq", Method(typeof(FlashKernels), nameof(FlashKernels.BackwardDq)), FlashKernels.GroupSize),
        ("FlashBackwardDkDv", Method(typeof(FlashKernels), nameof(FlashKernels.BackwardDkDv)), FlashKernels.GroupSize),
        ("SoftmaxRowDot", Method(typeof(ElementwiseKernels), nameof(ElementwiseKernels.RowDot)), ElementwiseKernels.GroupSize),
        ("MergeSoftmax", Method(typeof(ElementwiseKernels), nameof(ElementwiseKernels.Merge)), ElementwiseKernels.GroupSize),
        ("CopySlice", Method(typeof(ElementwiseKernels), nameof(ElementwiseKernels.CopySlice)), ElementwiseKernels.GroupSize),
        ("LightningBlockState", Method(typeof(LightningKernels), nameof(LightningKernels.BlockState)), LightningKernels.GroupSize),
        ("LightningBlockGrad", Method(typeof(LightningKernels), nameof(LightningKernels.BlockGrad)), LightningKernels.GroupSize),
        ("LightningScanForward", Method(typeof(LightningKernels), nameof(LightningKernels.ScanForward)), ElementwiseKernels.GroupSize),
        ("LightningScanBackward", Method(typeof(LightningKernels), nameof(LightningKernels.ScanBackward)), ElementwiseKernels.GroupSize),
        ("LightningForward", Method(typeof(LightningKernels), nameof(LightningKernels.Output)), LightningKernels.GroupSize),
        ("LightningGradQ", Method(typeof(LightningKernels), nameof(LightningKernels.GradQ)), LightningKernels.GroupSize),
        ("LightningGradKV", Method(typeof(LightningKernels), nameof(LightningKernels.GradKV)), LightningKernels.GroupSize),
    ];

    /// <summary>Compiles every kernel for <paramref name="architecture"/> ("sm_80" or "sm_90").</summary>
    /// <exception cref="ArgumentException">An architecture other than sm_80 or sm_90.</exception>
    public static IReadOnlyList<PtxKernel> CompileAll(string architecture)
    {
        var arch = ParseArchitecture(architecture);
        using var context = Context.Create(b => b.EnableAlgorithms());
        using var backend = new PTXBackend(context, new CudaCapabilityContext(arch), arch, CudaInstructionSet.ISA_78, null);
        var result = new List<PtxKernel>(Kernels.Count);
        foreach (var (name, method, threads) in Kernels)
        {
            var entry = EntryPointDescription.FromExplicitlyGroupedKernel(method);
            var compiled = (PTXCompiledKernel)backend.Compile(entry, new KernelSpecialization());
            string text = compiled.PTXAssembly;
            var match = Regex.Match(text, @"\.entry\s+([A-Za-z_$][\w$]*)");
            if (!match.Success)
                throw new InvalidOperationException($"The PTX of {name} has no .entry directive.");
            result.Add(new PtxKernel(name, architecture, match.Groups[1].Value, text, threads));
        }
        return result;
    }

    private static CudaArchitecture ParseArchitecture(string architecture) => architecture switch
    {
        "sm_80" => CudaArchitecture.SM_80,
        "sm_90" => CudaArchitecture.SM_90,
        _ => throw new ArgumentException($"Unknown architecture '{architecture}'; use sm_80 (A100) or sm_90 (H100).", nameof(architecture)),
    };

    private static MethodInfo Method(Type type, string name) =>
        type.GetMethod(name, BindingFlags.Public | BindingFlags.Static)
        ?? throw new InvalidOperationException($"Kernel {type.Name}.{name} not found.");
}

/// <summary>What <c>ptxas -v</c> reports for one kernel.</summary>
/// <param name="Kernel">The kernel's short name.</param>
/// <param name="Registers">Registers per thread.</param>
/// <param name="SpillStoreBytes">Bytes spilled to local memory (stores).</param>
/// <param name="SpillLoadBytes">Bytes reloaded from spills.</param>
/// <param name="StackFrameBytes">Per-thread stack frame (local memory) in bytes.</param>
/// <param name="SharedMemoryBytes">Static shared memory per group in bytes.</param>
public sealed record PtxUsage(string Kernel, int Registers, int SpillStoreBytes, int SpillLoadBytes, int StackFrameBytes, int SharedMemoryBytes);

/// <summary>
/// Runs <c>ptxas</c> (from the CUDA toolkit; on Debian the <c>nvidia-cuda-toolkit</c> package of the
/// non-free component) over compiled PTX and reads its resource report.
/// </summary>
public static class PtxAssembler
{
    /// <summary>How to get ptxas, for messages.</summary>
    public const string InstallHint =
        "ptxas is not on PATH. On Debian enable the non-free component and run `apt-get install nvidia-cuda-toolkit`, " +
        "or put the CUDA toolkit's bin directory on PATH.";

    /// <summary>The full path of ptxas on PATH, or null.</summary>
    public static string? Find()
    {
        string? path = Environment.GetEnvironmentVariable("PATH");
        if (string.IsNullOrEmpty(path)) return null;
        foreach (string dir in path.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            string candidate = Path.Combine(dir, OperatingSystem.IsWindows() ? "ptxas.exe" : "ptxas");
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }

    /// <summary>Assembles <paramref name="kernel"/> with <c>ptxas -arch=ARCH -v</c> and parses the report.</summary>
    /// <exception cref="InvalidOperationException">ptxas is missing, fails, or prints no report.</exception>
    public static PtxUsage Assemble(PtxKernel kernel)
    {
        ArgumentNullException.ThrowIfNull(kernel);
        string ptxas = Find() ?? throw new InvalidOperationException(InstallHint);
        string dir = Path.Combine(Path.GetTempPath(), "dsattn-ptxas-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            string input = Path.Combine(dir, kernel.Name + ".ptx");
            File.WriteAllText(input, kernel.Assembly);
            var start = new ProcessStartInfo(ptxas)
            {
                RedirectStandardError = true,
                RedirectStandardOutput = true,
                UseShellExecute = false,
            };
            foreach (string a in new[] { $"-arch={kernel.Architecture}", "-v", "-o", Path.Combine(dir, kernel.Name + ".cubin"), input })
                start.ArgumentList.Add(a);
            using var process = Process.Start(start) ?? throw new InvalidOperationException($"Could not start {ptxas}.");
            var stdout = process.StandardOutput.ReadToEndAsync();
            string report = process.StandardError.ReadToEnd();
            process.WaitForExit();
            report += stdout.Result;
            if (process.ExitCode != 0)
                throw new InvalidOperationException($"ptxas failed on {kernel.Name} ({kernel.Architecture}) with exit code {process.ExitCode}:\n{report}");
            return Parse(kernel.Name, report);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>Parses the <c>ptxas -v</c> report of a single-kernel module.</summary>
    /// <exception cref="InvalidOperationException">The report lacks the register line.</exception>
    public static PtxUsage Parse(string kernel, string report)
    {
        ArgumentNullException.ThrowIfNull(report);
        int Read(string pattern)
        {
            var m = Regex.Match(report, pattern);
            return m.Success ? int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture) : 0;
        }
        if (!Regex.IsMatch(report, @"Used \d+ registers"))
            throw new InvalidOperationException($"ptxas printed no resource report for {kernel}:\n{report}");
        return new PtxUsage(kernel,
            Read(@"Used (\d+) registers"),
            Read(@"(\d+) bytes spill stores"),
            Read(@"(\d+) bytes spill loads"),
            Read(@"(\d+) bytes stack frame"),
            Read(@"(\d+) bytes smem"));
    }
}

/// <summary>
/// Groups per SM that fit at once, from a kernel's registers, static shared memory and threads per group,
/// by the rules of NVIDIA's occupancy calculator (CUDA C Programming Guide, "Compute Capabilities").
/// </summary>
public static class PtxOccupancy
{
    /// <summary>Per-SM limits of one architecture.</summary>
    private sealed record Limits(int Registers, int Threads, int Groups, int SharedBytes, int ReservedSharedPerGroup);

    // sm_80 (A100): 64K registers, 2,048 threads, 32 groups, 164 KB of shared memory per SM;
    // sm_90 (H100): the same but 228 KB. Both reserve 1 KB of shared memory per group.
    private static Limits For(string architecture) => architecture switch
    {
        "sm_80" => new Limits(65_536, 2_048, 32, 164 * 1024, 1024),
        "sm_90" => new Limits(65_536, 2_048, 32, 228 * 1024, 1024),
        _ => throw new ArgumentException($"Unknown architecture '{architecture}'; use sm_80 or sm_90.", nameof(architecture)),
    };

    /// <summary>Groups of <paramref name="threadsPerGroup"/> threads that fit on one SM of <paramref name="architecture"/>.</summary>
    /// <param name="architecture">sm_80 or sm_90.</param>
    /// <param name="registers">Registers per thread (ptxas).</param>
    /// <param name="sharedBytes">Static shared memory per group in bytes (ptxas).</param>
    /// <param name="threadsPerGroup">Threads per group at launch.</param>
    /// <exception cref="ArgumentException">An unknown architecture, or a count out of range.</exception>
    public static int GroupsPerSm(string architecture, int registers, int sharedBytes, int threadsPerGroup)
    {
        var l = For(architecture);
        ArgumentOutOfRangeException.ThrowIfLessThan(registers, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(sharedBytes);
        ArgumentOutOfRangeException.ThrowIfLessThan(threadsPerGroup, 1);
        int warps = (threadsPerGroup + 31) / 32;
        // Registers are given out per warp in units of 256.
        int registersPerWarp = (registers * 32 + 255) / 256 * 256;
        int byRegisters = l.Registers / registersPerWarp / warps;
        int byThreads = l.Threads / (warps * 32);
        // Shared memory is given out in units of 128 bytes.
        int sharedPerGroup = (sharedBytes + 127) / 128 * 128 + l.ReservedSharedPerGroup;
        int byShared = l.SharedBytes / sharedPerGroup;
        return Math.Min(Math.Min(byRegisters, byThreads), Math.Min(byShared, l.Groups));
    }

    /// <summary>Resident warps as a fraction of the SM's 64.</summary>
    public static double WarpOccupancy(int groupsPerSm, int threadsPerGroup) =>
        Math.Min(1.0, groupsPerSm * ((threadsPerGroup + 31) / 32) / 64.0);
}
