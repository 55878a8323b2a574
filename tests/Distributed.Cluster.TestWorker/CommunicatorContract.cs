using Distributed.Cluster;

namespace Distributed.Cluster.TestWorker;

/// <summary>
/// The ICommunicator contract as checks that run on every rank of a job: the in-process tests and the
/// mpiexec worker run the same checks. Values are generated from (rank, index) so every rank knows what
/// every other rank sent; each result is checked element by element.
/// </summary>
public static class CommunicatorContract
{
    /// <summary>Check names, in run order.</summary>
    public static IReadOnlyList<string> Names { get; } =
    [
        "AllGather", "AllGatherVariable", "AllReduceSum", "ReduceScatterSum", "AllToAll", "SendRecvRing",
        "StartSendRecvOverlap", "StartSendRecvProgress", "StartAllGather", "StartAllGatherInterleaved", "StartAllReduceSum", "Barrier", "Split", "CountersAndSequence", "RepeatedSizes",
    ];

    /// <summary>Runs one check on this rank; throws <see cref="ContractViolation"/> on a wrong element.</summary>
    public static void Run(string name, ICommunicator comm)
    {
        ArgumentNullException.ThrowIfNull(comm);
        switch (name)
        {
            case "AllGather": AllGather(comm, 5); AllGather(comm, 0); AllGather(comm, 1027); break;
            case "AllGatherVariable": AllGatherVariable(comm); break;
            case "AllReduceSum": AllReduceSum(comm, 13); AllReduceSum(comm, 4099); break;
            case "ReduceScatterSum": ReduceScatterSum(comm, 7); break;
            case "AllToAll": AllToAll(comm, 3); break;
            case "SendRecvRing": SendRecvRing(comm, 9); break;
            case "StartSendRecvOverlap": StartSendRecvOverlap(comm, 257); break;
            case "StartSendRecvProgress": StartSendRecvProgress(comm, 1 << 18); break;
            case "StartAllGather": StartAllGather(comm, 5); StartAllGather(comm, 0); StartAllGather(comm, 1 << 18); break;
            case "StartAllGatherInterleaved": StartAllGatherInterleaved(comm, 1027); break;
            case "StartAllReduceSum": StartAllReduceSum(comm, 4099); break;
            case "Barrier": comm.Barrier(); comm.Barrier(); break;
            case "Split": Split(comm); break;
            case "CountersAndSequence": CountersAndSequence(comm); break;
            case "RepeatedSizes": for (int i = 0; i < 20; i++) { AllGather(comm, 64 + (i % 3)); AllReduceSum(comm, 32); } break;
            default: throw new ArgumentException($"Unknown check '{name}'.", nameof(name));
        }
    }

    /// <summary>Value that rank <paramref name="rank"/> puts at index <paramref name="i"/>.</summary>
    public static float V(int rank, int i) => rank * 1000 + i * 0.5f;

    private static void Expect(float actual, float expected, string what)
    {
        if (actual != expected) throw new ContractViolation($"{what}: expected {expected}, got {actual}");
    }

    private static void AllGather(ICommunicator c, int n)
    {
        var send = Enumerable.Range(0, n).Select(i => V(c.Rank, i)).ToArray();
        var recv = new float[n * c.Size];
        c.AllGather(send, recv);
        for (int r = 0; r < c.Size; r++)
            for (int i = 0; i < n; i++) Expect(recv[r * n + i], V(r, i), $"AllGather n={n} block {r}[{i}]");
    }

    private static void AllGatherVariable(ICommunicator c)
    {
        int[] counts = Enumerable.Range(0, c.Size).Select(r => 2 * r + 1).ToArray();
        var send = Enumerable.Range(0, counts[c.Rank]).Select(i => V(c.Rank, i)).ToArray();
        var recv = new float[counts.Sum()];
        c.AllGatherVariable(send, recv, counts);
        int off = 0;
        for (int r = 0; r < c.Size; r++)
        {
            for (int i = 0; i < counts[r]; i++) Expect(recv[off + i], V(r, i), $"AllGatherVariable block {r}[{i}]");
            off += counts[r];
        }
    }

    private static void AllReduceSum(ICommunicator c, int n)
    {
        var send = Enumerable.Range(0, n).Select(i => (float)(c.Rank + 1) * (i % 17)).ToArray();
        var recv = new float[n];
        c.AllReduceSum(send, recv);
        float ranksSum = c.Size * (c.Size + 1) / 2f;
        for (int i = 0; i < n; i++) Expect(recv[i], ranksSum * (i % 17), $"AllReduceSum[{i}]");
        // In place: send and receive the same memory.
        c.AllReduceSum(send, send);
        for (int i = 0; i < n; i++) Expect(send[i], ranksSum * (i % 17), $"AllReduceSum in place[{i}]");
    }

    private static void ReduceScatterSum(ICommunicator c, int n)
    {
        var send = Enumerable.Range(0, n * c.Size).Select(i => (float)(c.Rank + 1) * i).ToArray();
        var recv = new float[n];
        c.ReduceScatterSum(send, recv);
        float ranksSum = c.Size * (c.Size + 1) / 2f;
        for (int i = 0; i < n; i++) Expect(recv[i], ranksSum * (c.Rank * n + i), $"ReduceScatterSum[{i}]");
    }

