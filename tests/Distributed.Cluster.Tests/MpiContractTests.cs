using Distributed.Cluster.TestWorker;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Cluster.Tests;

/// <summary>
/// The same contract under a real <c>mpiexec -n P</c> of the test worker (MPI.NET over MPICH). These
/// tests fail, not skip, when MPICH is missing: ./test.sh installs it.
/// </summary>
public sealed class MpiContractTests(ITestOutputHelper output)
{
    private static readonly string Worker = Path.Combine(AppContext.BaseDirectory, "Distributed.Cluster.TestWorker.dll");

    internal static string Mpiexec => MpiLauncher.FindMpiexec()
        ?? throw new InvalidOperationException("No MPICH mpiexec on PATH. Install MPICH (apt-get install mpich), or run ./test.sh, which does.");

    private LaunchResult Launch(int ranks, TimeSpan timeout, params string[] workerArgs)
    {
        var r = MpiLauncher.Run(Mpiexec, MpiLauncher.BuildArguments(ranks, null, "dotnet", [Worker, .. workerArgs]), timeout);
        output.WriteLine($"exit {r.ExitCode} after {r.Elapsed.TotalSeconds:F1} s\n{r.Stdout}\n{r.Stderr}");
        Assert.False(r.TimedOut, $"mpiexec was killed after {timeout.TotalSeconds} s");
        return r;
    }

    [Theory]
    [InlineData(2)]
    [InlineData(4)]
    public void Contract_HoldsUnderMpiexec(int ranks)
    {
        var r = Launch(ranks, TimeSpan.FromSeconds(120), "contract");
        Assert.Equal(0, r.ExitCode);
        var lines = r.Stdout.Split('\n', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        foreach (string check in CommunicatorContract.Names)
            for (int rank = 0; rank < ranks; rank++)
                Assert.Contains($"CHECK {check} {rank} ok", lines);
        Assert.DoesNotContain(lines, l => l.Contains("FAIL", StringComparison.Ordinal));
        for (int rank = 0; rank < ranks; rank++) Assert.Contains(lines, l => l.StartsWith($"DONE {rank} size={ranks}", StringComparison.Ordinal));
    }

    [Fact]
    public void RankThrows_JobAbortsFastNamingTheRank()
    {
        var r = Launch(4, TimeSpan.FromSeconds(60), "fail", "1");
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("rank 1 failed: InvalidOperationException: deliberate failure on rank 1", r.Stderr, StringComparison.Ordinal);
        Assert.True(r.Elapsed < TimeSpan.FromSeconds(30), $"took {r.Elapsed}");
    }
}
