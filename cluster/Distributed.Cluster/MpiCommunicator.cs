using System.Buffers;
using Distributed.Cluster.ControlPlane;
using static Distributed.Cluster.MpichNative;

namespace Distributed.Cluster;

/// <summary>
/// A communicator over an MPICH-ABI library (see <see cref="MpichLibrary"/>). MPI.NET 1.4.0 initialises
/// and finalises MPI and aborts a failing job; the data moves through MPICH's non-blocking collectives
/// (<see cref="MpichNative"/>) straight from and into the caller's pinned spans, without staging copies.
/// MPI is initialised with MPI_THREAD_MULTIPLE, and a started collective is handed to the process's progress
/// thread (<see cref="MpiProgress"/>, unless <c>DSATTN_MPI_PROGRESS=off</c>), so it completes while the rank
/// computes and its Wait sleeps in the kernel. A blocking call waits with a polite poll (<see cref="WaitAll"/>): MPICH's own blocking
/// calls spin on a core for as long as they wait, which takes that core from the ranks that compute
/// when several ranks share a machine's cores. MPI.NET's own data calls must stay unused: its datatype
/// cache commits derived datatypes that it never frees, and MPICH 4 reports them at finalize on every
/// rank as <c>[WARNING] yaksa: 3 leaked handle pool objects</c>.
/// </summary>
public sealed unsafe class MpiCommunicator : ICommunicator
{
    private const int SendRecvTag = 17;
    private static readonly TimeSpan AbortGrace = TimeSpan.FromMilliseconds(500);
    private readonly bool _owned;
    private int _comm;
    private long _sequence;
    private static int s_worldRank;