    private static void AllToAll(ICommunicator c, int block)
    {
        // Block d of rank s carries (s, d): V(s, d*block + i).
        var send = Enumerable.Range(0, block * c.Size).Select(j => V(c.Rank, j)).ToArray();
        var recv = new float[send.Length];
        c.AllToAll(send, recv);
        for (int s = 0; s < c.Size; s++)
            for (int i = 0; i < block; i++) Expect(recv[s * block + i], V(s, c.Rank * block + i), $"AllToAll from {s}[{i}]");
    }

    private static void SendRecvRing(ICommunicator c, int n)
    {
        int next = (c.Rank + 1) % c.Size, prev = (c.Rank - 1 + c.Size) % c.Size;
        var send = Enumerable.Range(0, n).Select(i => V(c.Rank, i)).ToArray();
        var recv = new float[n];
        c.SendRecv(send, next, recv, prev);
        for (int i = 0; i < n; i++) Expect(recv[i], V(prev, i), $"SendRecv from {prev}[{i}]");
    }

    private static void StartSendRecvOverlap(ICommunicator c, int n)
    {
        // Pass blocks all the way round the ring, computing between start and wait as ring attention does.
        int next = (c.Rank + 1) % c.Size, prev = (c.Rank - 1 + c.Size) % c.Size;
        var current = Enumerable.Range(0, n).Select(i => V(c.Rank, i)).ToArray();
        var incoming = new float[n];
        for (int step = 1; step < c.Size; step++)
        {
            var req = c.StartSendRecv(current, next, incoming, prev);
            double busy = 0;
            for (int i = 0; i < current.Length; i++) busy += current[i];
            req.Wait();
            (current, incoming) = (incoming, current);
            int origin = ((c.Rank - step) % c.Size + c.Size) % c.Size;
            for (int i = 0; i < n; i++) Expect(current[i], V(origin, i), $"ring step {step} from {origin}[{i}] (busy {busy})");
        }
    }

    private static void StartSendRecvProgress(ICommunicator c, int n)
    {
        // Rank 0 starts its exchange and goes into a barrier before waiting; rank 1 waits for rank 0's
        // block before the barrier. That completes only if rank 0's started send moves without its Wait
        // (1 MiB: past MPICH's eager limit, so the rendezvous must progress inside the barrier).
        int next = (c.Rank + 1) % c.Size, prev = (c.Rank - 1 + c.Size) % c.Size;
        var send = Enumerable.Range(0, n).Select(i => V(c.Rank, i)).ToArray();
        var recv = new float[n];
        var req = c.StartSendRecv(send, next, recv, prev);
        if (c.Rank == 0)
        {
            c.Barrier();
            req.Wait();
        }
        else
        {
            req.Wait();
            c.Barrier();
        }
        for (int i = 0; i < n; i++) Expect(recv[i], V(prev, i), $"started exchange from {prev}[{i}]");
    }

    private static void StartAllGather(ICommunicator c, int n)
    {
        // Start, compute on other data, then wait, as overlapped schemes will; n = 2^18 floats (1 MiB per
        // rank) is past MPICH's eager limit, so the gather must move in the calls after the start.
        var send = Enumerable.Range(0, n).Select(i => V(c.Rank, i)).ToArray();
        var recv = new float[n * c.Size];
        long seq = c.CollectiveSequence;
        var before = c.Counters[CommOp.AllGather];
        var req = c.StartAllGather(send, recv);
        Expect(c.CollectiveSequence - seq, 1, "StartAllGather numbered when started");
        Expect(c.Counters[CommOp.AllGather].Calls - before.Calls, 1, "StartAllGather counted when started");
        Expect(c.Counters[CommOp.AllGather].BytesReceived - before.BytesReceived, (long)n * c.Size * sizeof(float), "StartAllGather bytes received");
        double busy = 0;
        for (int i = 0; i < send.Length; i++) busy += Math.Sqrt(i);
        req.Wait();
        for (int r = 0; r < c.Size; r++)
            for (int i = 0; i < n; i++) Expect(recv[r * n + i], V(r, i), $"StartAllGather n={n} block {r}[{i}] (busy {busy:F0})");
        bool twice = false;
        try { req.Wait(); }
        catch (InvalidOperationException) { twice = true; }
        Expect(twice ? 1 : 0, 1, "second Wait refused");
    }

