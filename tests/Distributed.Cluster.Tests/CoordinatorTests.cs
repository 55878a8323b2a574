using Distributed.Cluster.ControlPlane;
using Distributed.Cluster.ControlPlane.Protocol;
using Grpc.Core;
using Xunit;
using Coordinator = Distributed.Cluster.ControlPlane.Coordinator;

namespace Distributed.Cluster.Tests;

/// <summary>The control plane's coordinator over real gRPC on loopback, and its watchdog's rules.</summary>
public sealed class CoordinatorTests
{
    private static readonly TimeSpan Call = TimeSpan.FromSeconds(10);

    [Fact]
    public void DefaultBind_IsLoopback()
    {
        using var c = Coordinator.Start(new CoordinatorOptions { Size = 2, Log = TextWriter.Null });
        Assert.StartsWith("127.0.0.1:", c.Address, StringComparison.Ordinal);
        Assert.True(c.Port > 0);
        Assert.Equal(32, c.Token.Length);
    }

    [Fact]
    public void Calls_WithoutOrWithWrongToken_ArePermissionDenied_AndLoggedWithoutTheToken()
    {
        var log = new StringWriter();
        using var c = Coordinator.Start(new CoordinatorOptions { Size = 2, Log = log });
        using (var none = new CoordinatorClient(c.Address, null))
            Assert.Equal(StatusCode.PermissionDenied, Assert.Throws<RpcException>(() => none.GetStatus(Call)).StatusCode);
        using (var wrong = new CoordinatorClient(c.Address, "0123456789abcdef0123456789abcdef"))
        {
            Assert.Equal(StatusCode.PermissionDenied, Assert.Throws<RpcException>(() => wrong.GetStatus(Call)).StatusCode);
            Assert.Equal(StatusCode.PermissionDenied, Assert.Throws<RpcException>(() => wrong.Heartbeat(new HeartbeatRequest { Rank = 0 }, Call)).StatusCode);
            Assert.Equal(StatusCode.PermissionDenied, Assert.Throws<RpcException>(() => wrong.Register(new RegisterRequest { Rank = 0 }, Call)).StatusCode);
        }
        string logged = log.ToString();
        Assert.Contains("no token", logged, StringComparison.Ordinal);
        Assert.Contains("wrong token", logged, StringComparison.Ordinal);
        Assert.DoesNotContain(c.Token, logged, StringComparison.Ordinal);
        Assert.DoesNotContain("0123456789abcdef", logged, StringComparison.Ordinal);
        // Nothing was recorded from the refused calls.
        using var good = new CoordinatorClient(c.Address, c.Token);
        Assert.All(good.GetStatus(Call).Ranks, r => Assert.False(r.Registered));
    }

    [Fact]
    public void Heartbeats_AreKeptPerRank_AndStatusListsEveryRank()
    {
        using var c = Coordinator.Start(new CoordinatorOptions { Size = 3, Log = TextWriter.Null });
        using var client = new CoordinatorClient(c.Address, c.Token);
        client.Register(new RegisterRequest { Rank = 1, Size = 3, Host = "h", Pid = 42 }, Call);
        client.Heartbeat(new HeartbeatRequest { Rank = 1, Phase = "forward", Progress = 0.5, Last = new Collective { Op = "AllGather", Sequence = 7, Bytes = 1024, EnteredUnixMs = 1, LeftUnixMs = 2 } }, Call);
        client.Heartbeat(new HeartbeatRequest { Rank = 1, Phase = "backward", Progress = 0.25, Last = new Collective { Op = "AllReduce", Sequence = 8, EnteredUnixMs = 3 } }, Call);
        var st = client.GetStatus(Call);
        Assert.Equal(3, st.Ranks.Count);
        var r1 = st.Ranks[1];
        Assert.True(r1.Registered);
        Assert.Equal("backward", r1.Phase);
        Assert.Equal(8, r1.Last.Sequence);
        Assert.Equal("AllReduce", r1.Last.Op);
        Assert.InRange(r1.HeartbeatAgeMs, 0, 5000);
        Assert.False(st.Ranks[0].Registered);
        Assert.Equal(-1, st.Ranks[0].HeartbeatAgeMs);
        Assert.Equal(StatusCode.InvalidArgument, Assert.Throws<RpcException>(() => client.Heartbeat(new HeartbeatRequest { Rank = 3 }, Call)).StatusCode);
    }

    [Fact]
    public void Watchdog_NamesTheRankThatNeverEnteredTheCollective()
    {
        long now = 1_000_000;
        var st = new StatusReply { Size = 4, NowUnixMs = now };
        for (int r = 0; r < 4; r++)
            st.Ranks.Add(r == 2
                ? Rank(2, "Barrier", 2, now - 12_000, now - 11_900)
                : Rank(r, "Barrier", 3, now - 11_000, 0));
        string? report = Watchdog.Check(st, TimeSpan.FromSeconds(10), TimeSpan.FromSeconds(10));
        Assert.NotNull(report);
        Assert.StartsWith("dsattn watchdog: rank 2 never entered collective Barrier #3", report, StringComparison.Ordinal);
        Assert.Contains("rank 2: Barrier #2", report, StringComparison.Ordinal);
        Assert.Contains("<- culprit", report, StringComparison.Ordinal);
        // Below the timeout: no verdict.
        Assert.Null(Watchdog.Check(st, TimeSpan.FromSeconds(20), TimeSpan.FromSeconds(20)));
    }

