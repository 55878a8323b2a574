using MPI;

namespace Distributed.Cluster;

/// <summary>
/// A communicator over MPI.NET 1.4.0 on an MPICH-ABI library (see <see cref="MpichLibrary"/>). MPI.NET
/// moves arrays, not spans, so every call stages through reusable arrays of the exact length (the
/// steady state allocates nothing). Only MPI.NET's overloads over arrays of primitives are used: its
/// generic single-object overloads serialise with BinaryFormatter, which .NET 10 removed.
/// </summary>
public sealed class MpiCommunicator : ICommunicator
{
    private const int SendRecvTag = 17;
    private static readonly TimeSpan AbortGrace = TimeSpan.FromMilliseconds(500);
    private readonly Intracommunicator _comm;
    private readonly Dictionary<(int Slot, int Length), float[]> _staging = [];
    private readonly Dictionary<int, Stack<float[]>> _pool = [];
    private long _sequence;
    private int[]? _counts;
    private int[]? _equalCounts;

    private MpiCommunicator(Intracommunicator comm)
    {
        _comm = comm;
        Rank = comm.Rank;
        Size = comm.Size;
    }

    /// <inheritdoc/>
    public int Rank { get; }

    /// <inheritdoc/>
    public int Size { get; }

    /// <inheritdoc/>
    public CommunicatorCounters Counters { get; } = new();

    /// <inheritdoc/>
    public long CollectiveSequence => _sequence;

    /// <summary>
    /// Initialises MPI (after routing MPI.NET to MPICH), runs <paramref name="body"/> on the world
    /// communicator and finalises. An exception on any rank prints <c>rank R failed: ...</c> to stderr and
    /// aborts the whole job (MPI_Abort), so mpiexec exits non-zero at once instead of hanging.
    /// </summary>
    /// <returns>The body's exit code.</returns>
    public static int RunWorld(Func<ICommunicator, int> body)
    {
        ArgumentNullException.ThrowIfNull(body);
        // Refuse before touching MPI: under the wrong launcher or without MPICH, MPI_Init would crash
        // natively or start P unconnected singletons, neither of which names the fix.
        var launch = LaunchEnvironment.Detect();
        if (launch.Kind == LaunchKind.OpenMpi)
        {
            Console.Error.WriteLine($"rank {launch.Rank} failed: Open MPI's mpiexec started this process, but MPI.NET here speaks the MPICH ABI. Launch with MPICH's mpiexec (mpiexec.mpich; apt-get install mpich) or use dsattn launch.");
            return 1;
        }
        try
        {
            MpichLibrary.Install();
        }
        catch (InvalidOperationException e)
        {
            Console.Error.WriteLine($"rank {launch.Rank} failed: {e.Message}");
            return 1;
        }
        string[] args = [];
        int code;
        using (new MPI.Environment(ref args))
        {
            var world = new MpiCommunicator(Communicator.world);
            try
            {
                code = body(world);
            }
            catch (Exception e)
            {
                Console.Out.Flush();
                Console.Error.WriteLine($"rank {world.Rank} failed: {e.GetType().Name}: {e.Message}");
                if (System.Environment.GetEnvironmentVariable("DSATTN_TRACE") == "1") Console.Error.WriteLine(e);
                Console.Error.Flush();
                // Hydra drops stdio still in its proxy's pipe once the abort tears the job down (seen as
                // an empty stderr under load), so give the proxy a moment to forward the line above.
                Thread.Sleep(AbortGrace);
                Communicator.world.Abort(1);
                return 1;
            }
        }
        return code;
    }

    /// <inheritdoc/>
    public void AllGather(ReadOnlySpan<float> send, Span<float> receive)
    {
        if (receive.Length != (long)send.Length * Size)
            throw new ArgumentException($"AllGather: receive must hold Size × send.Length = {(long)send.Length * Size} floats, got {receive.Length}.", nameof(receive));
        Enter(CommOp.AllGather, send.Length, receive.Length);
        var s = Stage(0, send);
        var r = Buffer(1, receive.Length);
        _comm.AllgatherFlattened(s, send.Length, ref r);
        r.AsSpan(0, receive.Length).CopyTo(receive);
    }

