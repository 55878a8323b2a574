using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>
/// Ring attention for softmax: K/V blocks travel around the ring by send/receive. Forward: at each of the
/// P steps the next block's transfer is started before the current block's kernels run and waited on
/// after them, and each block's partial (O, LSE) is merged into the running state as it arrives. Blocks
/// (or block chunks) entirely in a query chunk's causal future are skipped; zigzag sharding balances the
/// rest. Backward: the K/V blocks travel again, the next one in flight while the current one computes, and
/// each block's dK/dV accumulator follows one step behind (in flight during the next rank's compute), each
/// rank adding its queries' contribution (with the global LSE), so after P steps every block is home with its
/// full gradient. With overlap off (--no-overlap) every transfer is waited for where it starts: the same
/// arithmetic, so the results are bitwise equal either way.
/// </summary>
internal sealed class RingSoftmaxAttention : IScheme
{
    private readonly ICommunicator _comm;
    private readonly IKernelBackend _backend;
    private readonly AttentionShape _s;
    private readonly PhaseClock _clock;
    private readonly FlashOptions _options;
    private readonly bool _overlap;
    private readonly IReadOnlyList<(int Start, int Count)>[] _rankRanges;
    private readonly int[] _tokens;
    private readonly LocalChunks _local;
    private readonly int _kRow, _vRow;
    private readonly DeviceTensor[] _lse, _drow, _partO, _partLse;
    private readonly Dictionary<int, DeviceTensor[]> _blocks = [];  // per token count: K, V, dK, dV
    private readonly Dictionary<(int Tokens, int Offset, int Count), DeviceTensor[]?> _views = [];  // zigzag ranges of a block, aliased
    private float[] _current = [], _next = [], _gradOut = [], _gradIn = [], _negativeInfinity = [];
    private DeviceTensor[]? _q, _o;
    private DeviceTensor? _kLocal, _vLocal;

    public RingSoftmaxAttention(ICommunicator comm, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options, ShardLayout layout, PhaseClock clock)
    {
        _comm = comm;
        _backend = backend;
        _s = shape;
        _clock = clock;
        _options = new FlashOptions(0, 0, options.Causal, options.Scale);
        _overlap = options.Overlap;
        _rankRanges = Sharding.AllRanges(shape.SeqLen, comm.Size, layout);
        _tokens = Sharding.TokenCounts(_rankRanges);
        Ranges = _rankRanges[comm.Rank];
        _local = new LocalChunks(backend, Ranges);
        _kRow = shape.KvHeads * shape.HeadDim;
        _vRow = shape.KvHeads * shape.ValueDim;
        _lse = Ranges.Select(r => backend.Allocate(shape.Batch, shape.Heads, r.Count)).ToArray();
        _drow = Ranges.Select(r => backend.Allocate(shape.Batch, shape.Heads, r.Count)).ToArray();
        _partO = Ranges.Select(r => backend.Allocate(shape.Batch, r.Count, shape.Heads, shape.ValueDim)).ToArray();
        _partLse = Ranges.Select(r => backend.Allocate(shape.Batch, shape.Heads, r.Count)).ToArray();
    }

    public IReadOnlyList<(int Start, int Count)> Ranges { get; }

    private int Prev => (_comm.Rank - 1 + _comm.Size) % _comm.Size;

    private int Next => (_comm.Rank + 1) % _comm.Size;

