using System.Collections.Concurrent;

namespace Distributed.Cluster;

/// <summary>The operations a communicator counts.</summary>
public enum CommOp
{
    /// <summary><see cref="ICommunicator.AllGather"/> and <see cref="ICommunicator.AllGatherVariable"/>.</summary>
    AllGather,
    /// <summary><see cref="ICommunicator.AllReduceSum"/>.</summary>
    AllReduce,
    /// <summary><see cref="ICommunicator.ReduceScatterSum"/>.</summary>
    ReduceScatter,
    /// <summary><see cref="ICommunicator.AllToAll"/>.</summary>
    AllToAll,
    /// <summary><see cref="ICommunicator.SendRecv"/> and <see cref="ICommunicator.StartSendRecv"/>.</summary>
    SendRecv,
    /// <summary><see cref="ICommunicator.Barrier"/>.</summary>
    Barrier,
    /// <summary><see cref="ICommunicator.Split"/>.</summary>
    Split,
}

/// <summary>Calls and bytes of one operation on one rank.</summary>
/// <param name="Calls">Number of calls.</param>
/// <param name="BytesSent">Bytes this rank handed to the operation (its send buffer), summed over calls.</param>
/// <param name="BytesReceived">Bytes this rank got back (its receive buffer), summed over calls.</param>
public readonly record struct CommOpCount(long Calls, long BytesSent, long BytesReceived);

/// <summary>
/// Per-operation counters of one rank. "Sent" counts the payload this rank contributes (its send buffer),
/// "received" the payload it gets; how the library moves it on the wire is not counted.
/// </summary>
public sealed class CommunicatorCounters
{
    private readonly ConcurrentDictionary<CommOp, CommOpCount> _counts = new();

    /// <summary>Adds one call of <paramref name="op"/>.</summary>
    public void Record(CommOp op, long bytesSent, long bytesReceived) =>
        _counts.AddOrUpdate(op, _ => new CommOpCount(1, bytesSent, bytesReceived),
            (_, c) => new CommOpCount(c.Calls + 1, c.BytesSent + bytesSent, c.BytesReceived + bytesReceived));

    /// <summary>The counts of <paramref name="op"/> (zero when never called).</summary>
    public CommOpCount this[CommOp op] => _counts.TryGetValue(op, out var c) ? c : default;

    /// <summary>Bytes sent over all operations.</summary>
    public long TotalBytesSent => _counts.Values.Sum(c => c.BytesSent);

    /// <summary>Bytes received over all operations.</summary>
    public long TotalBytesReceived => _counts.Values.Sum(c => c.BytesReceived);

    /// <summary>Copies the current counts (for before/after differences).</summary>
    public IReadOnlyDictionary<CommOp, CommOpCount> Snapshot() => new Dictionary<CommOp, CommOpCount>(_counts);

    /// <summary>Zeroes every counter.</summary>
    public void Reset() => _counts.Clear();
}