    /// <inheritdoc/>
    public void AllGatherVariable(ReadOnlySpan<float> send, Span<float> receive, ReadOnlySpan<int> counts)
    {
        if (counts.Length != Size) throw new ArgumentException($"AllGatherVariable: counts needs one entry per rank ({Size}), got {counts.Length}.", nameof(counts));
        long total = 0;
        foreach (int c in counts)
        {
            if (c < 0) throw new ArgumentException("AllGatherVariable: counts must be non-negative.", nameof(counts));
            total += c;
        }
        if (counts[Rank] != send.Length) throw new ArgumentException($"AllGatherVariable: counts[{Rank}] = {counts[Rank]} but this rank sends {send.Length} floats.", nameof(send));
        if (receive.Length != total) throw new ArgumentException($"AllGatherVariable: receive must hold Σ counts = {total} floats, got {receive.Length}.", nameof(receive));
        Enter(CommOp.AllGather, send.Length, receive.Length);
        var s = Stage(0, send);
        var r = Buffer(1, receive.Length);
        _comm.AllgatherFlattened(s, Counts(counts), ref r);
        r.AsSpan(0, receive.Length).CopyTo(receive);
    }

    /// <inheritdoc/>
    public void AllReduceSum(ReadOnlySpan<float> send, Span<float> receive)
    {
        if (receive.Length != send.Length)
            throw new ArgumentException($"AllReduceSum: receive must have send's length {send.Length}, got {receive.Length}.", nameof(receive));
        Enter(CommOp.AllReduce, send.Length, receive.Length);
        var s = Stage(0, send);
        var r = Buffer(1, receive.Length);
        _comm.Allreduce(s, Operation<float>.Add, ref r);
        r.AsSpan(0, receive.Length).CopyTo(receive);
    }

    /// <inheritdoc/>
    public void ReduceScatterSum(ReadOnlySpan<float> send, Span<float> receive)
    {
        if (send.Length != (long)receive.Length * Size)
            throw new ArgumentException($"ReduceScatterSum: send must hold Size × receive.Length = {(long)receive.Length * Size} floats, got {send.Length}.", nameof(send));
        Enter(CommOp.ReduceScatter, send.Length, receive.Length);
        var s = Stage(0, send);
        var r = Buffer(1, receive.Length);
        _comm.ReduceScatter(s, Operation<float>.Add, EqualCounts(receive.Length), ref r);
        r.AsSpan(0, receive.Length).CopyTo(receive);
    }

    /// <inheritdoc/>
    public void AllToAll(ReadOnlySpan<float> send, Span<float> receive)
    {
        if (send.Length % Size != 0)
            throw new ArgumentException($"AllToAll: send length {send.Length} is not a multiple of Size {Size}.", nameof(send));
        if (receive.Length != send.Length)
            throw new ArgumentException($"AllToAll: receive must have send's length {send.Length}, got {receive.Length}.", nameof(receive));
        Enter(CommOp.AllToAll, send.Length, receive.Length);
        var s = Stage(0, send);
        var r = Buffer(1, receive.Length);
        _comm.AlltoallFlattened(s, send.Length / Size, ref r);
        r.AsSpan(0, receive.Length).CopyTo(receive);
    }

    /// <inheritdoc/>
    public void SendRecv(ReadOnlySpan<float> send, int destination, Span<float> receive, int source)
    {
        CheckPeer(destination, nameof(destination));
        CheckPeer(source, nameof(source));
        Enter(CommOp.SendRecv, send.Length, receive.Length);
        var s = Stage(0, send);
        var r = Buffer(1, receive.Length);
        _comm.SendReceive(s, destination, SendRecvTag, source, SendRecvTag, ref r);
        if (r.Length != receive.Length)
            throw new InvalidOperationException($"SendRecv: rank {source} sent {r.Length} floats but rank {Rank} expects {receive.Length}.");
        r.AsSpan().CopyTo(receive);
    }