    /// <summary>Floats of rank r's block message: K and V, or (the gradient message) dK and dV.</summary>
    private int Message(int r) => _s.Batch * _tokens[r] * (_kRow + _vRow);

    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        int p = _comm.Size;
        DeviceTensor[] qs = null!, os = null!;
        _clock.Compute(() =>
        {
            qs = _local.Split("q", q);
            os = _local.Output("o", o);
            for (int c = 0; c < Ranges.Count; c++)
            {
                // The running state starts as "nothing seen": O = 0, LSE = -inf (weight 0 in the merge).
                _backend.Clear(os[c]);
                if (_negativeInfinity.Length < _lse[c].Length)
                {
                    _negativeInfinity = new float[_lse[c].Length];
                    Array.Fill(_negativeInfinity, float.NegativeInfinity);
                }
                _lse[c].CopyFromHost(_negativeInfinity.AsSpan(0, (int)_lse[c].Length));
            }
        });
        _clock.Communicate(() => Pack(k, v, _comm.Rank, ref _current));
        for (int step = 0; step < p; step++)
        {
            int owner = ((_comm.Rank - step) % p + p) % p;
            CommRequest? pending = null;
            if (step < p - 1)
            {
                int incoming = ((owner - 1) % p + p) % p;
                _clock.Communicate(() =>
                {
                    HostBuffer.Grow(ref _next, Message(incoming));
                    // --no-overlap: the next block arrives before this one is used (a blocking exchange).
                    pending = Exchange(_current, Message(owner), _next, Message(incoming), blocking: !_overlap);
                });
            }
            _clock.Compute(() =>
            {
                var kv = Unpack(owner, _current);
                DeviceTensor[] block = [kv[0], kv[1], null!, null!];  // no gradients in the forward
                for (int c = 0; c < Ranges.Count; c++)
                    ForEachVisiblePart(owner, c, (kPart, vPart, start, _, _) =>
                    {
                        _backend.FlashForward(qs[c], kPart, vPart, _partO[c], _partLse[c], _options with { QueryOffset = Ranges[c].Start, KeyOffset = start });
                        _backend.MergeSoftmax(os[c], _lse[c], _partO[c], _partLse[c]);
                    }, block);
            });
            if (pending is not null)
            {
                _clock.Communicate(pending.Wait);
                (_current, _next) = (_next, _current);
            }
        }
        _clock.Compute(() => _local.Join(os, o));
        (_q, _o, _kLocal, _vLocal) = (qs, os, k, v);
    }

    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        if (_q is null || _o is null || _kLocal is null || _vLocal is null) throw new InvalidOperationException("Call Forward before Backward: the backward pass reuses the forward's output and LSE.");
        int p = _comm.Size;
        DeviceTensor[] dOs = null!, dQs = null!;
        _clock.Compute(() =>
        {
            dOs = _local.Split("dO", dO);
            dQs = _local.Output("dQ", dQ);
            for (int c = 0; c < Ranges.Count; c++)
            {
                _backend.SoftmaxRowDot(_o[c], dOs[c], _drow[c]);
                _backend.Clear(dQs[c]);
            }
        });
        _clock.Communicate(() => Pack(_kLocal, _vLocal, _comm.Rank, ref _current));
        // Two streams travel the ring. K/V blocks move ahead as in the forward: block owner(s+1) is in flight
        // while block owner(s) computes. Each block's dK/dV accumulator follows one step behind: rank r adds
        // its contribution to block b into zeroed device tensors while the sum of the contributions of the
        // ranks before it (sent at the end of their step) is in flight, then adds that sum on the host and
        // sends the total on; the last rank's send brings every block home with its full gradient.
        CommRequest? gradients = null;  // in flight: _gradOut to Next, the accumulator of the next block from Prev into _gradIn
        for (int step = 0; step < p; step++)
        {
            int owner = ((_comm.Rank - step) % p + p) % p;
            CommRequest? pending = null;
            if (step < p - 1)
            {
                int incoming = ((owner - 1) % p + p) % p;
                _clock.Communicate(() =>
                {
                    HostBuffer.Grow(ref _next, Message(incoming));
                    pending = Exchange(_current, Message(owner), _next, Message(incoming), blocking: !_overlap);
                });
            }
            DeviceTensor[] block = null!;
            _clock.Compute(() =>
            {
                block = Unpack(owner, _current);
                _backend.Clear(block[2]);
                _backend.Clear(block[3]);
                for (int c = 0; c < Ranges.Count; c++)
                    ForEachVisiblePart(owner, c, (kPart, vPart, start, dkPart, dvPart) =>
                        _backend.FlashBackward(_q[c], kPart, vPart, _lse[c], _drow[c], dOs[c], dQs[c], dkPart!, dvPart!,
                            _options with { QueryOffset = Ranges[c].Start, KeyOffset = start, Accumulate = true }), block);
            });
            _clock.Communicate(() =>
            {
                // The accumulator of this block (started one step ago) before the next K/V block (started at
                // this step's start): each peer pair's messages are taken in the order they were sent.
                gradients?.Wait();
                if (pending is not null)
                {
                    pending.Wait();
                    (_current, _next) = (_next, _current);
                }
                int floats = Message(owner);
                HostBuffer.Grow(ref _gradOut, floats);
                StageGradients(block[2], block[3], owner, _gradOut);
                if (step > 0) AddInto(_gradOut.AsSpan(0, floats), _gradIn.AsSpan(0, floats));
                if (p == 1) return;
                // The block moves on with its gradient; after the last step every block is home.
                int incoming = ((owner - 1) % p + p) % p;
                HostBuffer.Grow(ref _gradIn, Message(incoming));
                // The last one (every block going home) has no compute left to hide behind.
                gradients = Exchange(_gradOut, floats, _gradIn, Message(incoming), blocking: !_overlap || step == p - 1);
            });
        }
        _clock.Compute(() =>
        {
            var home = Tensors(_tokens[_comm.Rank], _tokens[_comm.Rank]);
            float[] full = p == 1 ? _gradOut : _gradIn;
            int kLen = _s.Batch * _tokens[_comm.Rank] * _kRow, vLen = _s.Batch * _tokens[_comm.Rank] * _vRow;
            home[2].CopyFromHost(full.AsSpan(0, kLen));
            home[3].CopyFromHost(full.AsSpan(kLen, vLen));
            _backend.CopySlice(home[2], 0, dK, 0, _tokens[_comm.Rank], 1);
            _backend.CopySlice(home[3], 0, dV, 0, _tokens[_comm.Rank], 1);
            _local.Join(dQs, dQ);
        });
    }

    /// <summary>
    /// Sends the first <paramref name="sendFloats"/> of <paramref name="send"/> to the next rank while receiving
    /// <paramref name="receiveFloats"/> from the previous one into <paramref name="receive"/>: started (Wait on
    /// the result before touching either buffer) or, when <paramref name="blocking"/>, done before it returns.
    /// </summary>
    private CommRequest Exchange(float[] send, int sendFloats, float[] receive, int receiveFloats, bool blocking)
    {
        if (!blocking) return _comm.StartSendRecv(send.AsMemory(0, sendFloats), Next, receive.AsMemory(0, receiveFloats), Prev);
        _comm.SendRecv(send.AsSpan(0, sendFloats), Next, receive.AsSpan(0, receiveFloats), Prev);
        return CompletedExchange.Instance;
    }

    /// <summary>An exchange that was done blocking: nothing left to wait for.</summary>
    private sealed class CompletedExchange : CommRequest
    {
        public static readonly CompletedExchange Instance = new();

        public override void Wait() { }
    }

    /// <summary>Copies one block's dK and dV (device) into <paramref name="message"/> as [dK, dV].</summary>
    private void StageGradients(DeviceTensor dK, DeviceTensor dV, int owner, float[] message)
    {
        int kLen = _s.Batch * _tokens[owner] * _kRow, vLen = _s.Batch * _tokens[owner] * _vRow;
        dK.CopyToHost(message.AsSpan(0, kLen));
        dV.CopyToHost(message.AsSpan(kLen, vLen));
    }

    /// <summary><c>sum[i] += addend[i]</c>, element by element (the same order on every run).</summary>
    private static void AddInto(Span<float> sum, ReadOnlySpan<float> addend)
    {
        int i = 0;
        if (System.Numerics.Vector.IsHardwareAccelerated)
        {
            int w = System.Numerics.Vector<float>.Count;
            for (; i <= sum.Length - w; i += w)
                (new System.Numerics.Vector<float>(sum[i..]) + new System.Numerics.Vector<float>(addend[i..])).CopyTo(sum[i..]);
        }
        for (; i < sum.Length; i++) sum[i] += addend[i];
    }

    /// <summary>
    /// Runs <paramref name="work"/> for each token range of <paramref name="owner"/>'s block that query chunk
    /// c can see (all, or the causally visible ones), with that range's K, V (and dK, dV) parts.
    /// </summary>
    private void ForEachVisiblePart(int owner, int c, Action<DeviceTensor, DeviceTensor, int, DeviceTensor?, DeviceTensor?> work, DeviceTensor[] block)
    {
        var ranges = _rankRanges[owner];
        int offset = 0;
        foreach (var (start, count) in ranges)
        {
            bool visible = !_options.Causal || start <= Ranges[c].Start + Ranges[c].Count - 1;
            if (visible)
            {
                if (ranges.Count == 1) work(block[0], block[1], start, block[2], block[3]);
                else if (Views(owner, offset, count) is { } view)
                    work(view[0], view[1], start, block[2] is null ? null : view[2], block[2] is null ? null : view[3]);
                else
                {
                    var parts = Parts(count);
                    _backend.CopySlice(block[0], offset, parts[0], 0, count, 1);
                    _backend.CopySlice(block[1], offset, parts[1], 0, count, 1);
                    if (block[2] is not null)
                    {
                        _backend.CopySlice(block[2], offset, parts[2], 0, count, 1);
                        _backend.CopySlice(block[3], offset, parts[3], 0, count, 1);
                    }
                    work(parts[0], parts[1], start, parts[2], parts[3]);
                    if (block[2] is not null)
                    {
                        _backend.CopySlice(parts[2], 0, block[2], offset, count, 1);
                        _backend.CopySlice(parts[3], 0, block[3], offset, count, 1);
                    }
                }
            }
            offset += count;
        }
    }

    /// <summary>
    /// Views of one range of <paramref name="owner"/>'s block tensors [K, V, dK, dV] where the backend can alias
    /// them (no copies in and out); null where it cannot.
    /// </summary>
    private DeviceTensor[]? Views(int owner, int offset, int count)
    {
        int tokens = _tokens[owner];
        if (_views.TryGetValue((tokens, offset, count), out var views)) return views;
        var block = Tensors(tokens, tokens);
        views = new DeviceTensor[block.Length];
        for (int i = 0; i < block.Length; i++)
        {
            if (_backend.TryView(block[i], offset, count) is not { } v) { views = null; break; }
            views[i] = v;
        }
        _views[(tokens, offset, count)] = views;
        return views;
    }

    /// <summary>Device tensors for one range of a zigzag block, reused: [K, V, dK, dV].</summary>
    private DeviceTensor[] Parts(int tokens) => Tensors(-tokens - 1, tokens);

    private DeviceTensor[] Tensors(int key, int tokens)
    {
        if (!_blocks.TryGetValue(key, out var t))
        {
            t =
            [
                _backend.Allocate(_s.Batch, tokens, _s.KvHeads, _s.HeadDim), _backend.Allocate(_s.Batch, tokens, _s.KvHeads, _s.ValueDim),
                _backend.Allocate(_s.Batch, tokens, _s.KvHeads, _s.HeadDim), _backend.Allocate(_s.Batch, tokens, _s.KvHeads, _s.ValueDim),
            ];
            _blocks[key] = t;
        }
        return t;
    }

    /// <summary>Uploads a received message of <paramref name="owner"/>'s block into its device K and V; returns
    /// the block's tensors [K, V, dK, dV] (dK, dV as they are).</summary>
    private DeviceTensor[] Unpack(int owner, float[] message)
    {
        int tokens = _tokens[owner], b = _s.Batch;
        var t = Tensors(tokens, tokens);
        int kLen = b * tokens * _kRow, vLen = b * tokens * _vRow;
        t[0].CopyFromHost(message.AsSpan(0, kLen));
        t[1].CopyFromHost(message.AsSpan(kLen, vLen));
        return t;
    }

    /// <summary>Stages K and V of <paramref name="owner"/>'s block into a message.</summary>
    private void Pack(DeviceTensor k, DeviceTensor v, int owner, ref float[] message)
    {
        int tokens = _tokens[owner], b = _s.Batch;
        int kLen = b * tokens * _kRow, vLen = b * tokens * _vRow;
        HostBuffer.Grow(ref message, Message(owner));
        k.CopyToHost(message.AsSpan(0, kLen));
        v.CopyToHost(message.AsSpan(kLen, vLen));
    }

    public void CopyLse(DeviceTensor lse)
    {
        int offset = 0;
        for (int c = 0; c < Ranges.Count; c++)
        {
            _backend.CopySlice(_lse[c], 0, lse, offset, Ranges[c].Count, 2);
            offset += Ranges[c].Count;
        }
    }

    public void Dispose()
    {
        foreach (var t in _lse.Concat(_drow).Concat(_partO).Concat(_partLse)) t.Dispose();
        foreach (var ts in _blocks.Values)
            foreach (var t in ts) t.Dispose();
        _local.Dispose();
    }
}

