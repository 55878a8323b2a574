using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>
/// All-gather KV for softmax attention (LASP-2H, Llama-3 context parallel). Forward: <b>one all-gather</b>
/// of every rank's K and V (packed together), then each local query chunk attends to the whole sequence
/// with its global offset (causal masking skips the future). Backward: each rank computes dK and dV over
/// the whole sequence for its queries, and <b>one reduce-scatter</b> returns every rank's share to its owner.
/// Zigzag sharding balances causal work. Bytes grow linearly with N. Host staging is bounded: the
/// collectives run in pieces of at most <see cref="HostBuffer.PieceFloats"/> floats (one piece up to
/// tens of thousands of tokens), each piece going straight between the staging buffer and the device
/// tensors, so no collective ever passes 2^31 floats and no host copy of the whole K and V is kept.
/// </summary>
internal sealed class AllGatherSoftmaxAttention : IScheme
{
    private readonly ICommunicator _comm;
    private readonly IKernelBackend _backend;
    private readonly AttentionShape _s;
    private readonly PhaseClock _clock;
    private readonly FlashOptions _options;
    private readonly IReadOnlyList<(int Start, int Count)>[] _rankRanges;
    private readonly int[] _rankTokens;
    private readonly LocalChunks _local;
    private readonly int _kRow, _vRow;
    private readonly DeviceTensor? _k, _v, _dK, _dV;   // the whole sequence's K, V, dK, dV (not needed on one rank)
    private readonly DeviceTensor[] _lse, _drow;
    private float[] _small = [], _large = [];  // this rank's piece / every rank's piece
    private DeviceTensor[]? _q, _o;
    private DeviceTensor? _kAll, _vAll;

    public AllGatherSoftmaxAttention(ICommunicator comm, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options, ShardLayout layout, PhaseClock clock)
    {
        _comm = comm;
        _backend = backend;
        _s = shape;
        _clock = clock;
        _options = new FlashOptions(0, 0, options.Causal, options.Scale);
        _rankRanges = Sharding.AllRanges(shape.SeqLen, comm.Size, layout);
        _rankTokens = Sharding.TokenCounts(_rankRanges);
        Ranges = _rankRanges[comm.Rank];
        _local = new LocalChunks(backend, Ranges);
        _kRow = shape.KvHeads * shape.HeadDim;
        _vRow = shape.KvHeads * shape.ValueDim;
        if (comm.Size > 1)
        {
            _k = backend.Allocate(shape.Batch, shape.SeqLen, shape.KvHeads, shape.HeadDim);
            _v = backend.Allocate(shape.Batch, shape.SeqLen, shape.KvHeads, shape.ValueDim);
            _dK = backend.Allocate(shape.Batch, shape.SeqLen, shape.KvHeads, shape.HeadDim);
            _dV = backend.Allocate(shape.Batch, shape.SeqLen, shape.KvHeads, shape.ValueDim);
        }
        _lse = Ranges.Select(r => backend.Allocate(shape.Batch, shape.Heads, r.Count)).ToArray();
        _drow = Ranges.Select(r => backend.Allocate(shape.Batch, shape.Heads, r.Count)).ToArray();
    }

