namespace Distributed.Cluster;

/// <summary>
/// P ranks as threads of one process: the embedded default of <c>dsattn run</c> and of the tests.
/// Data is copied as a network would copy it: every contribution is copied into a private message when
/// sent and copied again into the receiver's buffer; no rank ever reads another rank's memory.
/// When one rank fails, every rank waiting in (or later entering) a collective of the job is released
/// at once with <see cref="CommunicatorAbortedException"/>, so no rank waits forever. A rank that returns
/// while others wait for it (one collective call fewer, or a message never sent) fails the waiters at once
/// with an <see cref="InvalidOperationException"/> naming it, instead of the hang MPI would give.
/// </summary>
public sealed class InProcessCommunicator : ICommunicator
{
    private readonly InProcessGroup _group;
    private long _sequence;
    private int _splits;

    private InProcessCommunicator(InProcessGroup group, int rank)
    {
        _group = group;
        Rank = rank;
    }

    /// <inheritdoc/>
    public int Rank { get; }

    /// <inheritdoc/>
    public int Size => _group.Size;

    /// <inheritdoc/>
    public CommunicatorCounters Counters { get; } = new();

    /// <inheritdoc/>
    public long CollectiveSequence => Interlocked.Read(ref _sequence);

    /// <summary>The operation this rank is in now (null when none), for hang reports.</summary>
    public string? CurrentOperation { get; private set; }

    /// <summary>
    /// Runs <paramref name="body"/> on <paramref name="size"/> ranks, each on its own thread, and returns
    /// their results in rank order.
    /// </summary>
    /// <param name="size">Number of ranks, at least 1.</param>
    /// <param name="body">The rank's work; it gets its communicator (disposed afterwards).</param>
    /// <param name="timeout">Fail the job when it has not finished by then; null means no limit.</param>
    /// <exception cref="RankFailedException">A rank threw (the lowest failing rank is reported, with its
    /// exception inside), or the timeout elapsed (naming the ranks still running and where they are).</exception>
    public static T[] Run<T>(int size, Func<ICommunicator, T> body, TimeSpan? timeout = null)
    {
        if (size < 1) throw new ArgumentOutOfRangeException(nameof(size), size, "The number of ranks must be at least 1.");
        ArgumentNullException.ThrowIfNull(body);
        var job = new InProcessJob { Entered = new long[size] };
        var world = new InProcessGroup(job, [.. Enumerable.Range(0, size)]);
        var comms = new InProcessCommunicator[size];
        for (int r = 0; r < size; r++) comms[r] = new InProcessCommunicator(world, r);
        var results = new T[size];
        var errors = new Exception?[size];
        var threads = new Thread[size];
        for (int r = 0; r < size; r++)
        {
            int rank = r;
            threads[r] = new Thread(() =>
            {
                try
                {
                    results[rank] = body(comms[rank]);
                }
                catch (Exception e)
                {
                    errors[rank] = e;
                    job.Fail(rank, e);
                }
                finally
                {
                    comms[rank].Dispose();
                    job.Finished(rank);
                }
            })
            { IsBackground = true, Name = $"rank {rank}" };
            threads[r].Start();
        }

        var deadline = timeout is { } t ? DateTime.UtcNow + t : DateTime.MaxValue;
        foreach (var th in threads)
        {
            var left = deadline - DateTime.UtcNow;
            if (deadline == DateTime.MaxValue) th.Join();
            else if (left <= TimeSpan.Zero || !th.Join(left))
            {
                // Read who is still running before the abort releases them.
                var stuck = Enumerable.Range(0, size).Where(r => threads[r].IsAlive).ToList();
                var running = stuck.Select(r => $"rank {r} in {comms[r].CurrentOperation ?? "computation"} (collective #{comms[r].CollectiveSequence})");
                var timeoutError = new TimeoutException($"the job did not finish within {timeout!.Value.TotalSeconds:F0} s; still running: {string.Join(", ", running)}");
                job.Fail(-1, timeoutError);
                throw new RankFailedException(stuck.Count > 0 ? stuck[0] : 0, timeoutError);
            }
        }

        // Report the rank that failed first on its own account; ranks released by the abort only echo it.
        int? original = job.FailedRank >= 0 ? job.FailedRank : null;
        if (original is int fr && errors[fr] is { } err) throw new RankFailedException(fr, err);
        for (int r = 0; r < size; r++)
            if (errors[r] is { } e) throw new RankFailedException(r, e);
        return results;
    }