/// <summary>Registration of <see cref="RingSoftmaxAttention"/>.</summary>
internal sealed class RingSoftmaxDescriptor : SchemeDescriptor
{
    public override string CliName => "ring";
    public override IReadOnlyList<AttentionKind> Kinds { get; } = [AttentionKind.Softmax];
    public override string Summary => "ring attention: K/V blocks travel around the ring while the current block computes";
    public override bool HybridSequenceScheme => true;
    public override ShardLayout DefaultLayout(SequenceParallelOptions options) => options.Causal ? ShardLayout.Zigzag : ShardLayout.Contiguous;
    public override IScheme Create(SchemeSetup s) => new RingSoftmaxAttention(s.Communicator, s.Backend, s.Shape, s.Options, s.Layout, s.Clock);

    public override MemoryEstimate Estimate(AttentionShape shape, SequenceParallelOptions options, int ranks, ShardLayout layout)
    {
        var z = new EstimateSizes(shape, ranks, layout);
        long b = z.B, n = z.N, h = z.H, t = z.T, kRow = z.KRow, vRow = z.VRow, qRow = z.QRow, oRow = z.ORow;
        // The block on the device (K, V, dK, dV; one per distinct shard length), plus copies of its
        // zigzag ranges where they cannot be views.
        long blocks = n % z.Chunks == 0 ? 1 : 2;
        long scheme = 3 * b * h * t + b * t * oRow + blocks * b * t * 2 * (kRow + vRow)
            + (z.CopiedParts ? b * t * (2 * qRow + 2 * oRow + 2 * (kRow + vRow)) : 0);
        long staging = 2 * b * t * 2 * (kRow + vRow);
        long largest = b * t * 2 * (kRow + vRow);
        return new MemoryEstimate(z.Caller, scheme, staging, largest);
    }
}
