namespace Distributed.Cluster;

/// <summary>Argument checks every communicator makes the same way, so in-process and MPI runs refuse alike.</summary>
internal static class CollectiveArguments
{
    /// <summary>An all-gather's receive holds <paramref name="size"/> × send floats.</summary>
    public static void CheckAllGather(int sendLength, int receiveLength, int size)
    {
        if (receiveLength != (long)sendLength * size)
            throw new ArgumentException($"AllGather: receive must hold Size × send.Length = {(long)sendLength * size} floats, got {receiveLength}.", "receive");
    }

    /// <summary>A started exchange's buffers must not overlap (MPI refuses it; in-process refuses it too).</summary>
    public static void CheckDisjoint(ReadOnlySpan<float> send, ReadOnlySpan<float> receive, string op)
    {
        if (send.Length > 0 && receive.Length > 0 && send.Overlaps(receive))
            throw new ArgumentException($"{op}: send and receive must not overlap.", "receive");
    }
}