    /// <inheritdoc/>
    public void AllGather(ReadOnlySpan<float> send, Span<float> receive)
    {
        CheckAllGather(send.Length, receive.Length);
        using var round = Exchange(nameof(AllGather), CommOp.AllGather, send, receive.Length);
        var all = round.Slots;
        Gathered(all, receive, send.Length);
    }

    /// <inheritdoc/>
    public CommRequest StartAllGather(ReadOnlyMemory<float> send, Memory<float> receive)
    {
        CheckAllGather(send.Length, receive.Length);
        CheckDisjoint(send.Span, receive.Span, nameof(StartAllGather));
        int n = send.Length;
        return Start(nameof(StartAllGather), CommOp.AllGather, send.Span, receive.Length, all => Gathered(all, receive.Span, n));
    }

    /// <inheritdoc/>
    public CommRequest StartAllReduceSum(ReadOnlyMemory<float> send, Memory<float> receive)
    {
        if (receive.Length != send.Length)
            throw new ArgumentException($"AllReduceSum: receive must have send's length {send.Length}, got {receive.Length}.", nameof(receive));
        // The contribution is copied when started, so in place is safe here; other overlaps are refused
        // as MPI refuses them, so a program that runs in-process also runs under mpiexec.
        if (!(send.Span.Overlaps(receive.Span, out int offset) && offset == 0)) CheckDisjoint(send.Span, receive.Span, nameof(StartAllReduceSum));
        int n = send.Length;
        return Start(nameof(StartAllReduceSum), CommOp.AllReduce, send.Span, receive.Length, all => Summed(all, receive.Span, n));
    }

    private void CheckAllGather(int sendLength, int receiveLength) => CollectiveArguments.CheckAllGather(sendLength, receiveLength, Size);

    private static void CheckDisjoint(ReadOnlySpan<float> send, ReadOnlySpan<float> receive, string op) => CollectiveArguments.CheckDisjoint(send, receive, op);

    private void Gathered(float[][] all, Span<float> receive, int n)
    {
        for (int r = 0; r < Size; r++)
        {
            if (all[r].Length != n)
                throw new InvalidOperationException($"AllGather: rank {r} sent {all[r].Length} floats but rank {Rank} sent {n}; every rank must send the same count (use AllGatherVariable).");
            all[r].CopyTo(receive.Slice(r * n, n));
        }
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
        using var round = Exchange(nameof(AllGatherVariable), CommOp.AllGather, send, receive.Length);
        var all = round.Slots;
        int offset = 0;
        for (int r = 0; r < Size; r++)
        {
            if (all[r].Length != counts[r])
                throw new InvalidOperationException($"AllGatherVariable: rank {r} sent {all[r].Length} floats but counts[{r}] = {counts[r]}.");
            all[r].CopyTo(receive.Slice(offset, counts[r]));
            offset += counts[r];
        }
    }

    /// <inheritdoc/>
    public void AllReduceSum(ReadOnlySpan<float> send, Span<float> receive)
    {
        if (receive.Length != send.Length)
            throw new ArgumentException($"AllReduceSum: receive must have send's length {send.Length}, got {receive.Length}.", nameof(receive));
        using var round = Exchange(nameof(AllReduceSum), CommOp.AllReduce, send, receive.Length);
        var all = round.Slots;
        Summed(all, receive, send.Length);
    }

    private void Summed(float[][] all, Span<float> receive, int n)
    {
        CheckEqualLengths(all, n, nameof(AllReduceSum));
        // Summed in rank order on every rank, so all ranks get bit-identical results.
        all[0].CopyTo(receive);
        for (int r = 1; r < Size; r++) Add(all[r], receive);
    }

