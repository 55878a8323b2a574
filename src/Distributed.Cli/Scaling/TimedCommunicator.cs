using System.Diagnostics;
using Distributed.Cluster;

namespace Distributed.Cli.Scaling;

/// <summary>One collective or exchange as a rank saw it, times in Stopwatch ticks.</summary>
/// <param name="Group">Which communicator (the world, or a split of it): the same number on every member.</param>
/// <param name="Index">The collective's number within its group (-1 for point-to-point exchanges).</param>
/// <param name="Destination">Point-to-point: the world rank sent to.</param>
/// <param name="Source">Point-to-point: the world rank received from.</param>
/// <param name="Phase">0 forward, 1 backward, -1 outside a measured phase.</param>
/// <param name="Enter">When this rank entered (or started) it.</param>
/// <param name="BlockStart">When this rank began to block on it (the call itself, or the request's Wait).</param>
/// <param name="BlockEnd">When the blocking ended.</param>
internal readonly record struct CommEvent(int Group, int Index, int Destination, int Source, int Phase, long Enter, long BlockStart, long BlockEnd);

/// <summary>The events of one rank, with the phase being measured.</summary>
internal sealed class CommEventLog
{
    private readonly List<CommEvent> _events = [];

    /// <summary>0 forward, 1 backward, -1 none.</summary>
    public int Phase { get; set; } = -1;

    public IReadOnlyList<CommEvent> Events => _events;

    public void Add(CommEvent e)
    {
        lock (_events) _events.Add(e);
    }

    public void Clear()
    {
        lock (_events) _events.Clear();
    }
}

/// <summary>
/// Passes every call to the communicator it wraps and logs when each was entered and how long it blocked,
/// so that the time spent waiting for a slower peer can be told apart from transfer time
/// (<see cref="WaitTime"/>). Splits are wrapped too (hybrid's head and sequence groups), each with its
/// members' world ranks.
/// </summary>
internal sealed class TimedCommunicator : ICommunicator
{
    private readonly ICommunicator _inner;
    private readonly CommEventLog _log;
    private readonly int _group;
    private readonly int[] _worldRanks;
    private int _collectives, _splits;

    /// <summary>Wraps the top-level communicator of a measurement (group 0, its ranks are the world ranks).</summary>
    public TimedCommunicator(ICommunicator inner, CommEventLog log) : this(inner, log, 0, Enumerable.Range(0, inner.Size).ToArray()) { }

    private TimedCommunicator(ICommunicator inner, CommEventLog log, int group, int[] worldRanks)
    {
        _inner = inner;
        _log = log;
        _group = group;
        _worldRanks = worldRanks;
    }

    public int Rank => _inner.Rank;
    public int Size => _inner.Size;
    public CommunicatorCounters Counters => _inner.Counters;
    public long CollectiveSequence => _inner.CollectiveSequence;

    public void AllGather(ReadOnlySpan<float> send, Span<float> receive)
    {
        long t = Stopwatch.GetTimestamp();
        _inner.AllGather(send, receive);
        Collective(t);
    }

    public void AllGatherVariable(ReadOnlySpan<float> send, Span<float> receive, ReadOnlySpan<int> counts)
    {
        long t = Stopwatch.GetTimestamp();
        _inner.AllGatherVariable(send, receive, counts);
        Collective(t);
    }

    public void AllReduceSum(ReadOnlySpan<float> send, Span<float> receive)
    {
        long t = Stopwatch.GetTimestamp();
        _inner.AllReduceSum(send, receive);
        Collective(t);
    }

    public void ReduceScatterSum(ReadOnlySpan<float> send, Span<float> receive)
    {
        long t = Stopwatch.GetTimestamp();
        _inner.ReduceScatterSum(send, receive);
        Collective(t);
    }

    public void AllToAll(ReadOnlySpan<float> send, Span<float> receive)
    {
        long t = Stopwatch.GetTimestamp();
        _inner.AllToAll(send, receive);
        Collective(t);
    }

    public void Barrier()
    {
        long t = Stopwatch.GetTimestamp();
        _inner.Barrier();
        Collective(t);
    }

    public void SendRecv(ReadOnlySpan<float> send, int destination, Span<float> receive, int source)
    {
        long t = Stopwatch.GetTimestamp();
        _inner.SendRecv(send, destination, receive, source);
        _log.Add(new CommEvent(_group, -1, _worldRanks[destination], _worldRanks[source], _log.Phase, t, t, Stopwatch.GetTimestamp()));
    }

    public CommRequest StartSendRecv(ReadOnlyMemory<float> send, int destination, Memory<float> receive, int source)
    {
        long t = Stopwatch.GetTimestamp();
        var request = _inner.StartSendRecv(send, destination, receive, source);
        return new TimedRequest(request, _log, new CommEvent(_group, -1, _worldRanks[destination], _worldRanks[source], _log.Phase, t, 0, 0));
    }

    public CommRequest StartAllGather(ReadOnlyMemory<float> send, Memory<float> receive)
    {
        long t = Stopwatch.GetTimestamp();
        var request = _inner.StartAllGather(send, receive);
        return new TimedRequest(request, _log, new CommEvent(_group, _collectives++, -1, -1, _log.Phase, t, 0, 0));
    }

    public CommRequest StartAllReduceSum(ReadOnlyMemory<float> send, Memory<float> receive)
    {
        long t = Stopwatch.GetTimestamp();
        var request = _inner.StartAllReduceSum(send, receive);
        return new TimedRequest(request, _log, new CommEvent(_group, _collectives++, -1, -1, _log.Phase, t, 0, 0));
    }

    /// <summary>Splits the wrapped communicator; the child learns its members' world ranks with one tiny all-gather.</summary>
    public ICommunicator Split(int color, int key)
    {
        var child = _inner.Split(color, key);
        var mine = new[] { BitConverter.Int32BitsToSingle(_worldRanks[_inner.Rank]) };
        var all = new float[child.Size];
        child.AllGather(mine, all);
        int group = (int)((((long)_group * 131 + ++_splits) * 131 + color + 1) % 0x3fffffff); // deterministic: the same on every member
        return new TimedCommunicator(child, _log, group, all.Select(BitConverter.SingleToInt32Bits).ToArray());
    }

    public void Dispose() => _inner.Dispose();

    private void Collective(long enter) =>
        _log.Add(new CommEvent(_group, _collectives++, -1, -1, _log.Phase, enter, enter, Stopwatch.GetTimestamp()));

    private sealed class TimedRequest(CommRequest inner, CommEventLog log, CommEvent started) : CommRequest
    {
        public override void Wait()
        {
            long t = Stopwatch.GetTimestamp();
            inner.Wait();
            log.Add(started with { BlockStart = t, BlockEnd = Stopwatch.GetTimestamp() });
        }
    }
}