    /// <inheritdoc/>
    public CommRequest StartSendRecv(ReadOnlyMemory<float> send, int destination, Memory<float> receive, int source)
    {
        CheckPeer(destination, nameof(destination));
        CheckPeer(source, nameof(source));
        Enter(CommOp.SendRecv, send.Length, receive.Length);
        var s = Rent(send.Length);
        send.Span.CopyTo(s);
        var r = Rent(receive.Length);
        // Receive first, so a matching send from the peer never waits for a posted buffer.
        var recvRequest = _comm.ImmediateReceive(source, SendRecvTag, r);
        var sendRequest = _comm.ImmediateSend(s, destination, SendRecvTag);
        return new MpiRequest(this, sendRequest, recvRequest, s, r, receive);
    }

    /// <inheritdoc/>
    public void Barrier()
    {
        Enter(CommOp.Barrier, 0, 0);
        _comm.Barrier();
    }

    /// <inheritdoc/>
    public ICommunicator Split(int color, int key)
    {
        if (color < 0) throw new ArgumentOutOfRangeException(nameof(color), color, "Split: color must be ≥ 0 (MPI reserves negative colors).");
        Enter(CommOp.Split, 2, 0);
        var sub = _comm.Split(color, key) as Intracommunicator
            ?? throw new InvalidOperationException("MPI Split did not return an intracommunicator.");
        return new MpiCommunicator(sub);
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        if (!ReferenceEquals(_comm, Communicator.world)) _comm.Dispose();
    }

    private void Enter(CommOp op, long sendLength, long receiveLength)
    {
        _sequence++;
        Counters.Record(op, sendLength * sizeof(float), receiveLength * sizeof(float));
    }

    private void CheckPeer(int peer, string name)
    {
        if (peer < 0 || peer >= Size) throw new ArgumentOutOfRangeException(name, peer, $"Peer rank must be in [0, {Size}).");
    }

    /// <summary>An exact-length array for staging slot <paramref name="slot"/>, reused while the length repeats.</summary>
    private float[] Buffer(int slot, int length)
    {
        if (!_staging.TryGetValue((slot, length), out var a))
        {
            // Keep one array per (slot, length); schemes repeat the same sizes every step.
            if (_staging.Count > 64) _staging.Clear();
            _staging[(slot, length)] = a = new float[length];
        }
        return a;
    }

    private float[] Stage(int slot, ReadOnlySpan<float> data)
    {
        var a = Buffer(slot, data.Length);
        data.CopyTo(a);
        return a;
    }

    /// <summary>The counts as an array MPI.NET accepts, reused while they repeat (schemes gather the same shards every step).</summary>
    private int[] Counts(ReadOnlySpan<int> counts)
    {
        if (_counts is null || !counts.SequenceEqual(_counts)) _counts = counts.ToArray();
        return _counts;
    }

    private int[] EqualCounts(int count)
    {
        if (_equalCounts is null || _equalCounts[0] != count)
        {
            _equalCounts = new int[Size];
            Array.Fill(_equalCounts, count);
        }
        return _equalCounts;
    }

    private float[] Rent(int length)
    {
        if (_pool.TryGetValue(length, out var stack) && stack.Count > 0) return stack.Pop();
        return new float[length];
    }

    private void Return(float[] a)
    {
        if (!_pool.TryGetValue(a.Length, out var stack)) _pool[a.Length] = stack = new Stack<float[]>();
        if (stack.Count < 8) stack.Push(a);
    }

    private sealed class MpiRequest(MpiCommunicator owner, Request send, ReceiveRequest receive, float[] sendBuffer, float[] receiveBuffer, Memory<float> destination) : CommRequest
    {
        private bool _waited;

        public override void Wait()
        {
            if (_waited) throw new InvalidOperationException("Wait was already called on this request.");
            _waited = true;
            receive.Wait();
            send.Wait();
            receiveBuffer.AsSpan(0, destination.Length).CopyTo(destination.Span);
            owner.Return(sendBuffer);
            owner.Return(receiveBuffer);
        }
    }
}