    private MpiCommunicator(int comm, bool owned)
    {
        _comm = comm;
        _owned = owned;
        Rank = CommRank(comm);
        Size = CommSize(comm);
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
        MpiProgressMode progress;
        try
        {
            progress = MpiProgress.Requested();
        }
        catch (InvalidOperationException e)
        {
            Console.Error.WriteLine($"rank {launch.Rank} failed: {e.Message}");
            return 1;
        }
        string[] args = [];
        int code;
        // MPI_THREAD_MULTIPLE: the progress thread tests started requests while the rank's own thread
        // starts others and runs blocking collectives (and MPICH's own asynchronous progress needs it too).
        using (new MPI.Environment(ref args, MPI.Threading.Multiple))
        {
            if (progress == MpiProgressMode.Thread && MPI.Environment.Threading != MPI.Threading.Multiple)
            {
                Console.Error.WriteLine($"warning: this MPI library gives thread level {MPI.Environment.Threading}, not Multiple: started collectives advance only inside MPI calls (no progress thread).");
                progress = MpiProgressMode.Off;
            }
            MpiProgress.Configure(progress);
            var world = new MpiCommunicator(CommWorld, owned: false);
            s_worldRank = world.Rank;
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
                MPI.Communicator.world.Abort(1);
                return 1;
            }
        }
        return code;
    }

    /// <summary>Ends the whole MPI job now (MPI_Abort on the world communicator) with exit code
    /// <paramref name="code"/>, after giving mpiexec's proxy a moment to forward what was printed. Safe to
    /// call from any thread inside <see cref="RunWorld"/>; when the abort does not end this process within
    /// 5 s it kills itself, which makes mpiexec end the other ranks.</summary>
    /// <param name="code">The job's exit code (non-zero).</param>
    public static void AbortJob(int code)
    {
        Console.Out.Flush();
        Console.Error.Flush();
        Thread.Sleep(AbortGrace);
        var killer = new Thread(() => { Thread.Sleep(5000); System.Diagnostics.Process.GetCurrentProcess().Kill(); }) { IsBackground = true };
        killer.Start();
        MPI.Communicator.world.Abort(code);
    }

    /// <inheritdoc/>
    public void AllGather(ReadOnlySpan<float> send, Span<float> receive)
    {
        CheckAllGather(send.Length, receive.Length);
        Enter(CommOp.AllGather, send.Length, receive.Length);
        float[]? copy = Unalias(ref send, receive);
        bool present = AwaitPeers(receive.Length);
        int request;
        fixed (float* s = send)
        fixed (float* r = receive)
        {
            Iallgather(s, send.Length, r, send.Length, _comm, &request);
            WaitAll(1, &request, StatusIgnore, present);
        }
        GC.KeepAlive(copy);
        CollectiveProbe.Leave();
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
        float[]? copy = Unalias(ref send, receive);
        // MPI reads counts and displacements until the collective completes: they live on this frame.
        Span<int> table = Size <= 512 ? stackalloc int[2 * Size] : new int[2 * Size];
        Span<int> displacements = table[Size..];
        counts.CopyTo(table);
        for (int r = 1; r < Size; r++) displacements[r] = displacements[r - 1] + counts[r - 1];
        bool present = AwaitPeers(receive.Length);
        int request;
        fixed (float* s = send)
        fixed (float* r = receive)
        fixed (int* c = table)
        {
            Iallgatherv(s, send.Length, r, c, c + Size, _comm, &request);
            WaitAll(1, &request, StatusIgnore, present);
        }
        GC.KeepAlive(copy);
        CollectiveProbe.Leave();
    }

    /// <inheritdoc/>
    public void AllReduceSum(ReadOnlySpan<float> send, Span<float> receive)
    {
        if (receive.Length != send.Length)
            throw new ArgumentException($"AllReduceSum: receive must have send's length {send.Length}, got {receive.Length}.", nameof(receive));
        Enter(CommOp.AllReduce, send.Length, receive.Length);
        bool inPlace = send.Overlaps(receive, out int offset) && offset == 0;
        float[]? copy = inPlace ? null : Unalias(ref send, receive);
        bool present = AwaitPeers(receive.Length);
        int request;
        fixed (float* s = send)
        fixed (float* r = receive)
        {
            IallreduceSum(inPlace ? InPlace : s, r, receive.Length, _comm, &request);
            WaitAll(1, &request, StatusIgnore, present);
        }
        GC.KeepAlive(copy);
        CollectiveProbe.Leave();
    }

    /// <inheritdoc/>
    public void ReduceScatterSum(ReadOnlySpan<float> send, Span<float> receive)
    {
        if (send.Length != (long)receive.Length * Size)
            throw new ArgumentException($"ReduceScatterSum: send must hold Size × receive.Length = {(long)receive.Length * Size} floats, got {send.Length}.", nameof(send));
        Enter(CommOp.ReduceScatter, send.Length, receive.Length);
        float[]? copy = Unalias(ref send, receive);
        bool present = AwaitPeers(send.Length);
        int request;
        fixed (float* s = send)
        fixed (float* r = receive)
        {
            IreduceScatterBlockSum(s, r, receive.Length, _comm, &request);
            WaitAll(1, &request, StatusIgnore, present);
        }
        GC.KeepAlive(copy);
        CollectiveProbe.Leave();
    }

    /// <inheritdoc/>
    public void AllToAll(ReadOnlySpan<float> send, Span<float> receive)
    {
        if (send.Length % Size != 0)
            throw new ArgumentException($"AllToAll: send length {send.Length} is not a multiple of Size {Size}.", nameof(send));
        if (receive.Length != send.Length)
            throw new ArgumentException($"AllToAll: receive must have send's length {send.Length}, got {receive.Length}.", nameof(receive));
        Enter(CommOp.AllToAll, send.Length, receive.Length);
        float[]? copy = Unalias(ref send, receive);
        int block = send.Length / Size;
        bool present = AwaitPeers(receive.Length);
        int request;
        fixed (float* s = send)
        fixed (float* r = receive)
        {
            Ialltoall(s, block, r, block, _comm, &request);
            WaitAll(1, &request, StatusIgnore, present);
        }
        GC.KeepAlive(copy);
        CollectiveProbe.Leave();
    }

    /// <inheritdoc/>
    public void SendRecv(ReadOnlySpan<float> send, int destination, Span<float> receive, int source)
    {
        CheckPeer(destination, nameof(destination));
        CheckPeer(source, nameof(source));
        Enter(CommOp.SendRecv, send.Length, receive.Length);
        float[]? copy = Unalias(ref send, receive);
        int* requests = stackalloc int[2];
        MpiStatus* statuses = stackalloc MpiStatus[2];
        fixed (float* s = send)
        fixed (float* r = receive)
        {
            // Receive first, so a matching send from the peer never waits for a posted buffer.
            Irecv(r, receive.Length, source, SendRecvTag, _comm, &requests[0]);
            Isend(s, send.Length, destination, SendRecvTag, _comm, &requests[1]);
            WaitExchange(requests, statuses, source, receive.Length);
        }
        GC.KeepAlive(copy);
        CollectiveProbe.Leave();
    }

    /// <inheritdoc/>
    public CommRequest StartSendRecv(ReadOnlyMemory<float> send, int destination, Memory<float> receive, int source)
    {
        CheckPeer(destination, nameof(destination));
        CheckPeer(source, nameof(source));
        CheckDisjoint(send.Span, receive.Span, nameof(StartSendRecv));
        Enter(CommOp.SendRecv, send.Length, receive.Length);
        var request = new MpiRequest(this, send.Pin(), receive.Pin(), 2, source, receive.Length);
        fixed (int* h = request.Handles)
        {
            Irecv(request.ReceivePointer, receive.Length, source, SendRecvTag, _comm, &h[0]);
            Isend(request.SendPointer, send.Length, destination, SendRecvTag, _comm, &h[1]);
        }
        return request.Started();
    }

    /// <inheritdoc/>
    public CommRequest StartAllGather(ReadOnlyMemory<float> send, Memory<float> receive)
    {
        CheckAllGather(send.Length, receive.Length);
        CheckDisjoint(send.Span, receive.Span, nameof(StartAllGather));
        Enter(CommOp.AllGather, send.Length, receive.Length);
        var request = new MpiRequest(this, send.Pin(), receive.Pin(), 1, -1, 0);
        fixed (int* h = request.Handles) Iallgather(request.SendPointer, send.Length, request.ReceivePointer, send.Length, _comm, h);
        return request.Started();
    }

    /// <inheritdoc/>
    public CommRequest StartAllReduceSum(ReadOnlyMemory<float> send, Memory<float> receive)
    {
        if (receive.Length != send.Length)
            throw new ArgumentException($"AllReduceSum: receive must have send's length {send.Length}, got {receive.Length}.", nameof(receive));
        bool inPlace = send.Span.Overlaps(receive.Span, out int offset) && offset == 0;
        if (!inPlace) CheckDisjoint(send.Span, receive.Span, nameof(StartAllReduceSum));
        Enter(CommOp.AllReduce, send.Length, receive.Length);
        var request = new MpiRequest(this, inPlace ? default : send.Pin(), receive.Pin(), 1, -1, 0);
        fixed (int* h = request.Handles) IallreduceSum(inPlace ? InPlace : request.SendPointer, request.ReceivePointer, receive.Length, _comm, h);
        return request.Started();
    }

    /// <inheritdoc/>
    public void Barrier()
    {
        Enter(CommOp.Barrier, 0, 0);
        int request;
        Ibarrier(_comm, &request);
        WaitAll(1, &request, StatusIgnore);
        CollectiveProbe.Leave();
    }

    /// <inheritdoc/>
    public ICommunicator Split(int color, int key)
    {
        if (color < 0) throw new ArgumentOutOfRangeException(nameof(color), color, "Split: color must be ≥ 0 (MPI reserves negative colors).");
        Enter(CommOp.Split, 2, 0);
        // MPI_Comm_split is blocking; it runs once per group, at set-up, so its spin does not matter.
        // The new communicator inherits MPI.NET's MPI_ERRORS_RETURN handler from world, so MPI errors
        // come back as codes (and exceptions) rather than aborting.
        var split = new MpiCommunicator(CommSplit(_comm, color, key), owned: true);
        CollectiveProbe.Leave();
        return split;
    }

    /// <summary>Frees a communicator made by <see cref="Split"/> (world is MPI's own). Call it before
    /// MPI is finalised, i.e. inside <see cref="RunWorld"/>'s body.</summary>
    public void Dispose()
    {
        if (_owned && _comm != CommNull && !MPI.Environment.Finalized) CommFree(ref _comm);
    }

    // Polite waiting. MPI_Testall drives MPICH's progress engine once and returns; between tests the
    // thread backs off in three steps so that a rank that waits long gives its core to the ranks that
    // compute (4 ranks on 2 cores: a spinning waiter takes half a core from a computing neighbour):
    //   1. SpinTests tests with a short pause between them (about 10-30 µs): a collective whose peers
    //      are all there completes here at full speed, as with MPICH's own busy wait;
    //   2. YieldTests tests, each after Thread.Yield: a runnable neighbour gets the core at once;
    //   3. then nanosleep, starting at FirstNapNs and doubling up to MaxNapNs, testing after each nap.
    // The cap bounds the extra latency once the last peer arrives (one nap). Measured with 4 ranks on
    // 2 cores (8K causal softmax all-gather job, best of 3 interleaved rounds on a loaded machine): caps
    // of 0.2, 1 and 5 ms were within noise of each other (9.7, 9.6, 8.2 s) and faster than spinning
    // (10.8 s); a rank waiting 2 s for a computing peer uses about 25 ms of CPU instead of 1-1.4 s.
    //
    // Large transfers need every rank's progress calls while the data moves (MPICH's shared-memory
    // transport copies through bounded cells), and napping then slows them down: a 256 MB all-gather
    // took 0.55-0.63 s with naps against 0.21-0.25 s spinning. So a large blocking collective first
    // waits politely in a barrier, where ranks wait for peers still computing, and then moves its data
    // with the peers known to be present, yielding instead of napping (PresentYieldTests) before any
    // nap: 0.16-0.20 s.
    // Started collectives cannot do that (their peers are computing by design): the progress thread tests
    // them with back-off (MpiProgress), or, with DSATTN_MPI_PROGRESS=off, their Wait polls politely.
    private const int SpinTests = 64;
    private const int SpinPause = 20;
    private const int YieldTests = 16;
    private const int PresentYieldTests = 1 << 16;
    private const long FirstNapNs = 20_000;
    private const long MaxNapNs = 1_000_000;
    private const long GatherBytes = 256 * 1024;

    /// <summary>Before a blocking collective that moves <paramref name="floats"/> floats (the same count on
    /// every rank): when it is large, wait politely in a barrier until every rank is there.</summary>
    /// <returns>True when the peers are known to be present.</returns>
    private bool AwaitPeers(long floats)
    {
        if (Size == 1 || floats * sizeof(float) < GatherBytes) return false;
        int request;
        Ibarrier(_comm, &request);
        WaitAll(1, &request, StatusIgnore);
        return true;
    }

    /// <summary>Waits for <paramref name="count"/> requests without holding the core (see above).</summary>
    internal static void WaitAll(int count, int* requests, MpiStatus* statuses, bool peersPresent = false)
    {
        for (int i = 0; i < SpinTests; i++)
        {
            if (TestAll(count, requests, statuses)) return;
            Thread.SpinWait(SpinPause);
        }
        int yields = peersPresent ? PresentYieldTests : YieldTests;
        for (int i = 0; i < yields; i++)
        {
            if (TestAll(count, requests, statuses)) return;
            Thread.Yield();
        }
        long nap = FirstNapNs;
        while (!TestAll(count, requests, statuses))
        {
            Nap(nap);
            nap = Math.Min(2 * nap, MaxNapNs);
        }
    }

    /// <summary>Waits for a receive (request 0) and a send (request 1) and checks the received size.</summary>
    private void WaitExchange(int* requests, MpiStatus* statuses, int source, int expected)
    {
        try
        {
            WaitAll(2, requests, statuses);
        }
        catch (InvalidOperationException e)
        {
            throw ExchangeFailed(source, expected, e);
        }
        CheckReceived(statuses, source, expected);
    }

    private InvalidOperationException ExchangeFailed(int source, int expected, Exception e) =>
        new($"SendRecv: the exchange with rank {source} failed on rank {Rank} (receive buffer: {expected} floats): {e.Message}", e);

    private void CheckReceived(MpiStatus* statuses, int source, int expected)
    {
        int got = ReceivedFloats(&statuses[0]);
        if (got != expected)
            throw new InvalidOperationException($"SendRecv: rank {source} sent {got} floats but rank {Rank} expects {expected}.");
    }

    private void CheckAllGather(int sendLength, int receiveLength) => CollectiveArguments.CheckAllGather(sendLength, receiveLength, Size);

    private static void CheckDisjoint(ReadOnlySpan<float> send, ReadOnlySpan<float> receive, string op) => CollectiveArguments.CheckDisjoint(send, receive, op);

    /// <summary>MPI forbids a send buffer that overlaps the receive buffer: copy such a send (rare).</summary>
    private static float[]? Unalias(ref ReadOnlySpan<float> send, ReadOnlySpan<float> receive)
    {
        if (send.Length == 0 || receive.Length == 0 || !send.Overlaps(receive)) return null;
        var copy = send.ToArray();
        send = copy;
        return copy;
    }

    private void Enter(CommOp op, long sendLength, long receiveLength)
    {
        CollectiveProbe.Enter(s_worldRank, op, (sendLength + receiveLength) * sizeof(float));
        _sequence++;
        Counters.Record(op, sendLength * sizeof(float), receiveLength * sizeof(float));
    }

    private void CheckPeer(int peer, string name)
    {
        if (peer < 0 || peer >= Size) throw new ArgumentOutOfRangeException(name, peer, $"Peer rank must be in [0, {Size}).");
    }

    /// <summary>Started MPI requests; the buffers stay pinned until <see cref="Wait"/> returns.</summary>
    private sealed class MpiRequest : CommRequest
    {
        private readonly MpiCommunicator _owner;
        private readonly int _source;
        private readonly int _expected;
        private MemoryHandle _send;
        private MemoryHandle _receive;
        private MpiProgress.Entry? _tracked;
        private bool _waited;

        public MpiRequest(MpiCommunicator owner, MemoryHandle send, MemoryHandle receive, int count, int source, int expected)
        {
            _owner = owner;
            _send = send;
            _receive = receive;
            _source = source;
            _expected = expected;
            Handles = new int[count];
            Array.Fill(Handles, RequestNull);
        }

        /// <summary>The MPI_Request handles (a receive first, when there is one).</summary>
        public int[] Handles { get; }

        public void* SendPointer => _send.Pointer;

        public void* ReceivePointer => _receive.Pointer;

        /// <summary>Called once the requests are started: under <see cref="MpiProgressMode.Thread"/> the
        /// progress thread takes them over, so they advance while this rank computes.</summary>
        public MpiRequest Started()
        {
            if (MpiProgress.Mode == MpiProgressMode.Thread) _tracked = MpiProgress.Track(Handles);
            return this;
        }

        public override void Wait()
        {
            if (_waited) throw new InvalidOperationException("Wait was already called on this request.");
            _waited = true;
            try
            {
                if (_tracked is { } tracked)
                {
                    // The progress thread tests the requests; this thread sleeps in the kernel until it is done.
                    tracked.Done.Wait();
                    tracked.Done.Dispose();
                    if (tracked.Error is { } error)
                        throw _source >= 0 ? _owner.ExchangeFailed(_source, _expected, error) : error;
                    if (_source >= 0)
                        fixed (MpiStatus* s = tracked.Statuses) _owner.CheckReceived(s, _source, _expected);
                    return;
                }
                MpiStatus* statuses = stackalloc MpiStatus[Handles.Length];
                fixed (int* h = Handles)
                {
                    if (_source >= 0) _owner.WaitExchange(h, statuses, _source, _expected);
                    else WaitAll(Handles.Length, h, StatusIgnore);
                }
            }
            finally
            {
                _send.Dispose();
                _receive.Dispose();
                CollectiveProbe.Leave();
            }
        }
    }
}
