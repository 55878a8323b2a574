using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// <c>dsattn run</c> reports the managed bytes a step allocates after the first (the runtime's process-wide counter,
/// divided by the in-process ranks; per process under MPI) in its summary and as <c>allocatedBytesPerStep</c> in
/// --json; a forward + backward step stays under 1 MB per rank.
/// </summary>
public sealed class CliStepAllocationTests(ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("dsattn-alloc-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Theory]
    [InlineData("lightning", "lasp2")]
    [InlineData("softmax", "allgather")]
    [InlineData("softmax", "ring")]
    [InlineData("softmax", "ulysses")]
    [InlineData("softmax", "hybrid")]
    public void Run_TenStepsWithBackward_ReportsUnder1MbPerRankAndStep(string attention, string scheme)
    {
        string json = Path.Combine(_dir, "run.json");
        var r = Dsattn.Run($"run --ranks 4 --attention {attention} --scheme {scheme} --seq 512 --heads 4 --head-dim 16 --iterations 10 --backward --backend cpu --no-progress --json {json}",
            TimeSpan.FromSeconds(120), output);
        Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);
        Assert.Contains("alloc/step", r.Stdout, StringComparison.Ordinal);
        Assert.Contains("the process's total / 4 ranks", r.Stdout, StringComparison.Ordinal);
        var job = JsonDocument.Parse(File.ReadAllText(json)).RootElement[0];
        double perStep = job.GetProperty("allocatedBytesPerStep").GetDouble();
        output.WriteLine($"{attention}/{scheme}: {perStep / 1024:F1} KiB per rank and step");
        // Every step allocates something (its timers at least): zero would mean nothing was measured.
        Assert.True(perStep > 0, "nothing measured");
        Assert.True(perStep < 1 << 20, $"{perStep / (1 << 20):F2} MiB per rank and step");
        // In-process ranks share one counter: each reports the same share.
        foreach (var rank in job.GetProperty("ranks").EnumerateArray())
            Assert.Equal(perStep, rank.GetProperty("allocatedBytesPerStep").GetDouble());
    }

    [Fact]
    public void Run_OneStep_HasNoSteadyStateToReport()
    {
        string json = Path.Combine(_dir, "run.json");
        var r = Dsattn.Run($"run --ranks 2 --attention softmax --seq 128 --heads 2 --head-dim 8 --backend cpu --no-progress --json {json}", TimeSpan.FromSeconds(60), output);
        Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);
        var job = JsonDocument.Parse(File.ReadAllText(json)).RootElement[0];
        Assert.Equal(JsonValueKind.Null, job.GetProperty("allocatedBytesPerStep").ValueKind);
        Assert.DoesNotContain("alloc/step: managed", r.Stdout, StringComparison.Ordinal);
    }

    [Fact]
    public void Run_Warmup_StepsAreNotTimedOrCounted_OneTimedStepHasASteadyState()
    {
        string cold = Path.Combine(_dir, "cold.json"), warm = Path.Combine(_dir, "warm.json");
        const string Job = "run --ranks 2 --attention lightning --scheme lasp2 --seq 256 --heads 2 --head-dim 16 --backward --backend cpu --no-progress";
        var a = Dsattn.Run($"{Job} --json {cold}", TimeSpan.FromSeconds(60), output);
        var b = Dsattn.Run($"{Job} --warmup 2 --json {warm}", TimeSpan.FromSeconds(60), output);
        Assert.True(a.ExitCode == 0 && b.ExitCode == 0, a.Stdout + a.Stderr + b.Stdout + b.Stderr);
        Assert.Contains("1 step(s) after 2 warm-up step(s)", b.Stdout, StringComparison.Ordinal);
        var c = JsonDocument.Parse(File.ReadAllText(cold)).RootElement[0];
        var w = JsonDocument.Parse(File.ReadAllText(warm)).RootElement[0];
        Assert.Equal(2, w.GetProperty("warmup").GetInt32());
        // The warm-up steps' traffic is not in the timed step's figures: the same bytes per step as without them.
        for (int r = 0; r < 2; r++)
        {
            var (rc, rw) = (c.GetProperty("ranks")[r], w.GetProperty("ranks")[r]);
            Assert.Equal(rc.GetProperty("bytesSent").GetDouble(), rw.GetProperty("bytesSent").GetDouble());
            Assert.Equal(rc.GetProperty("bytesReceived").GetDouble(), rw.GetProperty("bytesReceived").GetDouble());
        }
        // After a warm-up even one timed step is steady state, so it has an allocation figure.
        Assert.Equal(JsonValueKind.Null, c.GetProperty("allocatedBytesPerStep").ValueKind);
        Assert.True(w.GetProperty("allocatedBytesPerStep").GetDouble() > 0);
    }

    [Fact]
    public void RunUnderMpiexec_ReportsEachProcess()
    {
        string json = Path.Combine(_dir, "run.json");
        var r = Dsattn.RunMpi(2, $"run --attention lightning --scheme lasp2 --seq 256 --heads 2 --head-dim 16 --iterations 4 --backward --backend cpu --no-progress --control-plane off --json {json}",
            TimeSpan.FromSeconds(120), output);
        Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);
        Assert.Contains("alloc/step: managed bytes each rank's process allocated", r.Stdout, StringComparison.Ordinal);
        var job = JsonDocument.Parse(File.ReadAllText(json)).RootElement[0];
        var ranks = job.GetProperty("ranks").EnumerateArray().Select(x => x.GetProperty("allocatedBytesPerStep").GetDouble()).ToList();
        Assert.Equal(2, ranks.Count);
        Assert.All(ranks, b => Assert.InRange(b, 1, 1 << 20));
        Assert.Equal(ranks.Max(), job.GetProperty("allocatedBytesPerStep").GetDouble());
    }
}