    private static void StartAllGatherInterleaved(ICommunicator c, int n)
    {
        // Two gathers in flight at once with a blocking all-reduce and a barrier between start and wait,
        // waited in the reverse order: every rank starts and calls them in the same order, as MPI requires.
        var a = Enumerable.Range(0, n).Select(i => V(c.Rank, i)).ToArray();
        var b = Enumerable.Range(0, n + 1).Select(i => -V(c.Rank, i)).ToArray();
        var ga = new float[n * c.Size];
        var gb = new float[(n + 1) * c.Size];
        var first = c.StartAllGather(a, ga);
        var second = c.StartAllGather(b.AsMemory(), gb.AsMemory());
        var sum = new float[] { c.Rank + 1 };
        c.AllReduceSum(sum, sum);
        Expect(sum[0], c.Size * (c.Size + 1) / 2f, "all-reduce between start and wait");
        c.Barrier();
        second.Wait();
        first.Wait();
        for (int r = 0; r < c.Size; r++)
        {
            for (int i = 0; i < n; i++) Expect(ga[r * n + i], V(r, i), $"first gather block {r}[{i}]");
            for (int i = 0; i <= n; i++) Expect(gb[r * (n + 1) + i], -V(r, i), $"second gather block {r}[{i}]");
        }
        // Sub-arrays through Memory: only the slice is gathered, the rest is untouched.
        var big = new float[n * c.Size + 8];
        Array.Fill(big, float.NaN);
        c.StartAllGather(a.AsMemory(0, n), big.AsMemory(4, n * c.Size)).Wait();
        for (int r = 0; r < c.Size; r++)
            for (int i = 0; i < n; i++) Expect(big[4 + r * n + i], V(r, i), $"sliced gather block {r}[{i}]");
        Expect(float.IsNaN(big[3]) && float.IsNaN(big[4 + n * c.Size]) ? 1 : 0, 1, "sliced gather leaves the rest untouched");
    }

    private static void StartAllReduceSum(ICommunicator c, int n)
    {
        var send = Enumerable.Range(0, n).Select(i => (float)(c.Rank + 1) * (i % 17)).ToArray();
        var recv = new float[n];
        float ranksSum = c.Size * (c.Size + 1) / 2f;
        var req = c.StartAllReduceSum(send, recv);
        req.Wait();
        for (int i = 0; i < n; i++) Expect(recv[i], ranksSum * (i % 17), $"StartAllReduceSum[{i}]");
        // In place.
        c.StartAllReduceSum(send, send).Wait();
        for (int i = 0; i < n; i++) Expect(send[i], ranksSum * (i % 17), $"StartAllReduceSum in place[{i}]");
        Expect(c.Counters[CommOp.AllReduce].Calls >= 2 ? 1 : 0, 1, "StartAllReduceSum counted");
    }

    private static void Split(ICommunicator c)
    {
        int color = c.Rank % 2;
        using var sub = c.Split(color, -c.Rank);
        var members = Enumerable.Range(0, c.Size).Where(r => r % 2 == color).OrderByDescending(r => r).ToList();
        Expect(sub.Size, members.Count, "Split size");
        Expect(sub.Rank, members.IndexOf(c.Rank), "Split rank (ordered by key = -rank)");
        var send = new[] { (float)c.Rank };
        var recv = new float[sub.Size];
        sub.AllGather(send, recv);
        for (int i = 0; i < sub.Size; i++) Expect(recv[i], members[i], $"Split all-gather member {i}");
        var sum = new float[1];
        sub.AllReduceSum(send, sum);
        Expect(sum[0], members.Sum(), "Split all-reduce");

        // Colors and keys beyond float precision (2^24) must stay distinct: every rank its own group.
        using var single = c.Split(100_000_000 + c.Rank, 50_000_000 - c.Rank);
        Expect(single.Size, 1, "Split with large distinct colors: size");
        Expect(single.Rank, 0, "Split with large distinct colors: rank");
        // Keys beyond 2^24 that differ by 1 still order the ranks.
        using var all = c.Split(0, (1 << 30) - c.Rank);
        Expect(all.Size, c.Size, "Split one color: size");
        Expect(all.Rank, c.Size - 1 - c.Rank, "Split one color, large keys = 2^30 - rank: rank");
    }

    private static void CountersAndSequence(ICommunicator c)
    {
        long seq0 = c.CollectiveSequence;
        var before = c.Counters[CommOp.AllGather];
        var send = new float[10];
        var recv = new float[10 * c.Size];
        c.AllGather(send, recv);
        c.AllGather(send, recv);
        var after = c.Counters[CommOp.AllGather];
        Expect(after.Calls - before.Calls, 2, "AllGather calls counted");
        Expect(after.BytesSent - before.BytesSent, 2 * 10 * sizeof(float), "AllGather bytes sent (the send buffer)");
        Expect(after.BytesReceived - before.BytesReceived, 2 * 10 * c.Size * sizeof(float), "AllGather bytes received");
        Expect(c.CollectiveSequence - seq0, 2, "sequence numbers");
        var ar = c.Counters[CommOp.AllReduce];
        var buf = new float[3];
        c.AllReduceSum(buf, buf);
        Expect(c.Counters[CommOp.AllReduce].Calls - ar.Calls, 1, "AllReduce calls counted");
        Expect(c.Counters[CommOp.AllReduce].BytesSent - ar.BytesSent, 12, "AllReduce bytes");
    }
}

/// <summary>A collective returned a wrong element.</summary>
public sealed class ContractViolation(string message) : Exception(message);