    /// <inheritdoc/>
    public void ReduceScatterSum(ReadOnlySpan<float> send, Span<float> receive)
    {
        if (send.Length != (long)receive.Length * Size)
            throw new ArgumentException($"ReduceScatterSum: send must hold Size × receive.Length = {(long)receive.Length * Size} floats, got {send.Length}.", nameof(send));
        using var round = Exchange(nameof(ReduceScatterSum), CommOp.ReduceScatter, send, receive.Length);
        var all = round.Slots;
        CheckEqualLengths(all, send.Length, nameof(ReduceScatterSum));
        int n = receive.Length;
        all[0].AsSpan(Rank * n, n).CopyTo(receive);
        for (int r = 1; r < Size; r++) Add(all[r].AsSpan(Rank * n, n), receive);
    }

    /// <inheritdoc/>
    public void AllToAll(ReadOnlySpan<float> send, Span<float> receive)
    {
        if (send.Length % Size != 0)
            throw new ArgumentException($"AllToAll: send length {send.Length} is not a multiple of Size {Size}.", nameof(send));
        if (receive.Length != send.Length)
            throw new ArgumentException($"AllToAll: receive must have send's length {send.Length}, got {receive.Length}.", nameof(receive));
        using var round = Exchange(nameof(AllToAll), CommOp.AllToAll, send, receive.Length);
        var all = round.Slots;
        CheckEqualLengths(all, send.Length, nameof(AllToAll));
        int block = send.Length / Size;
        for (int s = 0; s < Size; s++) all[s].AsSpan(Rank * block, block).CopyTo(receive.Slice(s * block, block));
    }

    /// <inheritdoc/>
    public void SendRecv(ReadOnlySpan<float> send, int destination, Span<float> receive, int source)
    {
        CheckPeer(destination, nameof(destination));
        CheckPeer(source, nameof(source));
        Enter(nameof(SendRecv), CommOp.SendRecv, send.Length, receive.Length);
        try
        {
            _group.Post(Rank, destination, send);
            var message = _group.Take(source, Rank);
            try { CopyMessage(message, receive, source); }
            finally { _group.Return(message); }
        }
        finally { CurrentOperation = null; }
    }

    /// <inheritdoc/>
    public CommRequest StartSendRecv(ReadOnlyMemory<float> send, int destination, Memory<float> receive, int source)
    {
        CheckPeer(destination, nameof(destination));
        CheckPeer(source, nameof(source));
        Enter(nameof(StartSendRecv), CommOp.SendRecv, send.Length, receive.Length);
        CurrentOperation = null;
        // The send is buffered at once (a copy in the mailbox), so it never waits for the receiver.
        _group.Post(Rank, destination, send.Span);
        return new InProcessRequest(this, receive, source);
    }

    /// <inheritdoc/>
    public void Barrier()
    {
        using var round = Exchange(nameof(Barrier), CommOp.Barrier, ReadOnlySpan<float>.Empty, 0);
    }

    /// <inheritdoc/>
    public ICommunicator Split(int color, int key)
    {
        if (color < 0) throw new ArgumentOutOfRangeException(nameof(color), color, "Split: color must be ≥ 0 (MPI reserves negative colors).");
        // The ints travel as their bit patterns: a float holds only 24 bits exactly, and colors or keys
        // beyond 2^24 must not merge.
        using var round = Exchange(nameof(Split), CommOp.Split, [BitConverter.Int32BitsToSingle(color), BitConverter.Int32BitsToSingle(key)], 0);
        var all = round.Slots;
        int splitIndex = _splits++;
        var members = Enumerable.Range(0, Size).Where(r => BitConverter.SingleToInt32Bits(all[r][0]) == color)
            .OrderBy(r => BitConverter.SingleToInt32Bits(all[r][1])).ThenBy(r => r).ToList();
        var child = _group.Child(splitIndex, color, [.. members.Select(m => _group.WorldRanks[m])]);
        return new InProcessCommunicator(child, members.IndexOf(Rank));
    }

    /// <inheritdoc/>
    public void Dispose() { }

    /// <summary>One collective round: everybody's contributions, given back to the group's pool on dispose.</summary>
    private RoundLease Exchange(string name, CommOp op, ReadOnlySpan<float> send, long receiveLength)
    {
        Enter(name, op, send.Length, receiveLength);
        try
        {
            long round = _group.Deposit(Rank, send);
            return new RoundLease(_group, Rank, round, _group.Collect(Rank, round));
        }
        finally { CurrentOperation = null; }
    }

