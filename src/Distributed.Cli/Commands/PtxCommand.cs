using System.CommandLine;
using System.Globalization;
using Distributed.Kernels.Ilgpu;

namespace Distributed.Cli.Commands;

/// <summary>
/// <c>dsattn ptx [--arch sm_80|sm_90] [--out DIR]</c>: compiles every ILGPU kernel to PTX (no GPU needed),
/// writes one .ptx per kernel, and with ptxas on PATH prints registers, spills, stack frame, shared memory and the estimated occupancy.
/// </summary>
internal static class PtxCommand
{
    public static Command Create()
    {
        var arch = new Option<string>("--arch") { Description = "Target architecture: sm_80 (A100) or sm_90 (H100).", DefaultValueFactory = _ => "sm_90" };
        arch.AcceptOnlyFromAmong([.. PtxCompiler.Architectures]);
        var outDir = new Option<DirectoryInfo>("--out") { Description = "Directory for the .ptx files.", DefaultValueFactory = _ => new DirectoryInfo("ptx") };
        var command = new Command("ptx", "Compile every ILGPU kernel to PTX with ILGPU's PTX backend (no GPU or driver needed); with ptxas on PATH, assemble each and print its resource use.")
        {
            arch, outDir,
        };
        command.SetAction(parse => Run(parse.GetValue(arch)!, parse.GetValue(outDir)!));
        return command;
    }

    private static int Run(string arch, DirectoryInfo outDir)
    {
        var kernels = PtxCompiler.CompileAll(arch);
        Directory.CreateDirectory(outDir.FullName);
        foreach (var k in kernels)
        {
            string path = Path.Combine(outDir.FullName, $"{k.Name}.{arch}.ptx");
            // Temp file then rename, so a reader never sees half a file.
            string temp = path + $".{Environment.ProcessId}.tmp";
            File.WriteAllText(temp, k.Assembly);
            File.Move(temp, path, overwrite: true);
        }
        Console.WriteLine($"Wrote {kernels.Count} PTX files for {arch} (PTX ISA 7.8) to {outDir.FullName}");

        if (PtxAssembler.Find() is null)
        {
            Console.WriteLine(PtxAssembler.InstallHint);
            return 0;
        }
        var rows = kernels.Select(PtxAssembler.Assemble).ToList();
        string[] header = ["kernel", "threads", "registers", "spill st/ld B", "stack B", "shared B", "occupancy"];
        var cells = rows.Select((u, n) => new[]
        {
            u.Kernel,
            kernels[n].ThreadsPerGroup.ToString(CultureInfo.InvariantCulture),
            u.Registers.ToString(CultureInfo.InvariantCulture),
            $"{u.SpillStoreBytes}/{u.SpillLoadBytes}",
            u.StackFrameBytes.ToString(CultureInfo.InvariantCulture),
            u.SharedMemoryBytes.ToString(CultureInfo.InvariantCulture),
            Occupancy(arch, u, kernels[n].ThreadsPerGroup),
        }).ToList();
        int[] width = [.. Enumerable.Range(0, header.Length).Select(c => Math.Max(header[c].Length, cells.Max(r => r[c].Length)))];
        string Line(string[] r) => string.Join("  ", r.Select((s, c) => c == 0 ? s.PadRight(width[c]) : s.PadLeft(width[c])));
        Console.WriteLine($"ptxas -arch={arch} -v:");
        Console.WriteLine(Line(header));
        foreach (var r in cells) Console.WriteLine(Line(r));
        Console.WriteLine("occupancy: groups per SM from registers, shared memory and threads (warps resident of 64).");
        int spilling = rows.Count(u => u.SpillStoreBytes + u.SpillLoadBytes > 0);
        if (spilling > 0) Console.WriteLine($"{spilling} kernel(s) spill registers to local memory.");
        return 0;
    }

    private static string Occupancy(string arch, PtxUsage u, int threads)
    {
        int groups = PtxOccupancy.GroupsPerSm(arch, u.Registers, u.SharedMemoryBytes, threads);
        string warps = PtxOccupancy.WarpOccupancy(groups, threads).ToString("P0", CultureInfo.InvariantCulture).Replace(" %", "%", StringComparison.Ordinal);
        return $"{groups} ({warps})";
    }
}
