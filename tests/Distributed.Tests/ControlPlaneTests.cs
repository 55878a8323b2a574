using System.Text.RegularExpressions;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// The control plane in real <c>mpiexec -n 4</c> jobs with real gRPC on loopback: the watchdog ends a hung
/// job naming the culprit, an exiting rank ends the job, <c>dsattn status</c> lists every rank, and a job
/// whose coordinator is unreachable or cannot start completes with one warning. Every run has a timeout
/// that kills its process tree.
/// </summary>
public sealed partial class ControlPlaneTests(ITestOutputHelper output)
{
    private const string Job = "run --attention lightning --scheme lasp2 --seq 256 --heads 2 --head-dim 16 --backend cpu";

    [Fact]
    public void Hang_IsEndedAfterTheTimeout_NamingTheCulpritAndItsOperation()
    {
        var r = Dsattn.RunMpi(4, $"{Job} --hang-timeout 10", TimeSpan.FromSeconds(90), output,
            new Dictionary<string, string?> { ["DSATTN_FAULT"] = "hang:2:3" });
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("dsattn watchdog: rank 2 never entered collective Barrier #3", r.Stderr, StringComparison.Ordinal);
        Assert.Contains("rank 2: Barrier #2", r.Stderr, StringComparison.Ordinal);
        Assert.Contains("<- culprit", r.Stderr, StringComparison.Ordinal);
        Assert.Single(WatchdogLine().Matches(r.Stderr));
        // Start-up (4 .NET processes on a shared machine) plus the 10 s timeout plus the abort.
        Assert.True(r.Elapsed < TimeSpan.FromSeconds(40), $"took {r.Elapsed.TotalSeconds:F1} s");
    }

    [Fact]
    public void Launch_HostsTheCoordinator_AndKillsAHungJob()
    {
        var r = Dsattn.Run($"launch -n 4 --hang-timeout 10 -- {Job}", TimeSpan.FromSeconds(90), output,
            new Dictionary<string, string?> { ["DSATTN_FAULT"] = "hang:2:3" });
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("control plane: coordinator at 127.0.0.1:", r.Stdout, StringComparison.Ordinal);
        Assert.Contains("dsattn watchdog: rank 2 never entered collective Barrier #3", r.Stdout + r.Stderr, StringComparison.Ordinal);
        Assert.Contains("the watchdog ended the job", r.Stderr, StringComparison.Ordinal);
        Assert.True(r.Elapsed < TimeSpan.FromSeconds(40), $"took {r.Elapsed.TotalSeconds:F1} s");
    }

