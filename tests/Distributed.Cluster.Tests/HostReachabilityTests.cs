using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Xunit;

namespace Distributed.Cluster.Tests;

public sealed class HostReachabilityTests
{
    [Theory]
    [InlineData("localhost", true)]
    [InlineData("LOCALHOST", true)]
    [InlineData("127.0.0.1", true)]
    [InlineData("127.3.4.5", true)]
    [InlineData("::1", true)]
    [InlineData("192.0.2.1", false)]
    [InlineData("node01.invalid", false)]
    public void IsLocalName_LoopbackAndLocalhost_OthersNot(string host, bool local) =>
        Assert.Equal(local, HostReachability.IsLocalName(host));

    [Fact]
    public void IsLocalName_ThisMachinesNameAndAddresses()
    {
        Assert.True(HostReachability.IsLocalName(Environment.MachineName));
        Assert.True(HostReachability.IsLocalName(Dns.GetHostName()));
    }

    [Theory]
    [InlineData(null, 22, "ssh")]
    [InlineData("ssh", 22, "ssh")]
    [InlineData("rsh", 514, "rsh")]
    [InlineData("slurm", null, "slurm")]
    [InlineData("fork", null, "fork")]
    public void LauncherPort_FollowsHydraLauncher(string? launcher, int? port, string name)
    {
        var (p, n) = HostReachability.LauncherPort(v => v == "HYDRA_LAUNCHER" ? launcher : null);
        Assert.Equal(port, p);
        Assert.Equal(name, n);
    }

    [Fact]
    public async Task ProbePort_ListeningPortAnswers_ClosedPortIsRefused()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        int open = ((IPEndPoint)listener.LocalEndpoint).Port;
        Assert.Null(await HostReachability.ProbePort(IPAddress.Loopback, open, TimeSpan.FromSeconds(5), "ssh"));
        listener.Stop();
        string? closed = await HostReachability.ProbePort(IPAddress.Loopback, open, TimeSpan.FromSeconds(5), "ssh");
        Assert.NotNull(closed);
        Assert.Contains($"TCP port {open}", closed, StringComparison.Ordinal);
        Assert.Contains("refused", closed, StringComparison.Ordinal);
    }

    [Fact]
    public void Find_LocalHostsAreNotProbed_BadOnesNamedWithTheirLines_WithinTheTimeout()
    {
        // Nothing listens on port 1 here: a probe of localhost would fail, so an empty answer shows it was skipped.
        var local = Hostfile.ParseText($"localhost:2\n127.0.0.1\n{Environment.MachineName} slots=2\n", "local.hosts");
        Assert.Empty(HostReachability.Find(local, 1, TimeSpan.FromSeconds(2)));

        // 192.0.2.1 is TEST-NET-1 (RFC 5737): never routed, so the probe fails (no answer, no route or refused).
        var hosts = Hostfile.ParseText("localhost:1\n# remote\n192.0.2.1:2\nno-such-host.invalid\n", "bad.hosts");
        var sw = Stopwatch.StartNew();
        var bad = HostReachability.Find(hosts, 22, TimeSpan.FromSeconds(1));
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(4), $"took {sw.Elapsed}");
        Assert.Equal([3, 4], bad.Select(b => b.Entry.Line));
        Assert.Contains("TCP port 22 (ssh", bad[0].Reason, StringComparison.Ordinal);
        Assert.Contains("--host-check-port", bad[0].Fix, StringComparison.Ordinal);
        Assert.Contains("does not resolve", bad[1].Reason, StringComparison.Ordinal);
        Assert.Contains("Fix the name", bad[1].Fix, StringComparison.Ordinal);

        // Without a port only names are checked.
        Assert.Equal([4], HostReachability.Find(hosts, null, TimeSpan.FromSeconds(1)).Select(b => b.Entry.Line));
    }

    [Fact]
    public void Find_BadArguments_NameTheParameter()
    {
        var hosts = Hostfile.ParseText("localhost\n", "h");
        Assert.Equal("port", Assert.Throws<ArgumentOutOfRangeException>(() => HostReachability.Find(hosts, 0, TimeSpan.FromSeconds(1))).ParamName);
        Assert.Equal("timeout", Assert.Throws<ArgumentOutOfRangeException>(() => HostReachability.Find(hosts, 22, TimeSpan.Zero)).ParamName);
    }
}