    public IReadOnlyList<(int Start, int Count)> Ranges { get; }

    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        // One rank holds the whole sequence in global order (either layout): its K and V are the gathered ones.
        if (_k is null || _v is null) (_kAll, _vAll) = (k, v);
        else
        {
            GatherKeysAndValues(k, v, _k, _v);
            (_kAll, _vAll) = (_k, _v);
        }
        _clock.Compute(() =>
        {
            var qs = _local.Split("q", q);
            var os = _local.Output("o", o);
            for (int c = 0; c < Ranges.Count; c++)
                _backend.FlashForward(qs[c], _kAll, _vAll, os[c], _lse[c], _options with { QueryOffset = Ranges[c].Start });
            _local.Join(os, o);
            (_q, _o) = (qs, os);
        });
    }

    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        if (_q is null || _o is null || _kAll is null || _vAll is null) throw new InvalidOperationException("Call Forward before Backward: the backward pass reuses the forward's gathered K/V, output and LSE.");
        var (kAll, vAll) = (_kAll, _vAll);
        // On one rank the gradients of the whole sequence are the rank's own: written in place.
        var (dKAll, dVAll) = _dK is null || _dV is null ? (dK, dV) : (_dK, _dV);
        _clock.Compute(() =>
        {
            var dOs = _local.Split("dO", dO);
            var dQs = _local.Output("dQ", dQ);
            for (int c = 0; c < Ranges.Count; c++)
            {
                _backend.SoftmaxRowDot(_o[c], dOs[c], _drow[c]);
                // Accumulate sums dK and dV over the chunks, but it also adds into dQ: chunk c's dQ part
                // must start at zero, not at the last step's value.
                if (c > 0) _backend.Clear(dQs[c]);
                _backend.FlashBackward(_q[c], kAll, vAll, _lse[c], _drow[c], dOs[c], dQs[c], dKAll, dVAll,
                    _options with { QueryOffset = Ranges[c].Start, Accumulate = c > 0 });
            }
            _local.Join(dQs, dQ);
        });
        if (_dK is not null && _dV is not null) ScatterGradients(dK, dV, _dK, _dV);
    }

    /// <summary>
    /// All-gathers of [K | V] of every rank (one when the whole sequence fits a staging piece), written into
    /// the global K and V on the device in global token order.
    /// </summary>
    private void GatherKeysAndValues(DeviceTensor k, DeviceTensor v, DeviceTensor kAll, DeviceTensor vAll)
    {
        _clock.Communicate(() =>
        {
            int b = _s.Batch, n = _s.SeqLen, p = _comm.Size, me = _comm.Rank;
            int width = _kRow + _vRow;
            int pieces = HostBuffer.Pieces((long)b * n * width, (long)b * _rankTokens.Max() * width * p);
            var counts = new int[p];
            for (int i = 0; i < pieces; i++)
            {
                for (int r = 0; r < p; r++)
                {
                    var (lo, hi) = Piece(r, i, pieces);
                    counts[r] = b * (hi - lo) * width;
                }
                var (myLo, myHi) = Piece(me, i, pieces);
                int myLen = myHi - myLo;
                HostBuffer.Grow(ref _small, counts[me]);
                for (int bb = 0; bb < b; bb++)
                {
                    k.CopyToHost(_small.AsSpan(bb * myLen * _kRow, myLen * _kRow), ((long)bb * _rankTokens[me] + myLo) * _kRow);
                    v.CopyToHost(_small.AsSpan(b * myLen * _kRow + bb * myLen * _vRow, myLen * _vRow), ((long)bb * _rankTokens[me] + myLo) * _vRow);
                }
                int total = counts.Sum();
                HostBuffer.Grow(ref _large, total);
                _comm.AllGatherVariable(_small.AsSpan(0, counts[me]), _large.AsSpan(0, total), counts);
                int offset = 0;
                for (int r = 0; r < p; r++)
                {
                    var (lo, hi) = Piece(r, i, pieces);
                    int len = hi - lo;
                    foreach (var (local, global, count) in Sharding.LocalToGlobal(_rankRanges[r], lo, hi))
                        for (int bb = 0; bb < b; bb++)
                        {
                            int at = local - lo;
                            kAll.CopyFromHost(_large.AsSpan(offset + (bb * len + at) * _kRow, count * _kRow), ((long)bb * n + global) * _kRow);
                            vAll.CopyFromHost(_large.AsSpan(offset + b * len * _kRow + (bb * len + at) * _vRow, count * _vRow), ((long)bb * n + global) * _vRow);
                        }
                    offset += counts[r];
                }
            }
        });
    }

    /// <summary>
    /// Reduce-scatters of [dK | dV] (one when it fits a staging piece): rank r receives the sum over ranks
    /// of its own rows, read straight from the global dK and dV on the device.
    /// </summary>
    private void ScatterGradients(DeviceTensor dK, DeviceTensor dV, DeviceTensor dKAll, DeviceTensor dVAll)
    {
        _clock.Communicate(() =>
        {
            int b = _s.Batch, n = _s.SeqLen, p = _comm.Size, me = _comm.Rank;
            int width = _kRow + _vRow;
            int pieces = HostBuffer.Pieces((long)b * n * width, (long)b * _rankTokens.Max() * width * p);
            for (int i = 0; i < pieces; i++)
            {
                int longest = 0;
                for (int r = 0; r < p; r++) { var (lo, hi) = Piece(r, i, pieces); longest = Math.Max(longest, hi - lo); }
                int block = b * longest * width; // equal blocks: shorter pieces are zero-padded
                HostBuffer.Grow(ref _large, (long)block * p);
                var send = _large.AsSpan(0, block * p);
                send.Clear();
                for (int r = 0; r < p; r++)
                {
                    var (lo, hi) = Piece(r, i, pieces);
                    int len = hi - lo;
                    foreach (var (local, global, count) in Sharding.LocalToGlobal(_rankRanges[r], lo, hi))
                        for (int bb = 0; bb < b; bb++)
                        {
                            int at = local - lo;
                            dKAll.CopyToHost(send.Slice(r * block + (bb * len + at) * _kRow, count * _kRow), ((long)bb * n + global) * _kRow);
                            dVAll.CopyToHost(send.Slice(r * block + b * len * _kRow + (bb * len + at) * _vRow, count * _vRow), ((long)bb * n + global) * _vRow);
                        }
                }
                HostBuffer.Grow(ref _small, block);
                _comm.ReduceScatterSum(send, _small.AsSpan(0, block));
                var (myLo, myHi) = Piece(me, i, pieces);
                int myLen = myHi - myLo;
                for (int bb = 0; bb < b; bb++)
                {
                    dK.CopyFromHost(_small.AsSpan(bb * myLen * _kRow, myLen * _kRow), ((long)bb * _rankTokens[me] + myLo) * _kRow);
                    dV.CopyFromHost(_small.AsSpan(b * myLen * _kRow + bb * myLen * _vRow, myLen * _vRow), ((long)bb * _rankTokens[me] + myLo) * _vRow);
                }
            }
        });
    }

    /// <summary>Piece <paramref name="i"/> of <paramref name="pieces"/> of rank r's local tokens: [lo, hi).</summary>
    private (int Lo, int Hi) Piece(int r, int i, int pieces)
    {
        var (start, count) = Sharding.Chunk(_rankTokens[r], pieces, i);
        return (start, start + count);
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
        _k?.Dispose(); _v?.Dispose(); _dK?.Dispose(); _dV?.Dispose();
        foreach (var t in _lse) t.Dispose();
        foreach (var t in _drow) t.Dispose();
        _local.Dispose();
    }
}

