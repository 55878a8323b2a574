using Distributed.Cluster;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>Starts the built <c>dsattn</c> (copied beside the tests), directly or under MPICH's <c>mpiexec</c>.</summary>
internal static class Dsattn
{
    private static string DllPath => Path.Combine(AppContext.BaseDirectory, "dsattn.dll");

    private static readonly Dictionary<string, string?> Environment = new() { ["NO_COLOR"] = "1", ["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1" };

    /// <summary>Runs <c>dotnet dsattn.dll args</c>; fails the test if it outlives <paramref name="timeout"/> (its tree is killed).</summary>
    public static LaunchResult Run(string args, TimeSpan timeout, ITestOutputHelper? log = null,
        IReadOnlyDictionary<string, string?>? environment = null) =>
        Exec("dotnet", [DllPath, .. Split(args)], timeout, log, environment);

    /// <summary>Runs <c>mpiexec -n P dotnet dsattn.dll args</c> with the same timeout rule.</summary>
    public static LaunchResult RunMpi(int ranks, string args, TimeSpan timeout, ITestOutputHelper? log = null,
        IReadOnlyDictionary<string, string?>? environment = null, Action<string>? echo = null)
    {
        string mpiexec = MpiLauncher.FindMpiexec()
            ?? throw new InvalidOperationException("No MPICH mpiexec on PATH: run ./test.sh, which installs MPICH (apt-get install mpich).");
        return Exec(mpiexec, MpiLauncher.BuildArguments(ranks, null, "dotnet", [DllPath, .. Split(args)]), timeout, log, environment, echo);
    }

    private static string[] Split(string args) => args.Split(' ', StringSplitOptions.RemoveEmptyEntries);

    private static LaunchResult Exec(string file, IEnumerable<string> args, TimeSpan timeout, ITestOutputHelper? log,
        IReadOnlyDictionary<string, string?>? environment = null, Action<string>? echo = null)
    {
        var list = args.ToList();
        var env = new Dictionary<string, string?>(Environment);
        foreach (var (k, v) in environment ?? new Dictionary<string, string?>()) env[k] = v;
        var r = MpiLauncher.Run(file, list, timeout, echo, env);
        log?.WriteLine($"{MpiLauncher.Format(file, list)}\nexit {r.ExitCode} after {r.Elapsed.TotalSeconds:F1} s\n--- stdout ---\n{r.Stdout}\n--- stderr ---\n{r.Stderr}");
        Assert.False(r.TimedOut, $"killed after {timeout.TotalSeconds:F0} s: {MpiLauncher.Format(file, list)}\n{r.Stdout}\n{r.Stderr}");
        return r;
    }
}
