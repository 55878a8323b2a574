using Xunit;

namespace Distributed.Cluster.Tests;

public sealed class HostfileTests
{
    [Fact]
    public void ParseText_BothFormsCommentsAndBlankLines()
    {
        var h = Hostfile.ParseText("""
            # cluster
            node01:4

            node02            # one slot
            node03 slots=8
              node04 slots=2 max_slots=6
            10.0.0.5:3
            """, "hosts");
        Assert.Equal(["node01", "node02", "node03", "node04", "10.0.0.5"], h.Entries.Select(e => e.Host));
        Assert.Equal([4, 1, 8, 2, 3], h.Entries.Select(e => e.Slots));
        Assert.Equal([2, 4, 5, 6, 7], h.Entries.Select(e => e.Line));
        Assert.Equal(18, h.TotalSlots);
        Assert.Equal("node01:4\nnode02:1\nnode03:8\nnode04:2\n10.0.0.5:3\n", h.ToHydraText());
    }

    [Theory]
    [InlineData("node01:x", 1, "slot count 'x'")]
    [InlineData("node01\nnode02:0", 2, "must be a whole number")]
    [InlineData("a\nb\nnode03 slots=", 3, "slot count ''")]
    [InlineData("node01 cpus=4", 1, "unexpected 'cpus=4'")]
    [InlineData(":4", 1, "missing host name")]
    [InlineData("# nothing here\n\n", 3, "names no host")]
    public void ParseText_BadLine_NamesFileLineAndReason(string text, int line, string reason)
    {
        var e = Assert.Throws<HostfileFormatException>(() => Hostfile.ParseText(text, "my.hosts"));
        Assert.Equal(line, e.Line);
        Assert.StartsWith($"my.hosts:{line}: ", e.Message, StringComparison.Ordinal);
        Assert.Contains(reason, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Parse_ExampleFileAtRepositoryRoot()
    {
        // The test project copies the repository's hostfile.example beside the tests.
        var h = Hostfile.Parse(Path.Combine(AppContext.BaseDirectory, "hostfile.example"));
        Assert.Equal(16, h.TotalSlots);
    }

    [Fact]
    public void Parse_MissingFile_SaysSo()
    {
        var e = Assert.Throws<FileNotFoundException>(() => Hostfile.Parse("/nonexistent/hosts"));
        Assert.Contains("hostfile.example", e.Message, StringComparison.Ordinal);
    }
}

public sealed class LaunchEnvironmentTests
{
    [Fact]
    public void Detect_Mpich()
    {
        var env = new Dictionary<string, string> { ["PMI_RANK"] = "3", ["PMI_SIZE"] = "8", ["MPI_LOCALRANKID"] = "1", ["MPI_LOCALNRANKS"] = "4" };
        var l = LaunchEnvironment.Detect(k => env.GetValueOrDefault(k));
        Assert.Equal(new LaunchEnvironment(LaunchKind.Mpich, 3, 8, 1, 4), l);
    }

    [Fact]
    public void Detect_OpenMpi_IsRecognisedToBeRefused()
    {
        var env = new Dictionary<string, string> { ["OMPI_COMM_WORLD_RANK"] = "0", ["OMPI_COMM_WORLD_SIZE"] = "2" };
        Assert.Equal(LaunchKind.OpenMpi, LaunchEnvironment.Detect(k => env.GetValueOrDefault(k)).Kind);
    }

    [Fact]
    public void Detect_None()
    {
        Assert.Equal(LaunchKind.None, LaunchEnvironment.Detect(_ => null).Kind);
    }

    [Fact]
    public async Task Run_CapturesExitCodeAndBothStreams()
    {
        var r = await MpiLauncher.RunAsync("/bin/sh", ["-c", "echo out; echo \"$DS_X\" >&2; exit 3"], TimeSpan.FromSeconds(30),
            environment: new Dictionary<string, string?> { ["DS_X"] = "from env" });
        Assert.Equal(3, r.ExitCode);
        Assert.False(r.TimedOut);
        Assert.Equal("out", r.Stdout.Trim());
        Assert.Equal("from env", r.Stderr.Trim());
    }

    [Fact]
    public void Run_Timeout_KillsAndSaysSo()
    {
        var r = MpiLauncher.Run("/bin/sh", ["-c", "sleep 60"], TimeSpan.FromSeconds(1));
        Assert.True(r.TimedOut);
        Assert.Equal(-1, r.ExitCode);
        Assert.True(r.Elapsed < TimeSpan.FromSeconds(20), $"took {r.Elapsed}");
    }

    [Fact]
    public void BuildArguments_WithHostfile()
    {
        var a = MpiLauncher.BuildArguments(4, "/tmp/h", "dotnet", ["x.dll", "run"]);
        Assert.Equal(["-n", "4", "-f", "/tmp/h", "dotnet", "x.dll", "run"], a);
        Assert.Throws<ArgumentOutOfRangeException>(() => MpiLauncher.BuildArguments(0, null, "p", []));
    }
}
