using System.Diagnostics;

namespace Distributed.Cluster;

/// <summary>
/// A slower network, emulated: the speed of one rank's link. Every collective takes at least
/// <c>latency + received bytes / bandwidth</c> on each rank (once per collective, not per hop).
/// </summary>
/// <param name="BytesPerSecond">Bandwidth in bytes per second (&gt; 0).</param>
/// <param name="Latency">Added once per collective (≥ 0).</param>
public sealed record EmulatedLink(double BytesPerSecond, TimeSpan Latency)
{
    /// <summary>Creates the link from the CLI units: GB/s (10⁹ bytes per second) and microseconds.</summary>
    /// <exception cref="ArgumentOutOfRangeException">Bandwidth not positive and finite, or latency negative.</exception>
    public static EmulatedLink FromGigabytesPerSecond(double gigabytesPerSecond, double latencyMicroseconds)
    {
        if (!(gigabytesPerSecond > 0) || double.IsInfinity(gigabytesPerSecond))
            throw new ArgumentOutOfRangeException(nameof(gigabytesPerSecond), gigabytesPerSecond, "--link-bandwidth must be a positive number of GB/s, e.g. 10 for a 10 GB/s link.");
        if (!(latencyMicroseconds >= 0) || double.IsInfinity(latencyMicroseconds))
            throw new ArgumentOutOfRangeException(nameof(latencyMicroseconds), latencyMicroseconds, "--link-latency must be a number of microseconds ≥ 0, e.g. 5.");
        return new EmulatedLink(gigabytesPerSecond * 1e9, TimeSpan.FromTicks((long)Math.Round(latencyMicroseconds * 10)));
    }

    /// <summary>The least time a collective that delivers <paramref name="receivedBytes"/> to this rank takes.</summary>
    public TimeSpan TimeFor(double receivedBytes) => Latency + TimeSpan.FromSeconds(receivedBytes / BytesPerSecond);
}

/// <summary>
/// What one rank's collectives cost on an <see cref="EmulatedLink"/>: how long they were in flight
/// (<see cref="CommunicationMs"/>) and how long the rank actually waited for them (<see cref="WaitedMs"/>).
/// The difference is the communication hidden behind compute. Shared by a communicator and its splits.
/// </summary>
public sealed class LinkStatistics
{
    private readonly object _lock = new();
    private double _comm, _waited;
    private long _collectives;

    /// <summary>Milliseconds of communication, summed over collectives: each one's time on the link, or the time
    /// the rank waited for it when that was longer (a blocking collective is all waiting).</summary>
    public double CommunicationMs { get { lock (_lock) return _comm; } }

    /// <summary>Milliseconds the rank spent blocked in collectives or in <see cref="CommRequest.Wait"/>, summed.</summary>
    public double WaitedMs { get { lock (_lock) return _waited; } }

    /// <summary>Collectives counted.</summary>
    public long Collectives { get { lock (_lock) return _collectives; } }

    /// <summary>Communication time not waited for: <c>max(0, CommunicationMs − WaitedMs)</c>.</summary>
    public double HiddenMs => Math.Max(0, CommunicationMs - WaitedMs);

    /// <summary>Hidden share of the communication time in [0, 1] (0 when there was none).</summary>
    public double HiddenFraction => CommunicationMs > 0 ? Math.Clamp(HiddenMs / CommunicationMs, 0, 1) : 0;

    /// <summary>Forgets everything counted so far (e.g. after a warm-up step).</summary>
    public void Reset()
    {
        lock (_lock) { _comm = 0; _waited = 0; _collectives = 0; _busyUntil = 0; }
    }

    private long _busyUntil;

    /// <summary>Books the rank's link for a transfer that is ready at <paramref name="ready"/> and occupies the
    /// link for <paramref name="duration"/> (Stopwatch ticks): transfers in flight together queue behind each
    /// other instead of sharing an unbounded link. Returns when it completes.</summary>
    internal long Book(long ready, long duration)
    {
        lock (_lock)
        {
            long start = Math.Max(ready, _busyUntil);
            _busyUntil = start + duration;
            return _busyUntil;
        }
    }