    /// <summary>A collected round; disposing it tells the group this rank has read it.</summary>
    private readonly struct RoundLease(InProcessGroup group, int rank, long round, float[][] slots) : IDisposable
    {
        public float[][] Slots { get; } = slots;

        public void Dispose() => group.Read(rank, round);
    }

    /// <summary>Deposits this rank's contribution now; the request collects everybody's at Wait.</summary>
    private InProcessCollectiveRequest Start(string name, CommOp op, ReadOnlySpan<float> send, long receiveLength, Action<float[][]> finish)
    {
        Enter(name, op, send.Length, receiveLength);
        try
        {
            return new InProcessCollectiveRequest(this, $"{name}.Wait #{CollectiveSequence}", _group.Deposit(Rank, send), finish);
        }
        finally { CurrentOperation = null; }
    }

    internal void WaitingIn(string? what) => CurrentOperation = what;

    internal float[][] Collect(long round) => _group.Collect(Rank, round);

    internal void Read(long round) => _group.Read(Rank, round);

    private void Enter(string name, CommOp op, long sendLength, long receiveLength)
    {
        int worldRank = _group.WorldRanks[Rank];
        ControlPlane.FaultInjection.OnEnter(worldRank, Interlocked.Increment(ref _group.Job.Entered[worldRank]));
        long seq = Interlocked.Increment(ref _sequence);
        CurrentOperation = $"{name} #{seq}";
        Counters.Record(op, sendLength * sizeof(float), receiveLength * sizeof(float));
        _group.Job.ThrowIfFailed(Rank);
    }

    private void CheckPeer(int peer, string name)
    {
        if (peer < 0 || peer >= Size) throw new ArgumentOutOfRangeException(name, peer, $"Peer rank must be in [0, {Size}).");
    }

    private void CopyMessage(float[] message, Span<float> receive, int source)
    {
        if (message.Length != receive.Length)
            throw new InvalidOperationException($"SendRecv: rank {source} sent {message.Length} floats but rank {Rank} expects {receive.Length}.");
        message.CopyTo(receive);
    }

    private static void CheckEqualLengths(float[][] all, int length, string op)
    {
        for (int r = 0; r < all.Length; r++)
            if (all[r].Length != length)
                throw new InvalidOperationException($"{op}: rank {r} sent {all[r].Length} floats, this rank {length}; all ranks must pass the same sizes.");
    }

    private static void Add(ReadOnlySpan<float> x, Span<float> y)
    {
        int i = 0;
        if (System.Numerics.Vector.IsHardwareAccelerated)
        {
            var xv = System.Runtime.InteropServices.MemoryMarshal.Cast<float, System.Numerics.Vector<float>>(x);
            var yv = System.Runtime.InteropServices.MemoryMarshal.Cast<float, System.Numerics.Vector<float>>(y);
            for (int v = 0; v < yv.Length; v++) yv[v] += xv[v];
            i = yv.Length * System.Numerics.Vector<float>.Count;
        }
        for (; i < y.Length; i++) y[i] += x[i];
    }

    private sealed class InProcessRequest(InProcessCommunicator owner, Memory<float> receive, int source) : CommRequest
    {
        private bool _waited;

        public override void Wait()
        {
            if (_waited) throw new InvalidOperationException("Wait was already called on this request.");
            _waited = true;
            owner.CurrentOperation = $"StartSendRecv.Wait #{owner.CollectiveSequence}";
            try
            {
                var message = owner._group.Take(source, owner.Rank);
                try { owner.CopyMessage(message, receive.Span, source); }
                finally { owner._group.Return(message); }
            }
            finally { owner.CurrentOperation = null; }
        }
    }
}

/// <summary>A collective started in-process: the contribution was deposited at start; Wait collects.</summary>
internal sealed class InProcessCollectiveRequest(InProcessCommunicator owner, string what, long round, Action<float[][]> finish) : CommRequest
{
    private bool _waited;