    [Fact]
    public void RankExitingMidRun_EndsTheJobPromptly_NonZero_AndLeavesNoOutput()
    {
        string dir = Directory.CreateTempSubdirectory("dsattn-exit-").FullName;
        try
        {
            string target = Path.Combine(dir, "o.npy");
            var r = Dsattn.RunMpi(4, $"{Job} --backward --out {target}", TimeSpan.FromSeconds(90), output,
                new Dictionary<string, string?> { ["DSATTN_FAULT"] = "exit:1:8" });
            Assert.NotEqual(0, r.ExitCode);
            Assert.Contains("rank 1: DSATTN_FAULT exit at collective #8", r.Stderr, StringComparison.Ordinal);
            Assert.True(r.Elapsed < TimeSpan.FromSeconds(40), $"took {r.Elapsed.TotalSeconds:F1} s");
            Assert.False(File.Exists(target), "a killed job must not leave its output");
            // A rank killed outright cannot delete the job's temporary; the next run to the same target does.
            var again = Dsattn.RunMpi(4, $"{Job} --backward --out {target}", TimeSpan.FromSeconds(90), output);
            Assert.Equal(0, again.ExitCode);
            Assert.True(File.Exists(target));
            Assert.Empty(Directory.GetFiles(dir, ".*.tmp"));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public async Task Status_AgainstALiveJob_ListsEveryRank()
    {
        string? address = null;
        var seen = new ManualResetEventSlim();
        var job = Task.Run(() => Dsattn.RunMpi(4, $"{Job} --hang-timeout 25", TimeSpan.FromSeconds(120), output,
            new Dictionary<string, string?> { ["DSATTN_FAULT"] = "hang:1:4" },
            line =>
            {
                var m = CoordinatorLine().Match(line);
                if (m.Success) { address = m.Groups[1].Value; seen.Set(); }
            }));
        Assert.True(seen.Wait(TimeSpan.FromSeconds(60)), "rank 0 never printed the coordinator's address");
        // Let every rank register and reach the hang.
        Thread.Sleep(5000);
        var st = Dsattn.Run($"status --coordinator {address}", TimeSpan.FromSeconds(30), output);
        Assert.Equal(0, st.ExitCode);
        var lines = st.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.All(lines, l => Assert.True(l.TrimEnd('\r').Length <= 80, $"wider than 80 columns: {l}"));
        for (int rank = 0; rank < 4; rank++)
            Assert.Contains(lines, l => l.StartsWith($"{rank,4}  ", StringComparison.Ordinal));
        Assert.Contains(lines, l => l.StartsWith("   1  ", StringComparison.Ordinal) && l.Contains("Barrier #3", StringComparison.Ordinal));
        // Without the token file's token: refused.
        string wrong = Path.GetTempFileName();
        try
        {
            File.WriteAllText(wrong, "not-the-token");
            var denied = Dsattn.Run($"status --coordinator {address} --token-file {wrong}", TimeSpan.FromSeconds(30), output);
            Assert.Equal(1, denied.ExitCode);
            Assert.Contains("PermissionDenied", denied.Stderr, StringComparison.Ordinal);
        }
        finally { File.Delete(wrong); }
        var r = await job;
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("rank 1 never entered collective Barrier #4", r.Stderr, StringComparison.Ordinal);
    }

    [Fact]
    public async Task SilentRank_IsNamed_AndTheJobEnded()
    {
        string? address = null;
        var seen = new ManualResetEventSlim();
        var job = Task.Run(() => Dsattn.RunMpi(4, "run --attention lightning --scheme lasp2 --seq 8192 --heads 2 --backend cpu --iterations 100000 --hang-timeout 8",
            TimeSpan.FromSeconds(120), output, null,
            line =>
            {
                var m = CoordinatorLine().Match(line);
                if (m.Success) { address = m.Groups[1].Value; seen.Set(); }
            }));
        Assert.True(seen.Wait(TimeSpan.FromSeconds(60)), "rank 0 never printed the coordinator's address");
        string at = address!;
        int port = int.Parse(at[(at.LastIndexOf(':') + 1)..], System.Globalization.CultureInfo.InvariantCulture);
        string token = File.ReadAllText(Distributed.Cluster.ControlPlane.JobControlPlane.TokenFilePath(port));
        using var client = new Distributed.Cluster.ControlPlane.CoordinatorClient(at, token);
        int pid = 0;
        for (int i = 0; i < 100 && pid == 0; i++)
        {
            pid = client.GetStatus(TimeSpan.FromSeconds(5)).Ranks[3].Pid;
            if (pid == 0) Thread.Sleep(200);
        }
        Assert.NotEqual(0, pid);
        // Stop rank 3 (SIGSTOP): its heartbeats stop; SIGKILL from mpiexec still ends it.
        using (var stop = System.Diagnostics.Process.Start("kill", ["-STOP", pid.ToString(System.Globalization.CultureInfo.InvariantCulture)])!)
            stop.WaitForExit();
        var stopped = DateTime.UtcNow;
        var r = await job;
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("dsattn watchdog: rank 3 sent no heartbeat", r.Stderr, StringComparison.Ordinal);
        Assert.True(DateTime.UtcNow - stopped < TimeSpan.FromSeconds(25), $"ended {(DateTime.UtcNow - stopped).TotalSeconds:F1} s after the stop");
    }

    [Fact]
    public void CoordinatorUnreachable_JobCompletes_AndWarnsThatHangDetectionIsOff()
    {
        var r = Dsattn.RunMpi(4, $"{Job} --check", TimeSpan.FromSeconds(120), output,
            new Dictionary<string, string?> { ["DSATTN_COORDINATOR"] = "127.0.0.1:1", ["DSATTN_TOKEN"] = "x" });
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("hang detection is off", r.Stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("FAILED", r.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public void CoordinatorCannotStart_JobCompletes_AndWarnsOnce()
    {
        // A documentation address (TEST-NET-1) that no interface here has: the bind fails.
        var r = Dsattn.RunMpi(4, $"{Job} --coordinator-bind 192.0.2.1", TimeSpan.FromSeconds(120), output);
        Assert.Equal(0, r.ExitCode);
        Assert.Single(Regex.Matches(r.Stderr, "hang detection is off"));
        Assert.DoesNotContain("control plane: coordinator at", r.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public void ControlPlaneOff_StartsNoCoordinator()
    {
        var r = Dsattn.RunMpi(2, $"{Job} --control-plane off", TimeSpan.FromSeconds(120), output);
        Assert.Equal(0, r.ExitCode);
        Assert.DoesNotContain("control plane", r.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Status_DuringARun_ShowsEveryRankAdvancing()
    {
        string? address = null;
        var seen = new ManualResetEventSlim();
        var job = Task.Run(() => Dsattn.RunMpi(4, "run --attention lightning --scheme lasp2 --seq 16384 --heads 2 --head-dim 32 --backward --iterations 150 --backend cpu",
            TimeSpan.FromSeconds(180), output, null,
            line =>
            {
                var m = CoordinatorLine().Match(line);
                if (m.Success) { address = m.Groups[1].Value; seen.Set(); }
            }));
        Assert.True(seen.Wait(TimeSpan.FromSeconds(60)), "rank 0 never printed the coordinator's address");
        // Poll while the job runs: every rank must be listed, and each rank's last collective must move on.
        var numbers = new Dictionary<int, HashSet<long>>();
        for (int poll = 0; poll < 40 && !job.IsCompleted; poll++)
        {
            var st = Dsattn.Run($"status --coordinator {address}", TimeSpan.FromSeconds(30), output);
            // The coordinator goes away with the job: a refused poll right at the end is no failure.
            if (st.ExitCode != 0 && await Task.WhenAny(job, Task.Delay(TimeSpan.FromSeconds(10))) == job) break;
            Assert.Equal(0, st.ExitCode);
            foreach (var m in StatusRow().Matches(st.Stdout).Cast<Match>())
            {
                int rank = int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
                if (!numbers.TryGetValue(rank, out var set)) numbers[rank] = set = [];
                set.Add(long.Parse(m.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture));
            }
            await Task.Delay(300);
        }
        var r = await job;
        Assert.Equal(0, r.ExitCode);
        Assert.Equal([0, 1, 2, 3], numbers.Keys.Order());
        Assert.All(numbers, kv => Assert.True(kv.Value.Count >= 2, $"rank {kv.Key}'s last collective did not advance: {string.Join(", ", kv.Value)}"));
    }

    [GeneratedRegex(@"^\s+(\d)\s.*?#(\d+)", RegexOptions.Multiline)]
    private static partial Regex StatusRow();

    [GeneratedRegex(@"control plane: coordinator at (\S+),")]
    private static partial Regex CoordinatorLine();

    [GeneratedRegex("^dsattn watchdog: rank", RegexOptions.Multiline)]
    private static partial Regex WatchdogLine();
}