    internal void Add(double commMs, double waitedMs)
    {
        lock (_lock) { _comm += commMs; _waited += waitedMs; _collectives++; }
    }
}

/// <summary>
/// Wraps a communicator so that it behaves like one on a slower <see cref="EmulatedLink"/>: each collective
/// completes no earlier than <c>start + latency + received bytes / bandwidth</c>, where start is when it was
/// called or, when an earlier started transfer of this rank still occupies the link, when that one ends (two
/// transfers in flight together take the sum of their times, not the longer one), a blocking one by sleeping out
/// the rest, a started one (<see cref="StartAllGather"/>, ...) in its <see cref="CommRequest.Wait"/>, so time
/// spent computing between start and wait hides the link exactly as it would hide a real transfer. Works over
/// any communicator (in-process threads or MPI), so the schemes are unchanged. Received bytes per collective:
/// all-gather the other ranks' blocks; all-reduce <c>2(P−1)/P</c> of the buffer (a ring); reduce-scatter and
/// all-to-all <c>(P−1)/P</c> of the send buffer; send/receive the received buffer; barrier none (latency only).
/// With one rank nothing crosses a link and nothing is added. Waiting sleeps (then yields for the last
/// millisecond), so it does not busy-spin on shared cores.
/// </summary>
public sealed class EmulatedLinkCommunicator : ICommunicator
{
    private readonly ICommunicator _inner;
    private readonly bool _ownsInner;

    /// <summary>Wraps <paramref name="inner"/> (not owned: disposing this leaves it open).</summary>
    public EmulatedLinkCommunicator(ICommunicator inner, EmulatedLink link) : this(inner, link, new LinkStatistics(), ownsInner: false) { }

    private EmulatedLinkCommunicator(ICommunicator inner, EmulatedLink link, LinkStatistics statistics, bool ownsInner)
    {
        ArgumentNullException.ThrowIfNull(inner);
        ArgumentNullException.ThrowIfNull(link);
        _inner = inner;
        Link = link;
        Statistics = statistics;
        _ownsInner = ownsInner;
    }

    /// <summary>The emulated link.</summary>
    public EmulatedLink Link { get; }

    /// <summary>Communication and waited time of this rank (shared with communicators split from this one).</summary>
    public LinkStatistics Statistics { get; }

    /// <inheritdoc/>
    public int Rank => _inner.Rank;

    /// <inheritdoc/>
    public int Size => _inner.Size;

    /// <inheritdoc/>
    public CommunicatorCounters Counters => _inner.Counters;

    /// <inheritdoc/>
    public long CollectiveSequence => _inner.CollectiveSequence;

    private double Others(double floats) => Size > 1 ? floats * (Size - 1) / Size * sizeof(float) : 0;

    /// <inheritdoc/>
    public void AllGather(ReadOnlySpan<float> send, Span<float> receive)
    {
        long t0 = Stopwatch.GetTimestamp();
        _inner.AllGather(send, receive);
        Blocking(t0, (double)(receive.Length - send.Length) * sizeof(float));
    }

    /// <inheritdoc/>
    public void AllGatherVariable(ReadOnlySpan<float> send, Span<float> receive, ReadOnlySpan<int> counts)
    {
        long t0 = Stopwatch.GetTimestamp();
        _inner.AllGatherVariable(send, receive, counts);
        Blocking(t0, (double)(receive.Length - send.Length) * sizeof(float));
    }

    /// <inheritdoc/>
    public void AllReduceSum(ReadOnlySpan<float> send, Span<float> receive)
    {
        long t0 = Stopwatch.GetTimestamp();
        _inner.AllReduceSum(send, receive);
        Blocking(t0, 2 * Others(receive.Length));
    }

    /// <inheritdoc/>
    public void ReduceScatterSum(ReadOnlySpan<float> send, Span<float> receive)
    {
        long t0 = Stopwatch.GetTimestamp();
        _inner.ReduceScatterSum(send, receive);
        Blocking(t0, Others(send.Length));
    }