    [Fact]
    public void Watchdog_NamesASilentRank_ButNotOneThatSaidDone()
    {
        long now = 1_000_000;
        var st = new StatusReply { Size = 2, NowUnixMs = now };
        st.Ranks.Add(Rank(0, "AllGather", 5, now - 100, now - 50));
        var silent = Rank(1, "AllGather", 5, now - 100, now - 50);
        silent.HeartbeatAgeMs = 15_000;
        st.Ranks.Add(silent);
        string? report = Watchdog.Check(st, TimeSpan.FromSeconds(300), TimeSpan.FromSeconds(10));
        Assert.NotNull(report);
        Assert.StartsWith("dsattn watchdog: rank 1 sent no heartbeat", report, StringComparison.Ordinal);
        silent.Phase = "done";
        Assert.Null(Watchdog.Check(st, TimeSpan.FromSeconds(300), TimeSpan.FromSeconds(10)));
    }

    [Fact]
    public void Coordinator_WatchdogFiresOnce_AndStatusKeepsTheVerdict()
    {
        var fired = new List<string>();
        using var c = Coordinator.Start(new CoordinatorOptions
        {
            Size = 2, Log = TextWriter.Null, HangTimeout = TimeSpan.FromSeconds(1), SilenceTimeout = TimeSpan.FromSeconds(60),
            OnHang = report => { lock (fired) fired.Add(report); },
        });
        using var client = new CoordinatorClient(c.Address, c.Token);
        long now = CollectiveProbe.NowUnixMs;
        client.Register(new RegisterRequest { Rank = 0, Size = 2 }, Call);
        client.Heartbeat(new HeartbeatRequest { Rank = 0, Phase = "forward", Last = new Collective { Op = "AllReduce", Sequence = 4, EnteredUnixMs = now } }, Call);
        client.Register(new RegisterRequest { Rank = 1, Size = 2 }, Call);
        client.Heartbeat(new HeartbeatRequest { Rank = 1, Phase = "forward", Last = new Collective { Op = "AllReduce", Sequence = 3, EnteredUnixMs = now - 10, LeftUnixMs = now } }, Call);
        var until = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (DateTime.UtcNow < until && c.Verdict.Length == 0)
        {
            client.Heartbeat(new HeartbeatRequest { Rank = 1, Phase = "forward", Last = new Collective { Op = "AllReduce", Sequence = 3, EnteredUnixMs = now - 10, LeftUnixMs = now } }, Call);
            Thread.Sleep(100);
        }
        Thread.Sleep(1000);
        lock (fired)
        {
            Assert.Single(fired);
            Assert.Contains("rank 1 never entered collective AllReduce #4", fired[0], StringComparison.Ordinal);
        }
        Assert.Equal(fired[0], client.GetStatus(Call).Verdict);
    }

    [Fact]
    public void Reporter_WarnsOnce_WhenTheCoordinatorIsUnreachable()
    {
        var warn = new StringWriter();
        using (var r = RankReporter.Start("127.0.0.1:1", "x", 0, 1, warn))
        {
            Assert.True(r.Degraded);
            Thread.Sleep(2500);
        }
        string text = warn.ToString();
        Assert.Contains("hang detection is off", text, StringComparison.Ordinal);
        Assert.Single(text.Split('\n', StringSplitOptions.RemoveEmptyEntries));
    }

    [Fact]
    public void Reporter_CoordinatorGoneMidRun_WarnsOnce()
    {
        var warn = new StringWriter();
        var c = Coordinator.Start(new CoordinatorOptions { Size = 1, Log = TextWriter.Null });
        using var r = RankReporter.Start(c.Address, c.Token, 0, 1, warn);
        Assert.False(r.Degraded);
        Thread.Sleep(1500);
        using (var client = new CoordinatorClient(c.Address, c.Token))
            Assert.True(client.GetStatus(Call).Ranks[0].Registered);
        c.Dispose();
        var until = DateTime.UtcNow + TimeSpan.FromSeconds(15);
        while (!r.Degraded && DateTime.UtcNow < until) Thread.Sleep(200);
        Thread.Sleep(2000);
        Assert.True(r.Degraded);
        Assert.Single(warn.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries));
    }

    [Fact]
    public void TokenFile_IsReadableByTheUserOnly()
    {
        string path = Path.Combine(Path.GetTempPath(), $"dsattn-test-{Guid.NewGuid():N}.token");
        try
        {
            JobControlPlane.WriteTokenFile(path, "secret");
            Assert.Equal("secret", File.ReadAllText(path));
            if (!OperatingSystem.IsWindows())
                Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(path));
        }
        finally { File.Delete(path); }
    }

    [Theory]
    [InlineData("hang:2:3", true, 2, 3L)]
    [InlineData("exit:0:1", false, 0, 1L)]
    public void FaultSpec_Parses(string spec, bool hang, int rank, long at)
    {
        var f = Assert.Single(FaultInjection.Parse(spec));
        Assert.Equal((hang, rank, at), f);
    }

    [Theory]
    [InlineData("hang:2")]
    [InlineData("stop:1:1")]
    [InlineData("hang:1:0")]
    public void FaultSpec_Malformed_IsRefused(string spec) =>
        Assert.Throws<ArgumentException>(() => FaultInjection.Parse(spec));

    private static RankStatus Rank(int rank, string op, long seq, long entered, long left) => new()
    {
        Rank = rank, Registered = true, Phase = "forward", Progress = 0.5, HeartbeatAgeMs = 300,
        Last = new Collective { Op = op, Sequence = seq, Bytes = 0, EnteredUnixMs = entered, LeftUnixMs = left },
    };
}
