using Distributed.Cluster;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// MPI ranks that share a host are pinned to disjoint shares of its cores (<see cref="RankAffinity"/>): the
/// share arithmetic, and real <c>mpiexec</c> jobs whose ranks report the CPU mask they run with.
/// </summary>
public sealed class RankAffinityTests(ITestOutputHelper output)
{
    private static readonly int[][] FourCoresTwoThreads = [[0, 4], [1, 5], [2, 6], [3, 7]];

    [Fact]
    public void Share_WholeCoresPerRank_SiblingsStayTogether()
    {
        Assert.Equal([0, 4, 1, 5], RankAffinity.Share(FourCoresTwoThreads, 0, 2));
        Assert.Equal([2, 6, 3, 7], RankAffinity.Share(FourCoresTwoThreads, 1, 2));
        Assert.Equal([3, 7], RankAffinity.Share(FourCoresTwoThreads, 3, 4));
        // 3 ranks on 4 cores: one core each, the fourth left to the system.
        Assert.Equal([2, 6], RankAffinity.Share(FourCoresTwoThreads, 2, 3));
    }

    [Fact]
    public void Share_MoreRanksThanCores_RoundRobin()
    {
        int[][] two = [[0], [1]];
        Assert.Equal([[0], [1], [0], [1]], Enumerable.Range(0, 4).Select(r => RankAffinity.Share(two, r, 4)).ToArray());
    }

    [Theory]
    [InlineData("0-3", new[] { 0, 1, 2, 3 }, "0-3")]
    [InlineData("0,2-3,8\n", new[] { 0, 2, 3, 8 }, "0,2-3,8")]
    [InlineData("5", new[] { 5 }, "5")]
    public void CpuLists_ParseAndPrint(string text, int[] cpus, string printed)
    {
        Assert.Equal(cpus, RankAffinity.ParseList(text));
        Assert.Equal(printed, RankAffinity.Ranges(cpus));
    }

    /// <summary>The "on cores L" of every rank's line, in rank order.</summary>
    private static List<List<int>> ReportedMasks(string stdout, int ranks) =>
        [.. Enumerable.Range(0, ranks).Select(r =>
        {
            var line = stdout.Split('\n').Single(l => l.StartsWith($"rank {r}/{ranks} ", StringComparison.Ordinal));
            int at = line.IndexOf(" on cores ", StringComparison.Ordinal);
            Assert.True(at > 0, $"rank {r} was not pinned: {line}");
            var mask = RankAffinity.ParseList(line[(at + " on cores ".Length)..]);
            Assert.Contains($" {mask.Count} thread(s) on cores", line, StringComparison.Ordinal); // its kernel threads fill its share
            return mask;
        })];

    private const string Job = "run --attention lightning --scheme lasp2 --seq 256 --heads 2 --head-dim 16 --backend cpu --no-progress --control-plane off";

    [Fact]
    public void Mpi_RanksSharingAHost_RunOnDisjointCores()
    {
        if (Environment.ProcessorCount < 2 || RankAffinity.AllowedCpus() is not { Count: >= 2 }) return; // one CPU: nothing to share out
        var r = Dsattn.RunMpi(2, Job, TimeSpan.FromSeconds(120), output);
        Assert.Equal(0, r.ExitCode);
        var masks = ReportedMasks(r.Stdout, 2);
        Assert.All(masks, m => Assert.NotEmpty(m));
        Assert.Empty(masks[0].Intersect(masks[1]));
    }

    [Fact]
    public void Mpi_BindOff_LeavesRanksUnpinned_BadModeRefused()
    {
        var off = Dsattn.RunMpi(2, Job, TimeSpan.FromSeconds(120), output, new Dictionary<string, string?> { ["DSATTN_BIND"] = "off" });
        Assert.Equal(0, off.ExitCode);
        Assert.DoesNotContain(" on cores ", off.Stdout, StringComparison.Ordinal);
        var bad = Dsattn.RunMpi(2, Job, TimeSpan.FromSeconds(120), output, new Dictionary<string, string?> { ["DSATTN_BIND"] = "socket" });
        Assert.NotEqual(0, bad.ExitCode);
        Assert.Contains("DSATTN_BIND=socket is not a binding mode: use auto", bad.Stdout + bad.Stderr, StringComparison.Ordinal);
    }
}