    public override void Wait()
    {
        if (_waited) throw new InvalidOperationException("Wait was already called on this request.");
        _waited = true;
        owner.WaitingIn(what);
        try
        {
            var all = owner.Collect(round);
            try { finish(all); }
            finally { owner.Read(round); }
        }
        finally { owner.WaitingIn(null); }
    }
}

/// <summary>Thrown by a rank's collective when another rank of the job failed first.</summary>
public sealed class CommunicatorAbortedException : Exception
{
    /// <summary>Creates the exception.</summary>
    public CommunicatorAbortedException(string message, Exception? inner = null) : base(message, inner) { }
}

/// <summary>A rank of a job failed (or the job timed out); <see cref="Rank"/> names it.</summary>
public sealed class RankFailedException : Exception
{
    /// <summary>Creates the exception for <paramref name="rank"/>, wrapping its error.</summary>
    public RankFailedException(int rank, Exception inner)
        : base($"rank {rank} failed: {inner?.GetType().Name}: {inner?.Message}", inner)
    {
        Rank = rank;
    }

    /// <summary>The rank that failed.</summary>
    public int Rank { get; }
}

/// <summary>State shared by every group of one in-process job: the first failure.</summary>
internal sealed class InProcessJob
{
    private readonly object _lock = new();
    private readonly List<InProcessGroup> _groups = [];
    private Exception? _failure;

    public int FailedRank { get; private set; } = -1;

    /// <summary>Collectives each world rank entered, over every group (what DSATTN_FAULT counts).</summary>
    public long[] Entered = [];

    private readonly HashSet<int> _finished = [];

    /// <summary>World rank <paramref name="worldRank"/> returned from its body: it will never enter
    /// another collective, so whoever waits for it must be told instead of hanging.</summary>
    public void Finished(int worldRank)
    {
        List<InProcessGroup> groups;
        lock (_lock)
        {
            _finished.Add(worldRank);
            groups = [.. _groups];
        }
        foreach (var g in groups) g.WakeAll();
    }

    /// <summary>The lowest world rank among <paramref name="worldRanks"/> that has returned, or -1.</summary>
    public int FirstFinished(IEnumerable<int> worldRanks)
    {
        lock (_lock) return worldRanks.Where(_finished.Contains).DefaultIfEmpty(-1).Min();
    }

    public void Register(InProcessGroup g)
    {
        lock (_lock) _groups.Add(g);
    }

    public void Fail(int rank, Exception e)
    {
        List<InProcessGroup> groups;
        lock (_lock)
        {
            if (_failure is not null) return;
            // A rank released by the abort is not the cause; keep looking for the original failure.
            if (e is CommunicatorAbortedException) return;
            _failure = e;
            FailedRank = rank;
            groups = [.. _groups];
        }
        foreach (var g in groups) g.WakeAll();
    }

    public void ThrowIfFailed(int rank)
    {
        var f = _failure;
        if (f is not null)
            throw new CommunicatorAbortedException(
                FailedRank >= 0 ? $"rank {rank}: aborted because rank {FailedRank} failed ({f.GetType().Name}: {f.Message})" : $"rank {rank}: aborted: {f.Message}", f);
    }
}

/// <summary>One communicator group: a rendezvous for collectives and mailboxes for point-to-point.</summary>
internal sealed class InProcessGroup
{
    private readonly object _lock = new();
    // Collective rounds by number: a rank's k-th collective is round k. Started collectives let a rank
    // deposit in later rounds before it collects an earlier one, so every open round is kept until all
    // members have collected it.
    private readonly Dictionary<long, Round> _rounds = [];
    private readonly long[] _deposits;
    private readonly Dictionary<(int From, int To), Queue<float[]>> _mail = [];
    private readonly Dictionary<(int Split, int Color), InProcessGroup> _children = [];

    public InProcessGroup(InProcessJob job, int[] worldRanks)
    {
        Job = job;
        WorldRanks = worldRanks;
        Size = worldRanks.Length;
        _deposits = new long[Size];
        job.Register(this);
    }

    /// <summary>World rank of each member, by group rank.</summary>
    public int[] WorldRanks { get; }

    public InProcessJob Job { get; }

    public int Size { get; }