/// <summary>Registration of <see cref="AllGatherSoftmaxAttention"/>.</summary>
internal sealed class AllGatherSoftmaxDescriptor : SchemeDescriptor
{
    public override string CliName => "allgather";
    public override IReadOnlyList<AttentionKind> Kinds { get; } = [AttentionKind.Softmax];
    public override string Summary => "all-gather K and V (LASP-2H, Llama-3 context parallel); backward reduce-scatters dK, dV";
    public override bool HybridSequenceScheme => true;
    public override ShardLayout DefaultLayout(SequenceParallelOptions options) => options.Causal ? ShardLayout.Zigzag : ShardLayout.Contiguous;
    public override IScheme Create(SchemeSetup s) => new AllGatherSoftmaxAttention(s.Communicator, s.Backend, s.Shape, s.Options, s.Layout, s.Clock);

    public override MemoryEstimate Estimate(AttentionShape shape, SequenceParallelOptions options, int ranks, ShardLayout layout)
    {
        var z = new EstimateSizes(shape, ranks, layout);
        long b = z.B, n = z.N, h = z.H, t = z.T, kRow = z.KRow, vRow = z.VRow, qRow = z.QRow, oRow = z.ORow;
        // One rank uses its own K, V, dK and dV as the whole sequence's and stages nothing.
        long scheme = (ranks > 1 ? 2 * b * n * (kRow + vRow) : 0) + 2 * b * h * t + (z.CopiedParts ? b * t * (2 * qRow + 2 * oRow) : 0);
        long gathered = Math.Min(b * n * (kRow + vRow), HostBuffer.PieceFloats) + b * ranks * (kRow + vRow);
        long staging = ranks > 1 ? gathered + gathered / ranks + b * (kRow + vRow) : 0;
        long largest = Math.Max(b * t * Math.Max(kRow + vRow, Math.Max(qRow, oRow)), gathered);
        return new MemoryEstimate(z.Caller, scheme, staging, largest);
    }
}
