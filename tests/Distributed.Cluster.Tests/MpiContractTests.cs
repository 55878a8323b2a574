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

    private LaunchResult Launch(int ranks, TimeSpan timeout, params string[] workerArgs) =>
        Report(MpiLauncher.Run(Mpiexec, MpiLauncher.BuildArguments(ranks, null, "dotnet", [Worker, .. workerArgs]), timeout), timeout);

    /// <summary>Runs the worker without mpiexec (an MPICH singleton), with extra environment.</summary>
    private LaunchResult Direct(TimeSpan timeout, Dictionary<string, string?> environment, params string[] workerArgs) =>
        Report(MpiLauncher.Run("dotnet", [Worker, .. workerArgs], timeout, environment: environment), timeout);

    private LaunchResult Report(LaunchResult r, TimeSpan timeout)
    {
        output.WriteLine($"exit {r.ExitCode} after {r.Elapsed.TotalSeconds:F1} s\n{r.Stdout}\n{r.Stderr}");
        Assert.False(r.TimedOut, $"the job was killed after {timeout.TotalSeconds} s");
        return r;
    }

    private static void AssertContractPassed(LaunchResult r, int ranks)
    {
        Assert.Equal(0, r.ExitCode);
        var lines = r.Stdout.Split('\n', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        foreach (string check in CommunicatorContract.Names)
            for (int rank = 0; rank < ranks; rank++)
                Assert.Contains($"CHECK {check} {rank} ok", lines);
        Assert.DoesNotContain(lines, l => l.Contains("FAIL", StringComparison.Ordinal));
        for (int rank = 0; rank < ranks; rank++) Assert.Contains(lines, l => l.StartsWith($"DONE {rank} size={ranks}", StringComparison.Ordinal));
    }

    [Theory]
    [InlineData(2)]
    [InlineData(4)]
    public void Contract_HoldsUnderMpiexec(int ranks)
    {
        var r = Launch(ranks, TimeSpan.FromSeconds(120), "contract");
        AssertContractPassed(r, ranks);
        Assert.Contains("library=libmpich.so.12", r.Stdout, StringComparison.Ordinal);
        AssertCleanFinalize(r);
    }

    /// <summary>A clean run frees what it allocated in MPI before MPI_Finalize: MPICH 4 (yaksa) prints
    /// "[WARNING] yaksa: N leaked handle pool objects" on every rank otherwise (MPI.NET's datatype cache
    /// commits derived datatypes it never frees, so the data must not move through MPI.NET).</summary>
    private static void AssertCleanFinalize(LaunchResult r)
    {
        Assert.DoesNotContain("leaked", r.Stderr, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("WARNING", r.Stderr, StringComparison.Ordinal);
    }

    [Fact]
    public void WaitingRanks_DoNotSpin()
    {
        // Rank 0 computes for 2 s while 3 ranks wait in each collective. MPICH's blocking calls would
        // spin a core each for those 2 s; the polite wait must stay well under a quarter of the wall time.
        var r = Launch(4, TimeSpan.FromSeconds(120), "wait-cpu");
        Assert.Equal(0, r.ExitCode);
        var waits = r.Stdout.Split('\n', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
            .Where(l => l.StartsWith("WAITCPU ", StringComparison.Ordinal)).Select(l => l.Split(' ')).ToList();
        Assert.Equal(9, waits.Count);
        foreach (var w in waits)
        {
            double cpu = double.Parse(w[3], System.Globalization.CultureInfo.InvariantCulture), wall = double.Parse(w[4], System.Globalization.CultureInfo.InvariantCulture);
            Assert.True(wall > 1000, $"{w[1]} on rank {w[2]} waited only {wall} ms");
            Assert.True(cpu < 0.25 * wall, $"{w[1]} on rank {w[2]} used {cpu} ms of CPU in {wall} ms of waiting");
        }
        AssertCleanFinalize(r);
    }

    /// <summary>Runs the progress worker (every rank starts a 2 MiB-per-rank all-gather, then computes for
    /// <paramref name="computeMs"/> without calling MPI) and returns per rank (arrived ms or -1, wait ms).</summary>
    private List<(int Rank, double ArrivedMs, double WaitMs)> Progress(int ranks, string mode, int computeMs)
    {
        var timeout = TimeSpan.FromSeconds(120);
        var r = Report(MpiLauncher.Run(Mpiexec, MpiLauncher.BuildArguments(ranks, null, "dotnet", [Worker, "progress", computeMs.ToString(System.Globalization.CultureInfo.InvariantCulture)]), timeout,
            environment: new Dictionary<string, string?> { ["DSATTN_MPI_PROGRESS"] = mode }), timeout);
        Assert.Equal(0, r.ExitCode);
        var rows = r.Stdout.Split('\n', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
            .Where(l => l.StartsWith("PROGRESS ", StringComparison.Ordinal)).Select(l => l.Split(' '))
            .Select(w => (int.Parse(w[1], System.Globalization.CultureInfo.InvariantCulture), double.Parse(w[2], System.Globalization.CultureInfo.InvariantCulture), double.Parse(w[3], System.Globalization.CultureInfo.InvariantCulture)))
            .ToList();
        Assert.Equal(ranks, rows.Count);
        return rows;
    }

    [Theory]
    [InlineData(2)]
    [InlineData(4)]
    public void StartedAllGather_CompletesWhileTheStarterComputes(int ranks)
    {
        // With the progress thread every rank's receive buffer fills during its compute loop, before it
        // calls Wait (or anything else in MPI).
        foreach (var (rank, arrived, wait) in Progress(ranks, "thread", 3000))
            Assert.True(arrived >= 0, $"rank {rank}: the all-gather had not arrived after 3 s of compute (Wait then took {wait} ms)");
    }

    [Fact]
    public void StartedAllGather_WithoutProgress_WaitsForWait()
    {
        // The contrast that shows the test above can fail: without the progress thread nothing moves the
        // transfer while every rank computes, so the data is not all there before Wait.
        var rows = Progress(2, "off", 500);
        Assert.Contains(rows, row => row.ArrivedMs < 0);
    }

    [Fact]
    public void Contract_HoldsAsSingletonWithoutMpiexec()
    {
        var r = Direct(TimeSpan.FromSeconds(120), [], "contract");
        AssertContractPassed(r, 1);
        AssertCleanFinalize(r);
    }

    [Fact]
    public void LibraryVariable_NamesTheLibraryToLoad()
    {
        // The real file behind the soname, by full path: the worker reports the name it loaded, so seeing
        // this path (not the default soname) shows the variable was honoured.
        string? real = new[] { "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib" }
            .Select(d => new FileInfo(Path.Combine(d, "libmpich.so.12")))
            .Where(f => f.Exists)
            .Select(f => f.ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? f.FullName)
            .FirstOrDefault();
        Assert.True(real is not null, "libmpich.so.12 not found in the usual library folders; install MPICH (apt-get install mpich).");
        var timeout = TimeSpan.FromSeconds(120);
        var r = Report(MpiLauncher.Run(Mpiexec, MpiLauncher.BuildArguments(2, null, "dotnet", [Worker, "contract"]), timeout,
            environment: new Dictionary<string, string?> { [MpichLibrary.LibraryVariable] = real }), timeout);
        AssertContractPassed(r, 2);
        Assert.Contains($"library={real}", r.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public void LibraryVariable_Unloadable_FailsSayingWhatToDo()
    {
        var r = Direct(TimeSpan.FromSeconds(60), new() { [MpichLibrary.LibraryVariable] = "/nonexistent/libmpich.so.12" }, "contract");
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("rank 0 failed: DSATTN_MPI_LIBRARY=/nonexistent/libmpich.so.12 could not be loaded", r.Stderr, StringComparison.Ordinal);
        Assert.Contains("MPICH-ABI", r.Stderr, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("DSATTN_MPI_PROGRESS", "spin", "DSATTN_MPI_PROGRESS=spin is not a progress mode: use 'thread'")]
    [InlineData("DSATTN_MPI_PROGRESS_NAP_US", "0", "DSATTN_MPI_PROGRESS_NAP_US=0 is not a nap: give microseconds between 1 and 1000000")]
    public void ProgressSettings_Bad_RefusedWithTheFix(string variable, string value, string message)
    {
        var r = Direct(TimeSpan.FromSeconds(60), new() { [variable] = value }, "contract");
        Assert.Equal(1, r.ExitCode);
        Assert.Contains($"rank 0 failed: {message}", r.Stderr, StringComparison.Ordinal);
    }

    [Fact]
    public void OpenMpiLaunch_RefusedWithTheFix()
    {
        var r = Direct(TimeSpan.FromSeconds(60), new() { ["OMPI_COMM_WORLD_SIZE"] = "2", ["OMPI_COMM_WORLD_RANK"] = "1" }, "contract");
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("rank 1 failed: Open MPI's mpiexec started this process", r.Stderr, StringComparison.Ordinal);
        Assert.Contains("apt-get install mpich", r.Stderr, StringComparison.Ordinal);
    }

    [Fact]
    public void RankRunner_UnderMpiexec_RankThrows_JobAbortsNamingTheRank()
    {
        var r = Launch(2, TimeSpan.FromSeconds(60), "runner-fail", "1");
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("rank 1 failed: InvalidOperationException: deliberate failure on rank 1", r.Stderr, StringComparison.Ordinal);
        Assert.True(r.Elapsed < TimeSpan.FromSeconds(30), $"took {r.Elapsed}");
    }

    [Fact]
    public void RankRunner_WithoutMpiexec_RunsInProcessRanks()
    {
        // Rank 5 does not exist among the 3 in-process ranks, so nobody fails.
        var r = Direct(TimeSpan.FromSeconds(60), [], "runner-fail", "5");
        Assert.Equal(0, r.ExitCode);
        for (int rank = 0; rank < 3; rank++) Assert.Contains($"rank {rank} of 3 finished", r.Stdout, StringComparison.Ordinal);
        var f = Direct(TimeSpan.FromSeconds(60), [], "runner-fail", "2");
        Assert.Equal(1, f.ExitCode);
        Assert.Contains("rank 2 failed: InvalidOperationException: deliberate failure on rank 2", f.Stderr, StringComparison.Ordinal);
        Assert.True(f.Elapsed < TimeSpan.FromSeconds(30), $"took {f.Elapsed}");
    }

    [Fact]
    public void Hang_TimeoutKillsTheWholeJob()
    {
        string tag = $"hangtag{Guid.NewGuid():N}";
        var timeout = TimeSpan.FromSeconds(8);
        var r = MpiLauncher.Run(Mpiexec, MpiLauncher.BuildArguments(2, null, "dotnet", [Worker, "hang", tag]), timeout);
        output.WriteLine($"exit {r.ExitCode} after {r.Elapsed.TotalSeconds:F1} s\n{r.Stdout}\n{r.Stderr}");
        Assert.True(r.TimedOut);
        Assert.True(r.Elapsed < timeout + TimeSpan.FromSeconds(15), $"took {r.Elapsed}");
        // Every rank and proxy of the job must be gone, not left spinning in the barrier.
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        List<int> survivors;
        while ((survivors = ProcessesWithArgument(tag)).Count > 0 && DateTime.UtcNow < deadline) Thread.Sleep(200);
        Assert.Empty(survivors);
    }

    private static List<int> ProcessesWithArgument(string tag)
    {
        var found = new List<int>();
        foreach (string dir in Directory.EnumerateDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out int pid)) continue;
            try
            {
                if (File.ReadAllText(Path.Combine(dir, "cmdline")).Contains(tag, StringComparison.Ordinal)) found.Add(pid);
            }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }
        return found;
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