    /// <summary>
    /// Message copies by exact length, reused: a rank's contribution or message is copied into one when sent
    /// and given back when every receiver has read it, so steady-state steps allocate no managed memory.
    /// </summary>
    private readonly System.Collections.Concurrent.ConcurrentDictionary<int, System.Collections.Concurrent.ConcurrentBag<float[]>> _pool = new();

    private float[] Rent(ReadOnlySpan<float> data)
    {
        if (data.Length == 0) return [];
        var copy = _pool.TryGetValue(data.Length, out var bag) && bag.TryTake(out var reused) ? reused : new float[data.Length];
        data.CopyTo(copy);
        return copy;
    }

    /// <summary>Gives a message copy back to the pool (at most a few per length are kept).</summary>
    public void Return(float[] message)
    {
        if (message.Length == 0) return;
        var bag = _pool.GetOrAdd(message.Length, _ => []);
        if (bag.Count < 4 * Size) bag.Add(message);
    }

    /// <summary>Deposits a copy of this rank's contribution to its next collective round and returns the round.</summary>
    public long Deposit(int rank, ReadOnlySpan<float> data)
    {
        var contribution = Rent(data);
        lock (_lock)
        {
            long round = _deposits[rank]++;
            if (!_rounds.TryGetValue(round, out var r)) _rounds[round] = r = new Round(Size);
            r.Slots[rank] = contribution;
            if (++r.Arrived == Size) Monitor.PulseAll(_lock);
            return round;
        }
    }

    /// <summary>Everybody's contribution to <paramref name="round"/>, once all have arrived.</summary>
    public float[][] Collect(int rank, long round)
    {
        lock (_lock)
        {
            var r = _rounds[round];
            while (r.Arrived < Size)
            {
                Job.ThrowIfFailed(rank);
                // A member that returned without depositing never will: a rank made fewer collective
                // calls than the others, so this round can never complete.
                int gone = Job.FirstFinished(Enumerable.Range(0, Size).Where(m => r.Slots[m] is null).Select(m => WorldRanks[m]));
                if (gone >= 0)
                    throw new InvalidOperationException($"rank {WorldRanks[rank]}: this collective can never complete because rank {gone} has already returned; every rank must make the same collective calls in the same order.");
                Monitor.Wait(_lock);
            }
            return r.Slots;
        }
    }

    /// <summary>This rank has read <paramref name="round"/>; the last reader gives its copies back to the pool.</summary>
    public void Read(int rank, long round)
    {
        float[][]? done = null;
        lock (_lock)
        {
            var r = _rounds[round];
            if (++r.Collected == Size)
            {
                _rounds.Remove(round);
                done = r.Slots;
            }
        }
        if (done is not null) foreach (var slot in done) Return(slot);
    }

    private sealed class Round(int size)
    {
        public float[][] Slots { get; } = new float[size][];
        public int Arrived { get; set; }
        public int Collected { get; set; }
    }

    public void Post(int from, int to, ReadOnlySpan<float> data)
    {
        var message = Rent(data);
        lock (_lock)
        {
            if (!_mail.TryGetValue((from, to), out var q)) _mail[(from, to)] = q = new Queue<float[]>();
            q.Enqueue(message);
            Monitor.PulseAll(_lock);
        }
    }

    public float[] Take(int from, int to)
    {
        lock (_lock)
        {
            while (true)
            {
                if (_mail.TryGetValue((from, to), out var q) && q.Count > 0) return q.Dequeue();
                Job.ThrowIfFailed(to);
                if (Job.FirstFinished([WorldRanks[from]]) >= 0)
                    throw new InvalidOperationException($"rank {WorldRanks[to]}: waits for a message from rank {WorldRanks[from]}, which has already returned without sending it.");
                Monitor.Wait(_lock);
            }
        }
    }

    public InProcessGroup Child(int split, int color, int[] worldRanks)
    {
        lock (_lock)
        {
            if (!_children.TryGetValue((split, color), out var g)) _children[(split, color)] = g = new InProcessGroup(Job, worldRanks);
            return g;
        }
    }

    public void WakeAll()
    {
        lock (_lock) Monitor.PulseAll(_lock);
    }
}
