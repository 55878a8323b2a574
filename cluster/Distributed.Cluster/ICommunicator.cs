namespace Distributed.Cluster;

/// <summary>
/// A group of ranks that exchange float data. Every collective must be called by every rank of the
/// group, in the same order, with compatible sizes. All buffers are flat float spans; the caller owns
/// the layout. Implementations count calls and bytes per operation (<see cref="Counters"/>) and number
/// the collectives each rank enters (<see cref="CollectiveSequence"/>), so a hang can be named.
/// </summary>
public interface ICommunicator : IDisposable
{
    /// <summary>This rank's index in the group, 0 ≤ Rank &lt; Size.</summary>
    int Rank { get; }

    /// <summary>Number of ranks in the group.</summary>
    int Size { get; }

    /// <summary>Per-operation call and byte counters of this rank.</summary>
    CommunicatorCounters Counters { get; }

    /// <summary>How many collectives (and point-to-point exchanges) this rank has entered so far.</summary>
    long CollectiveSequence { get; }

    /// <summary>
    /// Gathers every rank's <paramref name="send"/> block into <paramref name="receive"/> in rank order.
    /// Every rank sends the same count; <c>receive.Length == Size * send.Length</c>.
    /// </summary>
    void AllGather(ReadOnlySpan<float> send, Span<float> receive);

    /// <summary>
    /// Gathers blocks of different sizes in rank order: rank r sends <c>counts[r]</c> floats and
    /// <c>receive.Length == counts.Sum()</c>.
    /// </summary>
    void AllGatherVariable(ReadOnlySpan<float> send, Span<float> receive, ReadOnlySpan<int> counts);

    /// <summary>Element-wise sum over ranks; every rank gets the sum. <c>receive.Length == send.Length</c>.
    /// <paramref name="send"/> and <paramref name="receive"/> may be the same memory.</summary>
    void AllReduceSum(ReadOnlySpan<float> send, Span<float> receive);

    /// <summary>
    /// Element-wise sum over ranks of <paramref name="send"/> (<c>Size</c> equal blocks), of which rank r
    /// keeps block r: <c>send.Length == Size * receive.Length</c>.
    /// </summary>
    void ReduceScatterSum(ReadOnlySpan<float> send, Span<float> receive);

    /// <summary>
    /// Block s of <paramref name="send"/> goes to rank s; block s of <paramref name="receive"/> came from
    /// rank s. Both have <c>Size</c> equal blocks.
    /// </summary>
    void AllToAll(ReadOnlySpan<float> send, Span<float> receive);

    /// <summary>Sends <paramref name="send"/> to rank <paramref name="destination"/> while receiving
    /// <paramref name="receive"/> from rank <paramref name="source"/>; blocks until both are done.</summary>
    void SendRecv(ReadOnlySpan<float> send, int destination, Span<float> receive, int source);

    /// <summary>
    /// Starts a send/receive pair and returns at once, so computation can overlap the transfer
    /// (ring attention). The buffers must stay untouched until <see cref="CommRequest.Wait"/> returns.
    /// </summary>
    CommRequest StartSendRecv(ReadOnlyMemory<float> send, int destination, Memory<float> receive, int source);

    /// <summary>
    /// Starts <see cref="AllGather"/> and returns at once, so computation can overlap the gather. It counts
    /// and numbers as the collective it is when started; every rank must start it where it would call
    /// <see cref="AllGather"/> (same order relative to the other collectives). Neither buffer may be
    /// touched until <see cref="CommRequest.Wait"/> returns, and they must not overlap.
    /// </summary>
    /// <param name="send">This rank's block.</param>
    /// <param name="receive">Every rank's block in rank order: <c>Size * send.Length</c> floats.</param>
    /// <returns>The collective in flight; call <see cref="CommRequest.Wait"/> exactly once.</returns>
    CommRequest StartAllGather(ReadOnlyMemory<float> send, Memory<float> receive);

    /// <summary>
    /// Starts <see cref="AllReduceSum"/> and returns at once, with the rules of <see cref="StartAllGather"/>.
    /// <paramref name="send"/> and <paramref name="receive"/> may be the same memory (in place); otherwise
    /// they must not overlap.
    /// </summary>
    /// <param name="send">This rank's addend.</param>
    /// <param name="receive">The element-wise sum over ranks, <c>send.Length</c> floats.</param>
    /// <returns>The collective in flight; call <see cref="CommRequest.Wait"/> exactly once.</returns>
    CommRequest StartAllReduceSum(ReadOnlyMemory<float> send, Memory<float> receive);

    /// <summary>Blocks until every rank of the group has entered the barrier.</summary>
    void Barrier();

    /// <summary>
    /// Splits the group: ranks with the same <paramref name="color"/> form a new group, ordered by
    /// <paramref name="key"/> (then by old rank). Collective over this group.
    /// </summary>
    ICommunicator Split(int color, int key);
}

/// <summary>An exchange or collective in flight, started by <see cref="ICommunicator.StartSendRecv"/>,
/// <see cref="ICommunicator.StartAllGather"/> or <see cref="ICommunicator.StartAllReduceSum"/>.</summary>
public abstract class CommRequest
{
    /// <summary>Blocks until the operation has completed on this rank (its receive buffer holds the
    /// result and its send buffer may be reused). Call exactly once, on the thread that started it or
    /// serialised with every other call into the communicator. Under MPI the operation advances while
    /// the rank computes (a progress thread tests it) and the wait sleeps until it is done, without spinning.</summary>
    public abstract void Wait();
}
