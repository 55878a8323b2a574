using System.Diagnostics;
using Xunit;

namespace Distributed.Cluster.Tests;

/// <summary>
/// The emulated link: a collective takes at least latency + received bytes / bandwidth, a blocking one is all
/// waited for, and a started one hides behind the work done before its Wait. Bounds are loose (a shared CI
/// machine oversleeps), never tight from below on the waited time.
/// </summary>
public sealed class EmulatedLinkTests
{
    private static readonly TimeSpan Limit = TimeSpan.FromSeconds(60);

    [Fact]
    public void BlockingAllGather_TakesAtLeastTheLinkTime_AndNothingIsHidden()
    {
        // 1 MB/s and 4 ranks: each rank receives 3 × 10,000 floats = 120 kB → 120 ms, plus 10 ms latency.
        var link = EmulatedLink.FromGigabytesPerSecond(0.001, 10_000);
        var results = InProcessCommunicator.Run(4, inner =>
        {
            using var comm = new EmulatedLinkCommunicator(inner, link);
            var send = Enumerable.Repeat((float)comm.Rank, 10_000).ToArray();
            var receive = new float[4 * send.Length];
            var sw = Stopwatch.StartNew();
            comm.AllGather(send, receive);
            double ms = sw.Elapsed.TotalMilliseconds;
            Assert.Equal(3f, receive[^1]);
            return (ms, comm.Statistics.CommunicationMs, comm.Statistics.WaitedMs, comm.Statistics.HiddenFraction);
        }, Limit);
        foreach (var (ms, comm, waited, hidden) in results)
        {
            Assert.True(ms >= 129, $"the all-gather took {ms:F1} ms, less than the link's 130 ms");
            Assert.True(comm >= 129, $"communication {comm:F1} ms");
            Assert.Equal(comm, waited);
            Assert.Equal(0, hidden);
        }
    }

    [Fact]
    public void StartedAllGather_WorkBeforeWait_HidesTheLink()
    {
        // 100 ms of link time; each rank works 200 ms between start and wait, so (almost) nothing is left to wait.
        var link = EmulatedLink.FromGigabytesPerSecond(1000, 100_000);
        var results = InProcessCommunicator.Run(2, inner =>
        {
            using var comm = new EmulatedLinkCommunicator(inner, link);
            var send = new float[] { comm.Rank + 1 };
            var receive = new float[2];
            var request = comm.StartAllGather(send, receive);
            Thread.Sleep(200);
            request.Wait();
            Assert.Equal([1f, 2f], receive);
            return (comm.Statistics.CommunicationMs, comm.Statistics.WaitedMs, comm.Statistics.HiddenFraction);
        }, Limit);
        foreach (var (comm, waited, hidden) in results)
        {
            Assert.True(comm >= 99, $"communication {comm:F1} ms, less than the 100 ms link time");
            Assert.True(hidden > 0.5, $"hidden {hidden:P0} (communication {comm:F1} ms, waited {waited:F1} ms)");
        }
    }

    [Fact]
    public void StartedAllGather_WaitedAtOnce_WaitsOutTheLink()
    {
        var link = EmulatedLink.FromGigabytesPerSecond(1000, 80_000);
        var results = InProcessCommunicator.Run(2, inner =>
        {
            using var comm = new EmulatedLinkCommunicator(inner, link);
            var receive = new float[2];
            var sw = Stopwatch.StartNew();
            comm.StartAllGather(new float[] { comm.Rank }, receive).Wait();
            return (sw.Elapsed.TotalMilliseconds, comm.Statistics.HiddenFraction);
        }, Limit);
        foreach (var (ms, hidden) in results)
        {
            Assert.True(ms >= 79, $"start + wait took {ms:F1} ms, less than the 80 ms link time");
            Assert.True(hidden < 0.2, $"hidden {hidden:P0} although the rank waited at once");
        }
    }

    [Fact]
    public void TwoStartedTransfers_QueueOnTheLink()
    {
        // Two 80 ms send/receives in flight together share the link: the second completes no earlier than
        // 160 ms after the first started, and each counts its own 80 ms (not the time it queued).
        var link = EmulatedLink.FromGigabytesPerSecond(1000, 80_000);
        var results = InProcessCommunicator.Run(2, inner =>
        {
            using var comm = new EmulatedLinkCommunicator(inner, link);
            int peer = 1 - comm.Rank;
            var a = new float[1];
            var b = new float[1];
            var sw = Stopwatch.StartNew();
            var first = comm.StartSendRecv(new float[] { comm.Rank }, peer, a, peer);
            var second = comm.StartSendRecv(new float[] { comm.Rank + 10 }, peer, b, peer);
            first.Wait();
            second.Wait();
            Assert.Equal([peer, peer + 10f], new[] { a[0], b[0] });
            return (sw.Elapsed.TotalMilliseconds, comm.Statistics.CommunicationMs);
        }, Limit);
        foreach (var (ms, comm) in results)
        {
            Assert.True(ms >= 159, $"two transfers on one link took {ms:F1} ms, less than 2 × 80 ms");
            Assert.True(comm >= 159 && comm < 400, $"communication {comm:F1} ms, expected about 2 × 80 ms");
        }
    }

    [Fact]
    public void OneRank_AddsNothing()
    {
        var link = EmulatedLink.FromGigabytesPerSecond(0.000001, 1_000_000);
        double ms = InProcessCommunicator.Run(1, inner =>
        {
            using var comm = new EmulatedLinkCommunicator(inner, link);
            var sw = Stopwatch.StartNew();
            comm.AllGather(new float[1000], new float[1000]);
            return sw.Elapsed.TotalMilliseconds;
        }, Limit)[0];
        Assert.True(ms < 500, $"one rank waited {ms:F0} ms on a link it does not use");
    }

    [Theory]
    [InlineData(0, 0, "gigabytesPerSecond")]
    [InlineData(-1, 0, "gigabytesPerSecond")]
    [InlineData(double.NaN, 0, "gigabytesPerSecond")]
    [InlineData(1, -5, "latencyMicroseconds")]
    public void BadLink_NamesTheParameter(double gbps, double latencyUs, string parameter)
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => EmulatedLink.FromGigabytesPerSecond(gbps, latencyUs));
        Assert.Equal(parameter, e.ParamName);
        Assert.Contains("--link-", e.Message, StringComparison.Ordinal);
    }
}
