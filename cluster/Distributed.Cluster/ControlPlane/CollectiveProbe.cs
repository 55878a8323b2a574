using System.Diagnostics;

namespace Distributed.Cluster.ControlPlane;

/// <summary>The last collective a rank entered, as the control plane reports it.</summary>
/// <param name="Op">The operation, or null before the first collective.</param>
/// <param name="Sequence">Its 1-based number among every collective this process entered (0: none yet).</param>
/// <param name="Bytes">Bytes this rank handed to it plus bytes it got back.</param>
/// <param name="EnteredUnixMs">When it was entered (Unix time, ms).</param>
/// <param name="LeftUnixMs">When it was left (Unix time, ms); 0 while still inside.</param>
public readonly record struct CollectiveSnapshot(CommOp? Op, long Sequence, long Bytes, long EnteredUnixMs, long LeftUnixMs);

/// <summary>
/// Process-wide record of the last collective entered under MPI (one rank per process), read by the
/// heartbeat thread. <see cref="MpiCommunicator"/> calls <see cref="Enter"/> and <see cref="Leave"/>;
/// each writes a few fields (no allocation). Every communicator of the process (world and the ones
/// <see cref="ICommunicator.Split"/> made) counts into the same sequence, so a rank's number is the count
/// of every collective call it made, barriers and splits included, the one DSATTN_FAULT counts.
/// </summary>
public static class CollectiveProbe
{
    private static readonly long BaseTimestamp = Stopwatch.GetTimestamp();
    private static readonly long BaseUnixMs = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds();
    private static long s_count;
    private static int s_op = -1;
    private static long s_bytes;
    private static long s_entered;
    private static long s_left;

    /// <summary>Collectives this process has entered so far.</summary>
    public static long Count => Volatile.Read(ref s_count);

    /// <summary>Unix time in ms from the monotonic clock (cheap; no system call beyond the counter).</summary>
    public static long NowUnixMs => BaseUnixMs + (Stopwatch.GetTimestamp() - BaseTimestamp) * 1000 / Stopwatch.Frequency;

    /// <summary>Records that this process enters a collective; applies DSATTN_FAULT first (it may never return).</summary>
    /// <param name="worldRank">This process's rank in the world communicator.</param>
    /// <param name="op">The operation.</param>
    /// <param name="bytes">Bytes sent plus bytes received.</param>
    internal static void Enter(int worldRank, CommOp op, long bytes)
    {
        long n = s_count + 1;
        FaultInjection.OnEnter(worldRank, n);
        Volatile.Write(ref s_left, 0);
        s_op = (int)op;
        s_bytes = bytes;
        s_entered = NowUnixMs;
        Volatile.Write(ref s_count, n);
    }

    /// <summary>Records that the collective entered last has completed on this rank.</summary>
    internal static void Leave() => Volatile.Write(ref s_left, NowUnixMs);

    /// <summary>The last collective entered (fields read without a lock; good enough for a report).</summary>
    public static CollectiveSnapshot Snapshot()
    {
        long count = Volatile.Read(ref s_count);
        long left = Volatile.Read(ref s_left);
        int op = s_op;
        return new CollectiveSnapshot(op < 0 ? null : (CommOp)op, count, s_bytes, s_entered, left);
    }
}
