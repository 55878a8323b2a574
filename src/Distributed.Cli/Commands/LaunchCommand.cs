using System.CommandLine;
using Distributed.Cluster;

namespace Distributed.Cli.Commands;

/// <summary><c>dsattn launch --hostfile F -n P -- &lt;dsattn args&gt;</c>: runs this dsattn under MPICH's mpiexec.</summary>
internal static class LaunchCommand
{
    public static Command Create()
    {
        var hostfile = new Option<FileInfo?>("--hostfile") { Description = "Hostfile in MPICH (host[:slots]) or Open MPI (host slots=N) form; see hostfile.example. Default: this host only." };
        var ranks = new Option<int>("-n", "--ranks") { Description = "Number of ranks P.", Required = true };
        var timeout = new Option<int>("--timeout") { Description = "Kill the whole job (mpiexec, its proxies and every rank) after this many seconds; exit code 124. 0 = no limit.", DefaultValueFactory = _ => 0 };
        var dryRun = new Option<bool>("--dry-run") { Description = "Print the mpiexec command line without running it." };
        var rest = new Argument<string[]>("dsattn-args") { Description = "Arguments for every rank's dsattn, after --, e.g. -- run --attention lightning --scheme lasp2 --seq 65536.", Arity = ArgumentArity.ZeroOrMore };
        var command = new Command("launch", "Build the mpiexec (MPICH) command line that runs this dsattn on P ranks, print it, then run it and " +
            "return its exit code. Example: dsattn launch --hostfile hostfile.example -n 8 -- run --attention lightning --scheme lasp2")
        {
            hostfile, ranks, timeout, dryRun, rest,
        };
        command.SetAction(parse =>
        {
            int p = parse.GetValue(ranks);
            if (p < 1)
            {
                Console.Error.WriteLine($"dsattn launch: -n must be at least 1 (got {p}).");
                return 2;
            }
            int seconds = parse.GetValue(timeout);
            if (seconds < 0)
            {
                Console.Error.WriteLine($"dsattn launch: --timeout must be 0 (no limit) or a number of seconds (got {seconds}).");
                return 2;
            }
            string? hydraFile = null;
            if (parse.GetValue(hostfile) is { } hf)
            {
                Hostfile parsed;
                try { parsed = Hostfile.Parse(hf.FullName); }
                catch (Exception e) when (e is HostfileFormatException or FileNotFoundException)
                {
                    Console.Error.WriteLine($"dsattn launch: {e.Message}");
                    return 2;
                }
                if (parsed.TotalSlots < p)
                    Console.Error.WriteLine($"dsattn launch: note: the hostfile has {parsed.TotalSlots} slots for {p} ranks; mpiexec will oversubscribe.");
                // hydra reads only its own form, so hand it a rewritten copy.
                hydraFile = Path.Combine(Path.GetTempPath(), $"dsattn-hosts-{Environment.ProcessId}.txt");
                File.WriteAllText(hydraFile, parsed.ToHydraText());
            }
            string? mpiexec = MpiLauncher.FindMpiexec();
            if (mpiexec is null)
            {
                Console.Error.WriteLine("dsattn launch: no MPICH mpiexec found. Install MPICH (apt-get install mpich); Open MPI's mpiexec is not supported (MPI.NET here speaks the MPICH ABI).");
                return 2;
            }
            var (program, prefix) = SelfCommand();
            var args = MpiLauncher.BuildArguments(p, hydraFile, program, [.. prefix, .. parse.GetValue(rest) ?? []]);
            Console.WriteLine(MpiLauncher.Format(mpiexec, args));
            if (parse.GetValue(dryRun)) return 0;
            LaunchResult result;
            try
            {
                result = MpiLauncher.Run(mpiexec, args, seconds > 0 ? TimeSpan.FromSeconds(seconds) : Timeout.InfiniteTimeSpan, Console.WriteLine);
            }
            finally
            {
                // A dry run keeps the rewritten hostfile so the printed line can be run by hand.
                if (hydraFile is not null) File.Delete(hydraFile);
            }
            if (result.TimedOut)
            {
                Console.Error.WriteLine($"dsattn launch: the job did not finish within {seconds} s and was killed.");
                return 124;
            }
            return result.ExitCode;
        });
        return command;
    }

    /// <summary>How to start this same dsattn: the apphost directly, or <c>dotnet dsattn.dll</c>.</summary>
    private static (string Program, string[] Prefix) SelfCommand()
    {
        string? process = Environment.ProcessPath;
        string dll = typeof(LaunchCommand).Assembly.Location;
        if (process is not null && !Path.GetFileNameWithoutExtension(process).Equals("dotnet", StringComparison.OrdinalIgnoreCase))
            return (process, []);
        return (process ?? "dotnet", [dll]);
    }
}
