using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary><c>dsattn run --link-bandwidth [--link-latency] [--no-overlap]</c>: the hidden-communication report.</summary>
public sealed class CliLinkTests(ITestOutputHelper output)
{
    private const string Lasp2 = "run --ranks 2 --attention lightning --scheme lasp2 --seq 4096 --heads 4 --head-dim 64 --backend cpu --backward --seed 7";

    private JsonElement RunJson(string extra, string dir, string name)
    {
        string file = Path.Combine(dir, name);
        var r = Dsattn.Run($"{Lasp2} {extra} --json {file}", TimeSpan.FromSeconds(120), output);
        Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);
        Assert.Contains("communication hidden: ", r.Stdout, StringComparison.Ordinal);
        using var doc = JsonDocument.Parse(File.ReadAllText(file));
        return doc.RootElement[0].Clone();
    }

    [Fact]
    public void Run_LinkBandwidth_ReportsCommunicationAndTheHiddenShare_OverlapOnAndOff()
    {
        string dir = Path.Combine(Path.GetTempPath(), "dsattn-link-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            // 30 ms latency per collective, two collectives per step (the forward and backward state all-gathers).
            var on = RunJson("--link-bandwidth 100 --link-latency 30000", dir, "on.json");
            var off = RunJson("--link-bandwidth 100 --link-latency 30000 --no-overlap", dir, "off.json");
            Assert.True(on.GetProperty("overlap").GetBoolean());
            Assert.False(off.GetProperty("overlap").GetBoolean());
            Assert.Equal(30_000, on.GetProperty("link").GetProperty("latencyUs").GetDouble(), 3);
            foreach (var rank in on.GetProperty("ranks").EnumerateArray().Concat(off.GetProperty("ranks").EnumerateArray()))
                Assert.True(rank.GetProperty("linkCommMs").GetDouble() >= 59, $"rank link time {rank.GetProperty("linkCommMs").GetDouble():F1} ms < 2 × 30 ms");
            // Blocking collectives hide nothing; the overlapped path hides some (loose: the benchmark gives the figure).
            Assert.Equal(0, off.GetProperty("communicationHidden").GetDouble());
            Assert.True(on.GetProperty("communicationHidden").GetDouble() > 0.1, $"hidden {on.GetProperty("communicationHidden").GetDouble():P0}");
        }
        finally { Directory.Delete(dir, true); }
    }

    [Theory]
    [InlineData("--link-bandwidth 0", "--link-bandwidth")]
    [InlineData("--link-latency 5", "--link-latency needs --link-bandwidth")]
    [InlineData("--link-bandwidth 1 --link-latency -3", "--link-latency")]
    public void Run_BadLink_IsRefusedNamingTheOption(string extra, string expected)
    {
        var r = Dsattn.Run($"{Lasp2} {extra}", TimeSpan.FromSeconds(60), output);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains(expected, r.Stderr, StringComparison.Ordinal);
    }
}
