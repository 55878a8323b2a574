using System.Diagnostics;
using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// The real <c>dsattn</c> program, started as a process: in-process ranks, and real <c>mpiexec</c> jobs.
/// Every run has a timeout and its whole process tree is killed when it is exceeded.
/// </summary>
public sealed class CliRunTests(ITestOutputHelper output)
{
    private const string SmallShape = "--seq 96 --heads 4 --kv-heads 2 --head-dim 16 --backend cpu --seed 7";

    public static TheoryData<string> Schemes => new()
    {
        "--attention lightning --scheme lasp2 --decay 0.9",
        "--attention lightning --scheme lasp2 --no-causal",
        "--attention softmax --scheme allgather",
        "--attention softmax --scheme allgather --no-causal",
        "--attention softmax --scheme ulysses",
        "--attention lightning --scheme ulysses --decay auto",
        "--attention softmax --scheme partial",
        "--attention softmax --scheme ring",
        "--attention softmax --scheme hybrid --ulysses-degree 2 --hybrid-scheme ring",
        "--attention lightning --scheme hybrid --ulysses-degree 2 --decay 0.95",
    };

    [Theory]
    [MemberData(nameof(Schemes))]
    public void Run_InProcessRanks_MatchesSingleDevice(string scheme)
    {
        var r = Dsattn.Run($"run --ranks 4 {scheme} {SmallShape} --backward --check", TimeSpan.FromSeconds(120), output);
        Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);
        foreach (string t in new[] { "O", "dQ", "dK", "dV" })
            Assert.Contains($"check {t}:", r.Stdout, StringComparison.Ordinal);
        Assert.DoesNotContain("FAILED", r.Stdout, StringComparison.Ordinal);
    }

    public static TheoryData<int, string> MpiSchemes()
    {
        var data = new TheoryData<int, string>();
        foreach (int p in new[] { 2, 4 })
            foreach (string s in new[]
            {
                "--attention lightning --scheme lasp2 --decay 0.9",
                "--attention softmax --scheme allgather",
                "--attention lightning --scheme lasp2 --no-causal --layout zigzag",
                "--attention softmax --scheme ulysses",
                "--attention softmax --scheme partial",
                "--attention softmax --scheme ring",
                "--attention lightning --scheme hybrid --ulysses-degree 2 --decay 0.95",
            })
                data.Add(p, s);
        return data;
    }

    [Theory]
    [MemberData(nameof(MpiSchemes))]
    public void Run_UnderMpiexec_MatchesSingleDevice(int ranks, string scheme)
    {
        var r = Dsattn.RunMpi(ranks, $"run {scheme} {SmallShape} --backward --check", TimeSpan.FromSeconds(180), output);
        Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);
        Assert.Contains($"rank {ranks - 1}/{ranks} (MPI", r.Stdout, StringComparison.Ordinal);
        Assert.Contains("check dV:", r.Stdout, StringComparison.Ordinal);
        Assert.DoesNotContain("FAILED", r.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public void Run_InProcessRankThrows_FailsFastNamingTheRank()
    {
        var sw = Stopwatch.StartNew();
        var r = Dsattn.Run($"run --ranks 4 --attention softmax --scheme allgather {SmallShape} --fail-rank 2", TimeSpan.FromSeconds(60), output);
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("rank 2", r.Stderr, StringComparison.Ordinal);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(30), $"took {sw.Elapsed}");
    }

    [Fact]
    public void Run_MpiRankThrows_JobAbortsNamingTheRank()
    {
        var sw = Stopwatch.StartNew();
        var r = Dsattn.RunMpi(4, $"run --attention softmax --scheme allgather {SmallShape} --fail-rank 1", TimeSpan.FromSeconds(90), output);
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("rank 1 failed", r.Stdout + r.Stderr, StringComparison.Ordinal);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), $"took {sw.Elapsed}");
    }

    [Theory]
    [InlineData("--heads 8 --kv-heads 3", "--kv-heads")]
    [InlineData("--iterations 0", "--iterations")]
    [InlineData("--warmup -1", "--warmup")]
    [InlineData("--decay 1.5 --attention lightning", "--decay")]
    [InlineData("--causal --no-causal", "--no-causal")]
    public void Run_BadOption_ExitsTwoNamingTheOption(string args, string named)
    {
        var r = Dsattn.Run($"run {args} --seq 64 --backend cpu", TimeSpan.FromSeconds(60), output);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains(named, r.Stderr, StringComparison.Ordinal);
    }

    [Fact]
    public void Run_UlyssesWithHeadsNotDivisibleByRanks_FailsNamingHeads()
    {
        var r = Dsattn.Run("run --ranks 3 --attention softmax --scheme ulysses --seq 48 --heads 4 --head-dim 16 --backend cpu", TimeSpan.FromSeconds(60), output);
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("head", r.Stderr, StringComparison.OrdinalIgnoreCase);
    }

    [Fact]
    public void Run_Json_WritesPerRankResults()
    {
        string dir = Path.Combine(Path.GetTempPath(), "dsattn-test-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            string file = Path.Combine(dir, "run.json");
            var r = Dsattn.Run($"run --ranks 2 --attention lightning --scheme lasp2 {SmallShape} --iterations 2 --check --json {file}", TimeSpan.FromSeconds(60), output);
            Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);
            using var doc = JsonDocument.Parse(File.ReadAllText(file));
            var job = doc.RootElement[0];
            Assert.Equal("lasp2", job.GetProperty("scheme").GetString());
            Assert.Equal(2, job.GetProperty("ranks").GetArrayLength());
            Assert.True(job.GetProperty("ranks")[1].GetProperty("bytesSent").GetDouble() > 0);
            Assert.True(job.GetProperty("checks")[0].GetProperty("passed").GetBoolean());
            Assert.Empty(Directory.GetFiles(dir, "*.tmp-*"));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Theory]
    [InlineData("run --help", "--ulysses-degree")]
    [InlineData("launch --help", "--hostfile")]
    [InlineData("ptx --help", "--arch")]
    [InlineData("bench --help", "kernels")]
    public void Help_ListsTheOptions(string args, string expected)
    {
        var r = Dsattn.Run(args, TimeSpan.FromSeconds(60), output);
        Assert.Equal(0, r.ExitCode);
        Assert.Contains(expected, r.Stdout, StringComparison.Ordinal);
    }
}