    /// <inheritdoc/>
    public void AllToAll(ReadOnlySpan<float> send, Span<float> receive)
    {
        long t0 = Stopwatch.GetTimestamp();
        _inner.AllToAll(send, receive);
        Blocking(t0, Others(receive.Length));
    }

    /// <inheritdoc/>
    public void SendRecv(ReadOnlySpan<float> send, int destination, Span<float> receive, int source)
    {
        long t0 = Stopwatch.GetTimestamp();
        _inner.SendRecv(send, destination, receive, source);
        Blocking(t0, (double)receive.Length * sizeof(float));
    }

    /// <inheritdoc/>
    public CommRequest StartSendRecv(ReadOnlyMemory<float> send, int destination, Memory<float> receive, int source)
    {
        long t0 = Stopwatch.GetTimestamp();
        return Started(_inner.StartSendRecv(send, destination, receive, source), t0, (double)receive.Length * sizeof(float));
    }

    /// <inheritdoc/>
    public CommRequest StartAllGather(ReadOnlyMemory<float> send, Memory<float> receive)
    {
        long t0 = Stopwatch.GetTimestamp();
        return Started(_inner.StartAllGather(send, receive), t0, (double)(receive.Length - send.Length) * sizeof(float));
    }

    /// <inheritdoc/>
    public CommRequest StartAllReduceSum(ReadOnlyMemory<float> send, Memory<float> receive)
    {
        long t0 = Stopwatch.GetTimestamp();
        return Started(_inner.StartAllReduceSum(send, receive), t0, 2 * Others(receive.Length));
    }

    /// <inheritdoc/>
    public void Barrier()
    {
        long t0 = Stopwatch.GetTimestamp();
        _inner.Barrier();
        Blocking(t0, 0);
    }

    /// <inheritdoc/>
    public ICommunicator Split(int color, int key) => new EmulatedLinkCommunicator(_inner.Split(color, key), Link, Statistics, ownsInner: true);

    /// <inheritdoc/>
    public void Dispose()
    {
        if (_ownsInner) _inner.Dispose();
    }

    /// <summary>The link's time for <paramref name="receivedBytes"/>, in Stopwatch ticks (0 with one rank).</summary>
    private long Duration(double receivedBytes) =>
        Size > 1 ? (long)(Link.TimeFor(receivedBytes).TotalSeconds * Stopwatch.Frequency) : 0;

    private LinkRequest Started(CommRequest inner, long t0, double receivedBytes)
    {
        long duration = Duration(receivedBytes);
        return new LinkRequest(this, inner, Statistics.Book(t0, duration), duration);
    }

    /// <summary>A blocking collective: the whole of it is waited for, so none of it is hidden.</summary>
    private void Blocking(long t0, double receivedBytes)
    {
        SleepUntil(Statistics.Book(t0, Duration(receivedBytes)));
        double ms = Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
        Statistics.Add(ms, ms);
    }

    private static void SleepUntil(long deadline)
    {
        while (true)
        {
            long left = deadline - Stopwatch.GetTimestamp();
            if (left <= 0) return;
            double ms = left * 1000.0 / Stopwatch.Frequency;
            if (ms > 1.5) Thread.Sleep(TimeSpan.FromMilliseconds(ms - 1.0));
            else Thread.Yield();
        }
    }

    /// <summary>
    /// A started collective on the link, done on the link at <paramref name="deadline"/>. Its communication
    /// time is the link's time for it (<paramref name="duration"/>, not the time it queued behind another
    /// transfer); the rank waited from calling Wait until both the inner operation and the deadline were
    /// done. Waiting for a slower peer (load imbalance) therefore counts as waited, never as hidden.
    /// </summary>
    private sealed class LinkRequest(EmulatedLinkCommunicator owner, CommRequest inner, long deadline, long duration) : CommRequest
    {
        public override void Wait()
        {
            long w0 = Stopwatch.GetTimestamp();
            inner.Wait();
            SleepUntil(deadline);
            double waited = Stopwatch.GetElapsedTime(w0).TotalMilliseconds;
            double link = duration * 1000.0 / Stopwatch.Frequency;
            owner.Statistics.Add(Math.Max(link, waited), waited);
        }
    }
}
